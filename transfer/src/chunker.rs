//! Content-defined chunking: FastCDC (2020) over any reader, with a key-seeded gear table.
//!
//! Cut points are part of the format: the same bytes under the same key must always
//! be cut at the same places, or deduplication against earlier backups is lost. The
//! parameters are pinned in [`ChunkerParams::V1`] and guarded by golden vectors.

use std::borrow::Cow;
use std::io::{self, Read};

use fastcdc::v2020::{self, Normalization};

/// Chunk size parameters. Sizes are even, as FastCDC requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkerParams {
    /// No chunk is smaller, except the last one of a stream.
    pub min_size: u32,
    /// The size FastCDC aims at.
    pub avg_size: u32,
    /// No chunk is larger.
    pub max_size: u32,
    /// FastCDC's normalization level (0-3): higher keeps sizes closer to the average.
    pub normalization: u8,
}

impl ChunkerParams {
    /// The parameters of chunker format 1, chosen by measurement
    /// (`docs/decisions/0002-chunk-size.md`). Never change them in place: a change is
    /// a new chunker format.
    pub const V1: Self = Self {
        min_size: 16 * 1024,
        avg_size: 32 * 1024,
        max_size: 128 * 1024,
        normalization: 2,
    };

    fn level(&self) -> Normalization {
        match self.normalization {
            0 => Normalization::Level0,
            1 => Normalization::Level1,
            2 => Normalization::Level2,
            _ => Normalization::Level3,
        }
    }

    /// Checks the parameters against FastCDC's limits.
    ///
    /// # Errors
    /// A description of the first limit broken.
    pub fn validate(&self) -> Result<(), String> {
        let (min, avg, max) = (self.min_size, self.avg_size, self.max_size);
        let even = min % 2 == 0 && avg % 2 == 0 && max % 2 == 0;
        let in_range = (v2020::MINIMUM_MIN..=v2020::MINIMUM_MAX).contains(&(min as usize))
            && (v2020::AVERAGE_MIN..=v2020::AVERAGE_MAX).contains(&(avg as usize))
            && (v2020::MAXIMUM_MIN..=v2020::MAXIMUM_MAX).contains(&(max as usize));
        let ordered = min <= avg && avg <= max;
        if !(even && in_range && ordered && self.normalization <= 3) {
            return Err(format!(
                "chunk sizes min {min}, avg {avg}, max {max}, normalization {} are outside \
                 FastCDC's limits (even sizes, min <= avg <= max, normalization 0-3)",
                self.normalization
            ));
        }
        Ok(())
    }
}

/// FastCDC's cut decision under fixed parameters and seed: where the chunk that
/// starts at the beginning of a slice ends.
///
/// The decision depends only on the bytes from the chunk's start, so it can be taken
/// anywhere in a stream once the start is known; [`Chunker`] takes it in stream
/// order, and the parallel pipeline also speculatively from guessed starts.
#[derive(Debug, Clone)]
pub(crate) struct Cutter {
    params: ChunkerParams,
    mask_s: u64,
    mask_l: u64,
    gear: Cow<'static, [u64]>,
    gear_ls: Cow<'static, [u64]>,
}

impl Cutter {
    /// # Panics
    /// If `params` fail [`ChunkerParams::validate`].
    pub(crate) fn new(params: ChunkerParams, seed: u64) -> Self {
        if let Err(problem) = params.validate() {
            panic!("{problem}");
        }
        let (mask_s, mask_l) = v2020::select_masks(params.avg_size as usize, params.level());
        let (gear, gear_ls) = v2020::get_gear_with_seed(seed);
        Self {
            params,
            mask_s,
            mask_l,
            gear,
            gear_ls,
        }
    }

    pub(crate) fn params(&self) -> ChunkerParams {
        self.params
    }

    /// Length of the chunk that starts at `data[0]`. A result below `data.len()`, or
    /// equal to `max_size`, is a cut whatever follows; a result of `data.len()` below
    /// `max_size` only means that the data ended first.
    pub(crate) fn cut(&self, data: &[u8]) -> usize {
        v2020::cut_gear(
            data,
            self.params.min_size as usize,
            self.params.avg_size as usize,
            self.params.max_size as usize,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
            &self.gear,
            &self.gear_ls,
        )
        .1
    }
}

/// Cuts a byte stream into content-defined chunks, reading it once, in large blocks.
///
/// [`Chunker::next_chunk`] lends each chunk from an internal buffer, so chunking
/// itself allocates nothing per chunk.
pub struct Chunker<R> {
    reader: R,
    cutter: Cutter,
    buffer: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    offset: u64,
}

