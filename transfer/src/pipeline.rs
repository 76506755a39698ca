//! The sealing pipeline: chunk a stream, then id, compress and seal every chunk, on
//! as many threads as asked, handing the sealed chunks to a sink in stream order.
//!
//! ```text
//!            lock: source                      lock: output
//!          ┌──────────────┐                 ┌──────────────────────┐
//! reader ─▶│ chunker, seq │─▶ cut + copy ─▶ │ reorder ─▶ sink(...) │
//!          └──────────────┘   id, zstd,     └──────────────────────┘
//!                             seal (no lock)
//!             every one of the `threads` threads (the caller's included) runs
//!             this loop: take a permit, cut, seal, deliver what is in order
//! ```
//!
//! There is no dedicated chunker, collector or dispatcher thread: each of exactly
//! `threads` threads cuts its own next chunk under the source lock (cutting is
//! sequential), seals it with no lock held, and then, under the output lock, files
//! it and hands every chunk that is now in order to the sink. A thread that waits
//! sleeps on a condition variable, so no core spins. (Measured on two cores against
//! a chunker thread feeding workers through channels: see `docs/ARCHITECTURE.md`.)
//!
//! Memory is bounded: a thread needs a permit to cut, and a permit comes back only
//! when its chunk has gone to the sink, so at most `4 × threads` chunks are cut and
//! not yet delivered, however fast or slow the threads and the sink are.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::{Condvar, Mutex};
use std::thread;

use homing_crypto::{KeyRing, ObjectKind};

use crate::chunker::{ChunkSpan, Chunker};
use crate::error::Error;
use crate::object::{DEFAULT_ZSTD_LEVEL, SealedObject, Sealer};

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

/// A chunk of the stream, sealed.
#[derive(Debug)]
pub struct SealedChunk {
    /// Where the chunk lies in the stream.
    pub span: ChunkSpan,
    /// The sealed object.
    pub object: SealedObject,
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
        summary.bytes_sealed += chunk.object.bytes.len() as u64;
        sink(chunk)
    };
    if options.threads <= 1 {
        let mut sealer = Sealer::new(keys, options.zstd_level)?;
        let mut chunker = Chunker::new(reader, keys.chunker_seed());
        while let Some((span, data)) = next(&mut chunker)? {
            let object = sealer.seal(ObjectKind::Chunk, data)?;
            deliver(SealedChunk { span, object })?;
        }
    } else {
        run_parallel(reader, keys, options, &mut deliver)?;
    }
    Ok(summary)
}

fn next<R: Read>(chunker: &mut Chunker<R>) -> Result<Option<(ChunkSpan, &[u8])>, Error> {
    let offset = chunker.position();
    chunker
        .next_chunk()
        .map_err(|source| Error::Read { offset, source })
}

fn run_parallel<R, E, F>(
    reader: R,
    keys: &KeyRing,
    options: PipelineOptions,
    deliver: &mut F,
) -> Result<(), E>
where
    R: Read + Send,
    E: From<Error> + Send,
    F: FnMut(SealedChunk) -> Result<(), E> + Send,
{
    // Build the sealers first, so that a bad zstd level fails before any thread runs.
    let mut sealers = (0..options.threads)
        .map(|_| Sealer::new(keys, options.zstd_level))
        .collect::<Result<Vec<_>, _>>()?;
    let shared = Shared {
        source: Mutex::new(Source {
            chunker: Chunker::new(reader, keys.chunker_seed()),
            sequence: 0,
            done: false,
        }),
        output: Mutex::new(Output {
            sink: deliver,
            pending: BTreeMap::new(),
            expected: 0,
            permits: 4 * options.threads,
            failure: None,
        }),
        room: Condvar::new(),
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
    let output = shared
        .output
        .into_inner()
        .map_err(|_| Error::WorkerPanicked)?;
    match output.failure {
        Some(error) => Err(error),
        // A thread that panicked left a gap: never end the stream short silently.
        None if panicked || !output.pending.is_empty() => Err(Error::WorkerPanicked.into()),
        None => Ok(()),
    }
}

/// Wakes the other threads with a failure if the thread holding it unwinds.
struct PanicAlarm<'a, R, F, E: From<Error>>(&'a Shared<R, F, E>);

