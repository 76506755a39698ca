//! The sealing pipeline: chunk a stream, then id, compress and seal every chunk, on
//! as many threads as asked, handing the sealed chunks to a sink in stream order.
//!
//! ```text
//!   lock: source        no lock              lock: seam            no lock          lock: output
//! ┌──────────────┐  ┌────────────────┐  ┌──────────────────┐  ┌──────────────┐  ┌───────────────────┐
//! │ read segment │─▶│ cut it, guess- │─▶│ in segment order: │─▶│ id, zstd and │─▶│ reorder, sink,    │
//! │ k (2 MiB)    │  │ ing a chunk    │  │ walk the true     │  │ seal each    │  │ give the permit   │
//! └──────────────┘  │ starts at its  │  │ cuts across the   │  │ chunk        │  │ back when segment │
//!                   │ first byte     │  │ seam until they   │  └──────────────┘  │ k is delivered    │
//!                   └────────────────┘  │ meet the guess    │                    └───────────────────┘
//!                                       └──────────────────┘
//!     every one of the `threads` threads (the caller's included) runs this loop
//! ```
//!
//! Cutting is where a parallel pipeline usually serialises: FastCDC's cut points
//! depend on where the previous chunk ended. Here each thread cuts its own segment
//! speculatively and only the short walk across each seam is sequential (see
//! [`crate::segments`]); the cut points are exactly those of the sequential
//! [`Chunker`]. Chunks are sealed straight from the segment buffer a thread owns, so
//! nothing is copied between reading and compressing. Measured on two cores against
//! earlier designs (a chunker thread feeding workers; all threads cutting under one
//! lock): see `docs/ARCHITECTURE.md`.
//!
//! Memory is bounded: a thread needs a permit to read a segment, and the permit
//! comes back only when the segment's last chunk has gone to the sink, so at most
//! `threads + 1` segments are read and not yet delivered, however fast or slow the
//! threads and the sink are.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::thread;

use homing_crypto::{KeyRing, ObjectId, ObjectKind};

use crate::chunker::{ChunkSpan, Chunker, ChunkerParams, Cutter};
use crate::error::Error;
use crate::object::{DEFAULT_ZSTD_LEVEL, SealedObject, Sealer};
use crate::segments::{Resolved, resolve, speculative_cuts};

/// How to run the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelineOptions {
    /// Threads that cut, id, compress and seal, the calling thread included; 1 runs
    /// everything on the calling thread.
    pub threads: usize,
    /// zstd level.
    pub zstd_level: i32,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        Self {
            threads: thread::available_parallelism().map_or(1, usize::from),
            zstd_level: DEFAULT_ZSTD_LEVEL,
        }
    }
}

/// A chunk of the stream, sealed unless it is known already.
#[derive(Debug)]
pub struct SealedChunk {
    /// Where the chunk lies in the stream.
    pub span: ChunkSpan,
    /// Its object id.
    pub id: ObjectId,
    /// The sealed object; `None` when the `known` test of [`seal_new_chunks`]
    /// said the id is held already, and the chunk was not sealed.
    pub object: Option<SealedObject>,
}

/// What a run of the pipeline did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamSummary {
    /// Bytes read from the stream.
    pub bytes_read: u64,
    /// Chunks cut.
    pub chunks: u64,
    /// Bytes of sealed objects handed to the sink.
    pub bytes_sealed: u64,
    /// Chunks that were known already, and not sealed.
    pub known: u64,
}

/// Chunks and seals everything `reader` yields, calling `sink` with each sealed
/// chunk in stream order.
///
/// # Errors
/// The first error of the reader ([`Error::Read`]), of sealing, or of the sink; the
/// pipeline stops at once and calls the sink no more.
pub fn seal_stream<R, E, F>(
    reader: R,
    keys: &KeyRing,
    options: PipelineOptions,
    sink: F,
) -> Result<StreamSummary, E>
where
    R: Read + Send,
    E: From<Error> + Send,
    F: FnMut(SealedChunk) -> Result<(), E> + Send,
{
    seal_new_chunks(reader, keys, options, &|_| false, sink)
}