/// Where a chunk lies in its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSpan {
    /// Byte offset of the chunk's first byte in the stream.
    pub offset: u64,
    /// Length of the chunk.
    pub len: u32,
}

impl<R: Read> Chunker<R> {
    /// A chunker with the pinned [`ChunkerParams::V1`] and the key's gear seed
    /// ([`homing_crypto::KeyRing::chunker_seed`]).
    pub fn new(reader: R, seed: u64) -> Self {
        Self::with_params(reader, ChunkerParams::V1, seed)
    }

    /// A chunker with other parameters, for measurements and tests.
    ///
    /// # Panics
    /// If `params` fail [`ChunkerParams::validate`].
    pub fn with_params(reader: R, params: ChunkerParams, seed: u64) -> Self {
        Self::with_buffer(reader, params, seed, Vec::new())
    }

    /// A chunker with the pinned [`ChunkerParams::V1`] that works in `buffer`,
    /// which [`Chunker::into_buffer`] gives back: a caller that chunks many small
    /// files allocates (and zeroes) the buffer once, not once a file.
    pub fn reusing(reader: R, seed: u64, buffer: Vec<u8>) -> Self {
        Self::with_buffer(reader, ChunkerParams::V1, seed, buffer)
    }

    fn with_buffer(reader: R, params: ChunkerParams, seed: u64, mut buffer: Vec<u8>) -> Self {
        let cutter = Cutter::new(params, seed);
        // Several maximum-sized chunks per refill keep the cost of moving the tail
        // of the buffer to its front small against the bytes chunked.
        let capacity = (8 * params.max_size as usize).max(1 << 20);
        buffer.resize(capacity, 0);
        Self {
            reader,
            cutter,
            buffer,
            start: 0,
            end: 0,
            eof: false,
            offset: 0,
        }
    }

    /// Gives back the buffer, for [`Chunker::reusing`].
    pub fn into_buffer(self) -> Vec<u8> {
        self.buffer
    }

    /// The next chunk and where it lies, or `None` at the end of the stream.
    ///
    /// # Errors
    /// The reader's error; `Interrupted` reads are retried.
    pub fn next_chunk(&mut self) -> io::Result<Option<(ChunkSpan, &[u8])>> {
        if self.end - self.start < self.cutter.params().max_size as usize && !self.eof {
            self.refill()?;
        }
        let available = &self.buffer[self.start..self.end];
        if available.is_empty() {
            return Ok(None);
        }
        let len = self.cutter.cut(available);
        let span = ChunkSpan {
            offset: self.offset,
            len: u32::try_from(len).expect("a chunk is at most max_size, a u32"),
        };
        let chunk = &self.buffer[self.start..self.start + len];
        self.start += len;
        self.offset += len as u64;
        Ok(Some((span, chunk)))
    }

    /// Total bytes handed out as chunks so far.
    pub fn position(&self) -> u64 {
        self.offset
    }

    /// Gives back the reader.
    pub fn into_inner(self) -> R {
        self.reader
    }

