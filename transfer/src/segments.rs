//! Cutting one stream on several threads, with exactly the cut points of a
//! sequential [`Chunker`](crate::Chunker).
//!
//! The stream is read in segments of fixed length. Each thread cuts its own segment
//! *speculatively*, as if a chunk started at the segment's first byte. That guess is
//! usually wrong, but FastCDC's cut decision depends only on the bytes from a chunk's
//! start: as soon as the true chain of cuts, continued from the previous segment,
//! reaches a position where a speculative chunk starts, the two chains are the same
//! from there on. [`resolve`] continues the true chain across the seam until that
//! happens (typically after one or two chunks) and keeps the rest of the speculative
//! cuts. Only that short walk is sequential; if the chains never meet in a segment
//! (long runs of zeros, where every chunk has the maximum size, can do that), it
//! walks the whole segment, which is slower but still exact.

use std::ops::Range;

use crate::chunker::Cutter;

/// Cut points of `segment` when a chunk starts at its first byte: the end of every
/// chunk that is certain to end there, whatever follows the segment. For the last
/// segment of the stream, the end of the stream is such an end too.
pub(crate) fn speculative_cuts(cutter: &Cutter, segment: &[u8], last: bool, cuts: &mut Vec<usize>) {
    cuts.clear();
    let mut start = 0;
    while start < segment.len() {
        let end = start + cutter.cut(&segment[start..]);
        if !decided(cutter, start, end, segment.len(), last) {
            break;
        }
        cuts.push(end);
        start = end;
    }
}

/// Whether a cut found in a segment holds whatever follows the segment: it does
/// unless it falls on the segment's end (where the data merely ran out, or the last
/// byte went unexamined) short of the maximum chunk size. At the end of the stream
/// every cut holds.
fn decided(cutter: &Cutter, start: usize, end: usize, len: usize, last: bool) -> bool {
    end < len || last || end - start == cutter.params().max_size as usize
}

/// The true chunks of one segment, in order.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Resolved {
    /// The chunks that begin in the carry, in order: the last one ends in this
    /// segment; any before it lie wholly in the carry (see [`resolve`]).
    pub(crate) carried: Vec<Vec<u8>>,
    /// Chunks wholly inside this segment, as ranges of it.
    pub(crate) ranges: Vec<Range<usize>>,
    /// Where the bytes that the next segment's first chunk begins with start; the
    /// segment's length if none (always so for the last segment).
    pub(crate) carry_from: usize,
}

/// Continues the true chain of cuts from `carry` (the bytes since the last true cut,
/// fewer than `max_size`) through `segment`, given its `speculative` cuts. A
/// segment that is not the last must hold at least `max_size` bytes.
pub(crate) fn resolve(
    cutter: &Cutter,
    carry: &[u8],
    segment: &[u8],
    speculative: &[usize],
    last: bool,
) -> Resolved {
    let mut resolved = Resolved::default();
    let mut start = 0;
    let mut carry = carry;
    while !carry.is_empty() {
        // A chunk is at most max_size long, so this window holds all of the chunk
        // that starts in the carry.
        let need = segment.len().min(cutter.params().max_size as usize);
        let mut window = Vec::with_capacity(carry.len() + need);
        window.extend_from_slice(carry);
        window.extend_from_slice(&segment[..need]);
        let len = cutter.cut(&window);
        window.truncate(len);
        resolved.carried.push(window);
        if len < carry.len() {
            // FastCDC hashes two bytes a step, so a scan that stops at an odd length
            // leaves the last byte unexamined; with the next segment in view that
            // byte can turn out to be a cut. The chain goes on inside the carry.
            carry = &carry[len..];
            continue;
        }
        start = len - carry.len();
        break;
    }
    loop {
        if start == segment.len() {
            break;
        }
        if start == 0 || speculative.binary_search(&start).is_ok() {
            // The chains meet: every speculative cut after here is a true cut.
            let from = speculative.partition_point(|&cut| cut <= start);
            for &end in &speculative[from..] {
                resolved.ranges.push(start..end);
                start = end;
            }
            break;
        }
        let end = start + cutter.cut(&segment[start..]);
        if !decided(cutter, start, end, segment.len(), last) {
            break;
        }
        resolved.ranges.push(start..end);
        start = end;
    }
    resolved.carry_from = start;
    resolved
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::chunker::{Chunker, ChunkerParams};

    const SMALL: ChunkerParams = ChunkerParams {
        min_size: 256,
        avg_size: 1024,
        max_size: 4096,
        normalization: 2,
    };

    /// Chunks of `data` cut segment by segment, as the pipeline does.
    fn by_segments(
        data: &[u8],
        segment_len: usize,
        params: ChunkerParams,
        seed: u64,
    ) -> Vec<Vec<u8>> {
        let cutter = Cutter::new(params, seed);
        let mut chunks = Vec::new();
        let mut carry: Vec<u8> = Vec::new();
        let mut cuts = Vec::new();
        let mut segments: Vec<&[u8]> = data.chunks(segment_len).collect();
        if segments.is_empty() || data.len().is_multiple_of(segment_len) {
            segments.push(&[]); // the reader learns of the end with an empty read
        }
        let count = segments.len();
        for (i, segment) in segments.into_iter().enumerate() {
            let last = i + 1 == count;
            speculative_cuts(&cutter, segment, last, &mut cuts);
            let resolved = resolve(&cutter, &carry, segment, &cuts, last);
            chunks.extend(resolved.carried);
            chunks.extend(resolved.ranges.iter().map(|r| segment[r.clone()].to_vec()));
            carry = segment[resolved.carry_from..].to_vec();
            assert!(
                !last || carry.is_empty(),
                "the last segment leaves nothing behind"
            );
            assert!(carry.len() < params.max_size as usize);
        }
        chunks
    }

    fn sequential(data: &[u8], params: ChunkerParams, seed: u64) -> Vec<Vec<u8>> {
        let mut chunker = Chunker::with_params(data, params, seed);
        let mut out = Vec::new();
        while let Some((_, chunk)) = chunker.next_chunk().unwrap() {
            out.push(chunk.to_vec());
        }
        out
    }

    /// Random bytes with runs of zeros, where the chains may never meet.
    fn data() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..6000),
                (0_usize..20_000).prop_map(|n| vec![0; n]),
            ],
            0..8,
        )
        .prop_map(|parts| parts.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn segments_give_the_cut_points_of_the_sequential_chunker(
            data in data(),
            segment_len in 8192_usize..20_000,
            seed: u64,
        ) {
            prop_assert_eq!(by_segments(&data, segment_len, SMALL, seed), sequential(&data, SMALL, seed));
        }
    }

    #[test]
    fn pinned_parameters_agree_across_seams_too() {
        let mut data = vec![0_u8; 700_000];
        let mut state = 0x9e37_79b9_u32;
        for byte in &mut data[..500_000] {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            *byte = state as u8;
        }
        for segment_len in [512 * 1024, 600_001] {
            assert_eq!(
                by_segments(&data, segment_len, ChunkerParams::V1, 7),
                sequential(&data, ChunkerParams::V1, 7)
            );
        }
    }
}