/// As [`seal_stream`], but a chunk whose id `known` accepts is handed to the
/// sink unsealed (`object: None`): a large file that changed in one place is read
/// and cut again, but only its new chunks are compressed and encrypted. `known`
/// is asked from the pipeline's threads.
///
/// # Errors
/// As [`seal_stream`].
pub fn seal_new_chunks<R, E, F>(
    reader: R,
    keys: &KeyRing,
    options: PipelineOptions,
    known: &(dyn Fn(&ObjectId) -> bool + Sync),
    mut sink: F,
) -> Result<StreamSummary, E>
where
    R: Read + Send,
    E: From<Error> + Send,
    F: FnMut(SealedChunk) -> Result<(), E> + Send,
{
    let mut summary = StreamSummary::default();
    let mut deliver = |chunk: SealedChunk| {
        summary.chunks += 1;
        summary.bytes_read += u64::from(chunk.span.len);
        match &chunk.object {
            Some(object) => summary.bytes_sealed += object.bytes.len() as u64,
            None => summary.known += 1,
        }
        sink(chunk)
    };
    if options.threads <= 1 {
        let mut sealer = Sealer::new(keys, options.zstd_level)?;
        let mut chunker = Chunker::new(reader, keys.chunker_seed());
        while let Some((span, data)) = next(&mut chunker)? {
            deliver(seal_unless_known(&mut sealer, known, span, data)?)?;
        }
    } else {
        let cutter = Cutter::new(ChunkerParams::V1, keys.chunker_seed());
        run_segments(
            reader,
            keys,
            options,
            cutter,
            SEGMENT_LEN,
            known,
            &mut deliver,
        )?;
    }
    Ok(summary)
}

fn seal_unless_known(
    sealer: &mut Sealer<'_>,
    known: &(dyn Fn(&ObjectId) -> bool + Sync),
    span: ChunkSpan,
    data: &[u8],
) -> Result<SealedChunk, Error> {
    let id = sealer.object_id(data);
    let object = if known(&id) {
        None
    } else {
        Some(sealer.seal_with_id(ObjectKind::Chunk, id, data)?)
    };
    Ok(SealedChunk { span, id, object })
}

fn next<R: Read>(chunker: &mut Chunker<R>) -> Result<Option<(ChunkSpan, &[u8])>, Error> {
    let offset = chunker.position();
    chunker
        .next_chunk()
        .map_err(|source| Error::Read { offset, source })
}

/// Length of the segments the parallel pipeline reads: large against the chunks, so
/// that the sequential walk across each seam is a small part of the work.
const SEGMENT_LEN: usize = 2 << 20;

fn run_segments<R, E, F>(
    reader: R,
    keys: &KeyRing,
    options: PipelineOptions,
    cutter: Cutter,
    segment_len: usize,
    known: &(dyn Fn(&ObjectId) -> bool + Sync),
    deliver: &mut F,
) -> Result<(), E>
where
    R: Read + Send,
    E: From<Error> + Send,
    F: FnMut(SealedChunk) -> Result<(), E> + Send,
{
    assert!(
        segment_len >= 2 * cutter.params().max_size as usize,
        "segments must hold at least two chunks of the maximum size"
    );
    // Build the sealers first, so that a bad zstd level fails before any thread runs.
    let mut sealers = (0..options.threads)
        .map(|_| Sealer::new(keys, options.zstd_level))
        .collect::<Result<Vec<_>, _>>()?;
    let shared = Shared {
        cutter,
        segment_len,
        known,
        source: Mutex::new(Source {
            reader,
            next_segment: 0,
            offset: 0,
            done: false,
        }),
        seam: Mutex::new(Seam {
            next_segment: 0,
            carry: Vec::new(),
            next_sequence: 0,
        }),
        seam_turn: Condvar::new(),
        output: Mutex::new(Output {
            sink: deliver,
            pending: BTreeMap::new(),
            expected: 0,
            permits: options.threads + 1,
            failure: None,
        }),
        room: Condvar::new(),
        stop: AtomicBool::new(false),
    };
    let own = sealers.pop().expect("threads > 1, so there are sealers");
    let panicked = thread::scope(|scope| {
        let shared = &shared;
        let helpers: Vec<_> = sealers
            .into_iter()
            .map(|sealer| scope.spawn(move || shared.work(sealer)))
            .collect();
        shared.work(own);
        helpers.into_iter().any(|h| h.join().is_err())
    });
    // A thread that panicked left a gap: never end the stream short silently.
    let output = shared
        .output
        .into_inner()
        .map_err(|_| Error::WorkerPanicked)?;
    match output.failure {
        Some(error) => Err(error),
        None if panicked || !output.pending.is_empty() => Err(Error::WorkerPanicked.into()),
        None => Ok(()),
    }
}