impl<R, F, E: From<Error>> Drop for PanicAlarm<'_, R, F, E> {
    fn drop(&mut self) {
        if thread::panicking() {
            // The output lock is poisoned if the panic struck while it was held;
            // its state is still good enough to record a failure in.
            let mut output = self.0.output.lock().unwrap_or_else(|p| p.into_inner());
            output
                .failure
                .get_or_insert_with(|| Error::WorkerPanicked.into());
            self.0.room.notify_all();
        }
    }
}

/// What the pipeline's threads share.
struct Shared<R, F, E> {
    source: Mutex<Source<R>>,
    output: Mutex<Output<F, E>>,
    /// Signalled when permits come back or the run fails.
    room: Condvar,
}

/// The shared end of the stream: the chunker and the number of the next chunk.
struct Source<R> {
    chunker: Chunker<R>,
    sequence: u64,
    done: bool,
}

/// The shared end of the sink: chunks sealed out of order wait here for their turn.
struct Output<F, E> {
    sink: F,
    pending: BTreeMap<u64, Result<SealedChunk, Error>>,
    expected: u64,
    permits: usize,
    failure: Option<E>,
}

impl<R, F, E> Shared<R, F, E>
where
    R: Read,
    E: From<Error>,
    F: FnMut(SealedChunk) -> Result<(), E>,
{
    /// One thread's loop: take a permit, cut, seal, deliver. Returns when the stream
    /// has ended, or the run has failed (or a thread panicked: the locks are poisoned).
    fn work(&self, mut sealer: Sealer<'_>) {
        // If this thread panics (a bug, or a panicking sink), the others may be
        // asleep waiting for its chunk: mark the run failed and wake them.
        let _alarm = PanicAlarm(self);
        let mut buffer = Vec::new();
        loop {
            {
                let Ok(mut output) = self.output.lock() else {
                    return;
                };
                while output.permits == 0 && output.failure.is_none() {
                    let Ok(next) = self.room.wait(output) else {
                        return;
                    };
                    output = next;
                }
                if output.failure.is_some() {
                    return;
                }
                output.permits -= 1;
            }
            let Some((sequence, cut)) = self.cut_next(&mut buffer) else {
                return;
            };
            let sealed = cut.and_then(|span| {
                let object = sealer.seal(ObjectKind::Chunk, &buffer)?;
                Ok(SealedChunk { span, object })
            });
            let Ok(mut output) = self.output.lock() else {
                return;
            };
            output.pending.insert(sequence, sealed);
            let mut freed = 0;
            while output.failure.is_none() {
                let expected = output.expected;
                let Some(sealed) = output.pending.remove(&expected) else {
                    break;
                };
                output.expected += 1;
                freed += 1;
                if let Err(error) = sealed.map_err(E::from).and_then(|c| (output.sink)(c)) {
                    output.failure = Some(error);
                }
            }
            output.permits += freed;
            if freed > 0 || output.failure.is_some() {
                self.room.notify_all();
            }
        }
    }

    /// Cuts the next chunk into `buffer` under the source lock. `None` once the
    /// stream has ended or failed; a read error comes back once, with its sequence
    /// number, so that it is reported in stream order.
    fn cut_next(&self, buffer: &mut Vec<u8>) -> Option<(u64, Result<ChunkSpan, Error>)> {
        let mut source = self.source.lock().ok()?;
        if source.done {
            return None;
        }
        let sequence = source.sequence;
        source.sequence += 1;
        match next(&mut source.chunker) {
            Ok(Some((span, data))) => {
                buffer.clear();
                buffer.extend_from_slice(data);
                Some((sequence, Ok(span)))
            }
            Ok(None) => {
                source.done = true;
                None
            }
            Err(error) => {
                source.done = true;
                Some((sequence, Err(error)))
            }
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
        let ids = |chunks: &[SealedChunk]| {
            chunks
                .iter()
                .map(|c| (c.span, c.object.id))
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&serial), ids(&parallel));

        let keys = keys();
        let mut restored = Vec::new();
        for chunk in &parallel {
            assert_eq!(chunk.span.offset, restored.len() as u64);
            restored.extend(
                open_object(
                    &keys,
                    ObjectKind::Chunk,
                    &chunk.object.id,
                    &chunk.object.bytes,
                )
                .unwrap(),
            );
        }
        assert_eq!(restored, input);
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