    fn refill(&mut self) -> io::Result<()> {
        self.buffer.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        while self.end < self.buffer.len() {
            match self.reader.read(&mut self.buffer[self.end..]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(read) => self.end += read,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// A reader that hands out its data in pieces of the given sizes, in turn.
    struct Jagged<'a> {
        data: &'a [u8],
        sizes: Vec<usize>,
        turn: usize,
    }

    impl Read for Jagged<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let size = self.sizes[self.turn % self.sizes.len()].max(1);
            self.turn += 1;
            let n = size.min(out.len()).min(self.data.len());
            out[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    const SMALL: ChunkerParams = ChunkerParams {
        min_size: 256,
        avg_size: 1024,
        max_size: 4096,
        normalization: 2,
    };

    fn chunks(reader: impl Read, params: ChunkerParams, seed: u64) -> Vec<Vec<u8>> {
        let mut chunker = Chunker::with_params(reader, params, seed);
        let mut out = Vec::new();
        while let Some((span, chunk)) = chunker.next_chunk().unwrap() {
            assert_eq!(span.len as usize, chunk.len());
            out.push(chunk.to_vec());
        }
        out
    }

    fn noise(len: usize, seed: u8) -> Vec<u8> {
        let mut out = vec![0; len];
        let mut reader = xorshift(seed);
        reader.read_exact(&mut out).unwrap();
        out
    }

    fn xorshift(seed: u8) -> impl Read {
        // Deterministic, incompressible test data.
        struct Xof(u64, [u8; 8]);
        impl Read for Xof {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                for byte in out.iter_mut() {
                    // xorshift64*: plenty for test data.
                    self.0 ^= self.0 >> 12;
                    self.0 ^= self.0 << 25;
                    self.0 ^= self.0 >> 27;
                    *byte = (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8 ^ self.1[0];
                }
                Ok(out.len())
            }
        }
        Xof(0x9e37_79b9_7f4a_7c15 ^ u64::from(seed), [seed; 8])
    }

    #[test]
    fn pinned_parameters_are_valid() {
        ChunkerParams::V1.validate().unwrap();
    }

    #[test]
    fn cut_points_match_fastcdc_on_the_whole_buffer() {
        let data = noise(3 << 20, 1);
        let ours = chunks(&data[..], ChunkerParams::V1, 77);
        let theirs: Vec<Vec<u8>> = v2020::FastCDC::with_level_and_seed(
            &data,
            16 * 1024,
            32 * 1024,
            128 * 1024,
            Normalization::Level2,
            77,
        )
        .map(|c| data[c.offset..c.offset + c.length].to_vec())
        .collect();
        assert_eq!(ours, theirs);
    }

    /// Golden cut points: chunk lengths of fixed data under fixed seeds, checked in,
    /// so that no change here or in fastcdc can move them silently. Rewrite the
    /// file (only with a new chunker format) with
    /// `HOMING_BLESS=1 cargo test -p homing-transfer golden`.
    #[test]
    fn golden_cut_points_are_pinned() {
        const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/chunker-v1.json");
        // Noise, a run of zeros (forces maximum-size cuts) and repeated text.
        let mut data = noise(3 << 20, 9);
        data.extend(std::iter::repeat_n(0_u8, 600_000));
        data.extend("Homing backs up roaming laptops. ".repeat(20_000).bytes());
        // The seed of the master key in crypto's known-answer vectors, and no seed.
        let seeds = [11_995_808_851_234_589_779_u64, 0];
        let computed: Vec<(u64, Vec<usize>)> = seeds
            .iter()
            .map(|&seed| {
                (
                    seed,
                    chunks(&data[..], ChunkerParams::V1, seed)
                        .iter()
                        .map(Vec::len)
                        .collect(),
                )
            })
            .collect();
        let as_json = serde_json::json!({
            "params": format!("{:?}", ChunkerParams::V1),
            "data": "xorshift noise 3 MiB (seed 9), 600000 zero bytes, 20000 x 'Homing backs up roaming laptops. '",
            "seeds": computed.iter().map(|(seed, lengths)| serde_json::json!({"seed": seed, "lengths": lengths})).collect::<Vec<_>>(),
        });
        if std::env::var_os("HOMING_BLESS").is_some() {
            std::fs::write(PATH, serde_json::to_string_pretty(&as_json).unwrap() + "\n").unwrap();
        }
        let stored: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(PATH).expect("the vector file is checked in"),
        )
        .unwrap();
        assert_eq!(
            as_json, stored,
            "chunk cut points drifted: that breaks deduplication against old backups"
        );
    }

    #[test]
    fn the_seed_moves_the_cut_points() {
        let data = noise(1 << 20, 2);
        let a: Vec<usize> = chunks(&data[..], SMALL, 1).iter().map(Vec::len).collect();
        let b: Vec<usize> = chunks(&data[..], SMALL, 2).iter().map(Vec::len).collect();
        assert_ne!(a, b);
    }

    #[test]
    fn an_empty_stream_has_no_chunks() {
        assert!(chunks(&[][..], ChunkerParams::V1, 0).is_empty());
    }

    #[test]
    fn read_errors_surface() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        let mut chunker = Chunker::new(Broken, 0);
        assert_eq!(
            chunker.next_chunk().unwrap_err().to_string(),
            "disk on fire"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn chunk_then_join_is_the_input_for_any_reads(
            data in proptest::collection::vec(any::<u8>(), 0..40_000),
            sizes in proptest::collection::vec(1_usize..9_000, 1..8),
            seed: u64,
        ) {
            let whole = chunks(&data[..], SMALL, seed);
            let jagged = chunks(Jagged { data: &data, sizes, turn: 0 }, SMALL, seed);
            prop_assert_eq!(&whole, &jagged, "cut points depend on read sizes");
            prop_assert_eq!(whole.concat(), data);
            for chunk in &whole[..whole.len().saturating_sub(1)] {
                prop_assert!(chunk.len() >= 256 && chunk.len() <= 4096);
            }
        }
    }
}