/// What the pipeline's threads share.
struct Shared<'k, R, F, E> {
    cutter: Cutter,
    segment_len: usize,
    /// Whether a chunk's id is held already (then it is not sealed).
    known: &'k (dyn Fn(&ObjectId) -> bool + Sync),
    source: Mutex<Source<R>>,
    seam: Mutex<Seam>,
    /// Signalled when a segment has been resolved, or the run fails.
    seam_turn: Condvar,
    output: Mutex<Output<F, E>>,
    /// Signalled when permits come back, or the run fails.
    room: Condvar,
    /// Set once the run has failed: every thread stops at its next step.
    stop: AtomicBool,
}

/// The reading end: segments are numbered in the order they are read.
struct Source<R> {
    reader: R,
    next_segment: u64,
    offset: u64,
    done: bool,
}

/// The sequential part: the carry across the seam, and chunk numbering.
struct Seam {
    next_segment: u64,
    /// The bytes since the last true cut, from the end of the previous segment.
    carry: Vec<u8>,
    next_sequence: u64,
}

/// The delivering end: chunks sealed out of order wait here for their turn.
struct Output<F, E> {
    sink: F,
    pending: BTreeMap<u64, Delivery>,
    expected: u64,
    /// Segments that may still be read before earlier ones are delivered.
    permits: usize,
    failure: Option<E>,
}

/// A sealed chunk (or the error in its place) and whether its segment ends with it.
struct Delivery {
    sealed: Result<SealedChunk, Error>,
    ends_segment: bool,
}

/// A segment, read and cut: where it starts in the stream and whether it is the last.
struct ReadSegment {
    index: u64,
    offset: u64,
    last: bool,
}

/// A segment's turn at the seam: the number of its first chunk, and its chunks (or
/// the read error in their place).
struct Turn {
    sequence: u64,
    outcome: Result<Resolution, Error>,
}

/// A segment's true chunks, and the length of the carry its first chunk began with.
struct Resolution {
    read: ReadSegment,
    resolved: Resolved,
    carried: u64,
}

/// Wakes the other threads with a failure if the thread holding it unwinds.
struct PanicAlarm<'a, 'k, R, F, E: From<Error>>(&'a Shared<'k, R, F, E>);

impl<R, F, E: From<Error>> Drop for PanicAlarm<'_, '_, R, F, E> {
    fn drop(&mut self) {
        if thread::panicking() {
            // A lock is poisoned if the panic struck while it was held; its state is
            // still good enough to record a failure in.
            let mut output = self.0.output.lock().unwrap_or_else(|p| p.into_inner());
            output
                .failure
                .get_or_insert_with(|| Error::WorkerPanicked.into());
            drop(output);
            self.0.halt();
        }
    }
}

impl<R, F, E> Shared<'_, R, F, E> {
    /// Tells every thread to stop, waking those that sleep.
    fn halt(&self) {
        self.stop.store(true, Ordering::SeqCst);
        // Take each lock before notifying, so that no thread can test `stop` and
        // then miss the wake-up.
        drop(self.output.lock());
        self.room.notify_all();
        drop(self.seam.lock());
        self.seam_turn.notify_all();
    }
}

impl<R, F, E> Shared<'_, R, F, E>
where
    R: Read,
    E: From<Error>,
    F: FnMut(SealedChunk) -> Result<(), E>,
{
    /// One thread's loop: permit, read, cut, resolve, seal, deliver. Returns when the
    /// stream has ended, or the run has failed.
    fn work(&self, mut sealer: Sealer<'_>) {
        let _alarm = PanicAlarm(self);
        let mut segment = Vec::new();
        let mut cuts = Vec::new();
        while self.take_permit() {
            let Some(read) = self.read_segment(&mut segment) else {
                self.give_permits(1);
                return;
            };
            if let Ok(read) = &read {
                speculative_cuts(&self.cutter, &segment, read.last, &mut cuts);
            }
            let Some(turn) = self.resolve_in_turn(read, &segment, &cuts) else {
                return;
            };
            let Resolution {
                read,
                resolved,
                carried,
            } = match turn.outcome {
                Ok(resolution) => resolution,
                Err(error) => {
                    self.deliver(turn.sequence, Err(error), true);
                    return;
                }
            };
            let count = resolved.carried.len() + resolved.ranges.len();
            if count == 0 {
                self.give_permits(1);
                continue;
            }
            let mut carried_offset = read.offset - carried;
            let seam = resolved.carried.iter().map(|bytes| {
                let offset = carried_offset;
                carried_offset += bytes.len() as u64;
                (offset, bytes.as_slice())
            });
            let inside = resolved
                .ranges
                .iter()
                .map(|r| (read.offset + r.start as u64, &segment[r.clone()]));
            let chunks = (turn.sequence..).zip(seam.chain(inside)).enumerate();
            for (n, (sequence, (offset, data))) in chunks {
                if self.stop.load(Ordering::SeqCst) {
                    return;
                }
                let span = ChunkSpan {
                    offset,
                    len: u32::try_from(data.len()).expect("a chunk is at most max_size, a u32"),
                };
                let sealed = seal_unless_known(&mut sealer, self.known, span, data);
                self.deliver(sequence, sealed, n + 1 == count);
            }
        }
    }

    /// Waits for a permit to read a segment; `false` if the run has failed.
    fn take_permit(&self) -> bool {
        let Ok(mut output) = self.output.lock() else {
            return false;
        };
        while output.permits == 0 && !self.stop.load(Ordering::SeqCst) {
            let Ok(next) = self.room.wait(output) else {
                return false;
            };
            output = next;
        }
        if self.stop.load(Ordering::SeqCst) {
            return false;
        }
        output.permits -= 1;
        true
    }

    fn give_permits(&self, count: usize) {
        if let Ok(mut output) = self.output.lock() {
            output.permits += count;
            self.room.notify_all();
        }
    }

    /// Reads the next segment into `buffer`. `None` once the stream has ended or
    /// failed; a read error comes back once, in place of its segment.
    fn read_segment(&self, buffer: &mut Vec<u8>) -> Option<Result<ReadSegment, (u64, Error)>> {
        let mut source = self.source.lock().ok()?;
        if source.done {
            return None;
        }
        let index = source.next_segment;
        source.next_segment += 1;
        buffer.resize(self.segment_len, 0);
        let mut filled = 0;
        while filled < buffer.len() {
            match source.reader.read(&mut buffer[filled..]) {
                Ok(0) => break,
                Ok(read) => filled += read,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source_error) => {
                    source.done = true;
                    let offset = source.offset + filled as u64;
                    return Some(Err((
                        index,
                        Error::Read {
                            offset,
                            source: source_error,
                        },
                    )));
                }
            }
        }
        buffer.truncate(filled);
        let offset = source.offset;
        source.offset += filled as u64;
        // A short read means the end; a full segment is followed by at least one
        // more read, which finds the end if nothing else.
        let last = filled < self.segment_len;
        source.done = last;
        Some(Ok(ReadSegment {
            index,
            offset,
            last,
        }))
    }

    /// Waits for this segment's turn at the seam and resolves its true cuts; `None`
    /// if the run has failed.
    fn resolve_in_turn(
        &self,
        read: Result<ReadSegment, (u64, Error)>,
        segment: &[u8],
        cuts: &[usize],
    ) -> Option<Turn> {
        let index = match &read {
            Ok(read) => read.index,
            Err((index, _)) => *index,
        };
        let mut seam = self.seam.lock().ok()?;
        while seam.next_segment != index && !self.stop.load(Ordering::SeqCst) {
            seam = self.seam_turn.wait(seam).ok()?;
        }
        if self.stop.load(Ordering::SeqCst) {
            return None;
        }
        let sequence = seam.next_sequence;
        let outcome = match read {
            Err((_, error)) => {
                seam.next_sequence += 1;
                Err(error)
            }
            Ok(read) => {
                let resolved = resolve(&self.cutter, &seam.carry, segment, cuts, read.last);
                let carried = seam.carry.len() as u64;
                seam.next_sequence += (resolved.carried.len() + resolved.ranges.len()) as u64;
                seam.carry.clear();
                seam.carry
                    .extend_from_slice(&segment[resolved.carry_from..]);
                Ok(Resolution {
                    read,
                    resolved,
                    carried,
                })
            }
        };
        seam.next_segment += 1;
        drop(seam);
        self.seam_turn.notify_all();
        Some(Turn { sequence, outcome })
    }

    /// Files a sealed chunk and hands every chunk now in order to the sink.
    fn deliver(&self, sequence: u64, sealed: Result<SealedChunk, Error>, ends_segment: bool) {
        let Ok(mut output) = self.output.lock() else {
            return;
        };
        output.pending.insert(
            sequence,
            Delivery {
                sealed,
                ends_segment,
            },
        );
        let mut freed = 0;
        let mut failed = false;
        while output.failure.is_none() {
            let expected = output.expected;
            let Some(delivery) = output.pending.remove(&expected) else {
                break;
            };
            output.expected += 1;
            freed += usize::from(delivery.ends_segment);
            if let Err(error) = delivery
                .sealed
                .map_err(E::from)
                .and_then(|c| (output.sink)(c))
            {
                output.failure = Some(error);
                failed = true;
            }
        }
        output.permits += freed;
        drop(output);
        if failed {
            self.halt();
        } else if freed > 0 {
            self.room.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use homing_crypto::MasterKey;

    use super::*;
    use crate::object::open_object;

    fn keys() -> KeyRing {
        MasterKey::from_bytes(&mut [5; 32]).key_ring()
    }

    fn data(len: usize) -> Vec<u8> {
        let mut state = 0x1234_5678_u32;
        (0..len)
            .map(|i| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                if i % 3 == 0 {
                    b'a'
                } else {
                    (state >> 24) as u8
                }
            })
            .collect()
    }

    fn run(input: &[u8], threads: usize) -> (StreamSummary, Vec<SealedChunk>) {
        let keys = keys();
        let mut chunks = Vec::new();
        let options = PipelineOptions {
            threads,
            zstd_level: 3,
        };
        let summary = seal_stream::<_, Error, _>(input, &keys, options, |c| {
            chunks.push(c);
            Ok(())
        })
        .unwrap();
        (summary, chunks)
    }

    #[test]
    fn parallel_and_serial_runs_agree_and_restore_the_input() {
        let input = data(3_000_000);
        let (serial_summary, serial) = run(&input, 1);
        let (parallel_summary, parallel) = run(&input, 3);
        assert_eq!(serial_summary.bytes_read, input.len() as u64);
        assert_eq!(serial_summary.chunks, serial.len() as u64);
        assert_eq!(serial_summary, parallel_summary);
        let ids =
            |chunks: &[SealedChunk]| chunks.iter().map(|c| (c.span, c.id)).collect::<Vec<_>>();
        assert_eq!(ids(&serial), ids(&parallel));

        let keys = keys();
        let mut restored = Vec::new();
        for chunk in &parallel {
            assert_eq!(chunk.span.offset, restored.len() as u64);
            let object = chunk.object.as_ref().unwrap();
            assert_eq!(object.id, chunk.id);
            restored
                .extend(open_object(&keys, ObjectKind::Chunk, &chunk.id, &object.bytes).unwrap());
        }
        assert_eq!(restored, input);
    }

    #[test]
    fn known_chunks_are_handed_over_unsealed_and_only_new_ones_sealed() {
        let input = data(3_000_000);
        let (_, first) = run(&input, 1);
        // Every other chunk is known; the rest must come sealed, the same as before.
        let known: std::collections::HashSet<ObjectId> =
            first.iter().step_by(2).map(|c| c.id).collect();
        let keys = keys();
        for threads in [1, 3] {
            let mut chunks = Vec::new();
            let options = PipelineOptions {
                threads,
                zstd_level: 3,
            };
            let summary = seal_new_chunks::<_, Error, _>(
                &input[..],
                &keys,
                options,
                &|id| known.contains(id),
                |c| {
                    chunks.push(c);
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(chunks.len(), first.len());
            assert_eq!(summary.known, known.len() as u64);
            let mut sealed = 0;
            for (chunk, before) in chunks.iter().zip(&first) {
                assert_eq!((chunk.span, chunk.id), (before.span, before.id));
                match &chunk.object {
                    None => assert!(known.contains(&chunk.id)),
                    Some(object) => {
                        assert!(!known.contains(&chunk.id));
                        let at = chunk.span.offset as usize;
                        let plain = open_object(&keys, ObjectKind::Chunk, &chunk.id, &object.bytes)
                            .unwrap();
                        assert_eq!(plain, &input[at..at + chunk.span.len as usize]);
                        sealed += object.bytes.len() as u64;
                    }
                }
            }
            assert_eq!(summary.bytes_sealed, sealed, "{threads} threads");
        }
    }

    #[test]
    fn many_small_segments_give_the_sequential_cut_points() {
        let small = ChunkerParams {
            min_size: 256,
            avg_size: 1024,
            max_size: 4096,
            normalization: 2,
        };
        // Random bytes, long runs of zeros (where speculative and true chains may
        // never meet) and text, over a few hundred seams.
        let mut input = data(400_000);
        input.extend(std::iter::repeat_n(0_u8, 100_003));
        input.extend(data(200_001));
        input.extend("text ".repeat(20_000).bytes());
        let keys = keys();
        let mut expected = Vec::new();
        let mut chunker = Chunker::with_params(&input[..], small, keys.chunker_seed());
        while let Some((span, _)) = chunker.next_chunk().unwrap() {
            expected.push(span);
        }
        for (threads, segment_len) in [(2, 8192), (3, 8193), (4, 50_000)] {
            let mut spans = Vec::new();
            let options = PipelineOptions {
                threads,
                zstd_level: 1,
            };
            let cutter = Cutter::new(small, keys.chunker_seed());
            run_segments::<_, Error, _>(
                &input[..],
                &keys,
                options,
                cutter,
                segment_len,
                &|_| false,
                &mut |c: SealedChunk| {
                    assert_eq!(
                        c.id,
                        keys.object_id(&input[c.span.offset as usize..][..c.span.len as usize])
                    );
                    spans.push(c.span);
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(
                spans, expected,
                "{threads} threads, segments of {segment_len}"
            );
        }
    }

    #[test]
    fn a_read_error_stops_the_pipeline_and_names_the_offset() {
        struct FailsAt(usize);
        impl Read for FailsAt {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("bad sector"));
                }
                let n = out.len().min(self.0);
                out[..n].fill(7);
                self.0 -= n;
                Ok(n)
            }
        }
        for threads in [1, 2] {
            let keys = keys();
            let result = seal_stream::<_, Error, _>(
                FailsAt(2_500_000),
                &keys,
                PipelineOptions {
                    threads,
                    zstd_level: 3,
                },
                |_| Ok(()),
            );
            match result {
                Err(Error::Read { offset, source }) => {
                    assert_eq!(source.to_string(), "bad sector");
                    assert!(offset <= 2_500_000, "{offset}");
                }
                other => panic!("expected a read error, got {other:?}"),
            }
        }
    }

    #[test]
    fn a_panicking_sink_does_not_hang_the_other_threads() {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let keys = keys();
            let input = data(3_000_000);
            let mut calls = 0;
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                seal_stream::<_, Error, _>(
                    &input[..],
                    &keys,
                    PipelineOptions {
                        threads: 3,
                        zstd_level: 1,
                    },
                    |_| {
                        calls += 1;
                        assert!(calls < 3, "sink gives up");
                        Ok(())
                    },
                )
            }));
            // Either the panic reached the caller (it struck on the calling thread)
            // or it was turned into an error (it struck on a helper).
            let fine = match result {
                Err(_) => true,
                Ok(result) => matches!(result, Err(Error::WorkerPanicked)),
            };
            done_tx.send(fine).unwrap();
        });
        let fine = done_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the pipeline hung after a panic");
        assert!(fine);
    }

    #[test]
    fn a_sink_error_stops_the_pipeline() {
        let keys = keys();
        let input = data(2_000_000);
        let mut calls = 0;
        let result = seal_stream::<_, Error, _>(
            &input[..],
            &keys,
            PipelineOptions {
                threads: 2,
                zstd_level: 3,
            },
            |_| {
                calls += 1;
                Err(Error::WorkerPanicked)
            },
        );
        assert!(matches!(result, Err(Error::WorkerPanicked)));
        assert_eq!(calls, 1);
    }
}
