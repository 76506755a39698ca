//! Frames: `type (1 byte) | payload length (varint) | payload`, and an incremental
//! decoder that takes bytes as they come off the connection.

use super::ProtocolError;
use super::wire::{get_varint, put_varint, varint_len};

/// The most payload bytes one frame may carry. A peer that announces more is cut
/// off as soon as the length is read: the decoder never waits for, or allocates
/// by, a length it was told.
pub const MAX_FRAME_PAYLOAD: usize = 512 * 1024;

/// Bytes reserved for the length while a payload is written: enough for any
/// payload up to [`MAX_FRAME_PAYLOAD`] (3 varint bytes hold 2 MiB).
const LENGTH_ROOM: usize = 3;

/// One frame, borrowed from the decoder's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The message type byte.
    pub kind: u8,
    /// The payload.
    pub payload: &'a [u8],
}

/// Where a frame lies in a [`FrameDecoder`]'s buffer: what [`FrameDecoder::next_frame_at`]
/// returns, so that a caller can keep frames it has taken without holding a borrow
/// of the decoder. Valid until the decoder moves its bytes: by [`FrameDecoder::push`],
/// [`FrameDecoder::input`], [`FrameDecoder::shrink`] or [`FrameDecoder::swap_buffer`];
/// [`FrameDecoder::input_keeping`] keeps it valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameAt {
    /// The message type byte.
    pub kind: u8,
    /// The payload's place in the buffer.
    pub payload: std::ops::Range<usize>,
}

/// Starts a frame of `kind` in `out`; returns the position to pass to [`end_frame`]
/// once the payload has been appended.
pub(crate) fn begin_frame(out: &mut Vec<u8>, kind: u8) -> usize {
    out.push(kind);
    let at = out.len();
    out.extend_from_slice(&[0; LENGTH_ROOM]);
    at
}

/// Writes the payload length in front of the payload appended since [`begin_frame`].
///
/// # Panics
/// If the payload exceeds [`MAX_FRAME_PAYLOAD`]: message constructors keep every
/// message below it, so this is a bug in the caller.
pub(crate) fn end_frame(out: &mut Vec<u8>, at: usize) {
    let len = out.len() - at - LENGTH_ROOM;
    assert!(
        len <= MAX_FRAME_PAYLOAD,
        "a frame payload of {len} bytes exceeds the limit"
    );
    let mut length = Vec::with_capacity(LENGTH_ROOM);
    put_varint(&mut length, len as u64);
    let shift = LENGTH_ROOM - length.len();
    out[at..at + length.len()].copy_from_slice(&length);
    if shift > 0 {
        out.copy_within(at + LENGTH_ROOM.., at + length.len());
        out.truncate(out.len() - shift);
    }
}

/// Bytes a frame with a payload of `len` bytes takes on the wire.
pub fn frame_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

/// Reassembles frames from bytes that arrive in pieces of any size.
///
/// Memory is bounded by the frame limit plus what the caller pushes at once: a
/// length above the limit is an error as soon as it is read.
#[derive(Debug)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
    start: usize,
    limit: usize,
}

impl FrameDecoder {
    /// A decoder refusing payloads above `limit` (at most [`MAX_FRAME_PAYLOAD`]).
    pub fn new(limit: usize) -> Self {
        Self {
            buffer: Vec::new(),
            start: 0,
            limit: limit.min(MAX_FRAME_PAYLOAD),
        }
    }

    /// Adds bytes received from the peer.
    pub fn push(&mut self, bytes: &[u8]) {
        self.compact();
        self.buffer.extend_from_slice(bytes);
    }

    /// The buffer to read the peer's next bytes into, with room for at least `room`
    /// more: append to it (`read_buf`), never change what it holds. Saves copying
    /// every byte once more through a buffer of the caller's, as [`push`](Self::push)
    /// does.
    pub fn input(&mut self, room: usize) -> &mut Vec<u8> {
        self.compact();
        self.buffer.reserve(room);
        &mut self.buffer
    }

    /// As [`input`](Self::input), but never moves the bytes already returned as
    /// frames, so that every [`FrameAt`] taken stays valid. The buffer grows by what
    /// is read: call [`swap_buffer`](Self::swap_buffer) to hand it over and start
    /// afresh.
    pub fn input_keeping(&mut self, room: usize) -> &mut Vec<u8> {
        self.buffer.reserve(room);
        &mut self.buffer
    }

    /// Makes room for `more` bytes beyond what the buffer holds, exactly: one
    /// allocation up front for a buffer that is to grow by
    /// [`input_keeping`](Self::input_keeping), instead of doublings that copy it.
    pub fn reserve_exact(&mut self, more: usize) {
        self.buffer.reserve_exact(more);
    }

    /// Hands over the buffer: returns it, with every frame taken where its
    /// [`FrameAt`] says, and goes on with `fresh` (emptied first, its memory kept)
    /// holding the bytes not yet returned as frames.
    pub fn swap_buffer(&mut self, mut fresh: Vec<u8>) -> Vec<u8> {
        fresh.clear();
        fresh.extend_from_slice(&self.buffer[self.start..]);
        self.start = 0;
        std::mem::replace(&mut self.buffer, fresh)
    }

    /// The buffer up to the end of the last frame returned: where every
    /// [`FrameAt`] taken since the bytes last moved lies.
    pub fn framed(&self) -> &[u8] {
        &self.buffer[..self.start]
    }

    /// Drops the bytes already returned as frames once they are half the buffer (or
    /// all of it), so that what is moved stays small next to what was consumed.
    fn compact(&mut self) {
        if self.start == self.buffer.len() {
            self.buffer.clear();
            self.start = 0;
        } else if self.start > 0 && self.start >= self.buffer.len() / 2 {
            self.buffer.drain(..self.start);
            self.start = 0;
        }
    }

    /// Gives back memory held beyond `keep` bytes of capacity (for a connection gone
    /// quiet), keeping the bytes not yet returned as frames.
    pub fn shrink(&mut self, keep: usize) {
        self.compact();
        if self.buffer.capacity() > keep {
            self.buffer.shrink_to(keep.max(self.buffer.len()));
        }
    }

    /// The next complete frame, or `None` until more bytes arrive.
    ///
    /// # Errors
    /// A length above the limit or a malformed length; the connection should then be
    /// closed, since the byte stream can no longer be trusted.
    pub fn next_frame(&mut self) -> Result<Option<Frame<'_>>, ProtocolError> {
        Ok(self.next_frame_at()?.map(|at| Frame {
            kind: at.kind,
            payload: &self.buffer[at.payload],
        }))
    }

    /// As [`next_frame`](Self::next_frame), but says where the frame lies instead of
    /// borrowing it: read it with [`frame`](Self::frame) or in
    /// [`framed`](Self::framed).
    ///
    /// # Errors
    /// As [`next_frame`](Self::next_frame).
    pub fn next_frame_at(&mut self) -> Result<Option<FrameAt>, ProtocolError> {
        let available = &self.buffer[self.start..];
        let Some((&kind, rest)) = available.split_first() else {
            return Ok(None);
        };
        let Some((len, len_bytes)) = get_varint(rest)? else {
            return Ok(None);
        };
        if len > self.limit as u64 {
            return Err(ProtocolError::FrameTooLarge {
                len,
                limit: self.limit,
            });
        }
        let len = len as usize;
        let total = 1 + len_bytes + len;
        if available.len() < total {
            return Ok(None);
        }
        let payload_at = self.start + 1 + len_bytes;
        self.start += total;
        Ok(Some(FrameAt {
            kind,
            payload: payload_at..payload_at + len,
        }))
    }

    /// The frame at `at`.
    ///
    /// # Panics
    /// If `at` is not within the buffer: a [`FrameAt`] from before the bytes were
    /// moved.
    pub fn frame(&self, at: &FrameAt) -> Frame<'_> {
        Frame {
            kind: at.kind,
            payload: &self.framed()[at.payload.clone()],
        }
    }

    /// Bytes the buffer can hold without growing.
    pub fn capacity(&self) -> usize {
        self.buffer.capacity()
    }

    /// Bytes received and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buffer.len() - self.start
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let at = begin_frame(&mut out, kind);
        out.extend_from_slice(payload);
        end_frame(&mut out, at);
        out
    }

    #[test]
    fn frames_use_the_shortest_length() {
        assert_eq!(frame(7, b"abc"), [7, 3, b'a', b'b', b'c']);
        assert_eq!(frame(7, &[1; 200]).len(), 1 + 2 + 200);
        assert_eq!(frame(7, &[1; 70_000]).len(), frame_len(70_000));
    }

    #[test]
    fn a_huge_claimed_length_is_refused_before_buffering() {
        let mut decoder = FrameDecoder::new(MAX_FRAME_PAYLOAD);
        // Type 1, length 2^63.
        decoder.push(&[
            1, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01,
        ]);
        assert!(matches!(
            decoder.next_frame(),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
        let mut decoder = FrameDecoder::new(1000);
        decoder.push(&frame(1, &[0; 1001])[..4]);
        assert!(matches!(
            decoder.next_frame(),
            Err(ProtocolError::FrameTooLarge { len: 1001, .. })
        ));
    }

    proptest! {
        #[test]
        fn frames_survive_any_split(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..3000), 0..6),
            cuts in proptest::collection::vec(1_usize..500, 1..20),
        ) {
            let stream: Vec<u8> = payloads.iter().enumerate().flat_map(|(i, p)| frame(i as u8, p)).collect();
            let mut decoder = FrameDecoder::new(MAX_FRAME_PAYLOAD);
            let mut got = Vec::new();
            let mut rest = &stream[..];
            let mut turn = 0;
            while !rest.is_empty() {
                let n = cuts[turn % cuts.len()].min(rest.len());
                turn += 1;
                // Both ways in: pushed, and read straight into the decoder's
                // buffer; and a quiet connection giving its memory back between.
                match turn % 3 {
                    0 => decoder.push(&rest[..n]),
                    1 => decoder.input(n).extend_from_slice(&rest[..n]),
                    _ => {
                        decoder.shrink(0);
                        decoder.input(1).extend_from_slice(&rest[..n]);
                    }
                }
                rest = &rest[n..];
                while let Some(frame) = decoder.next_frame().unwrap() {
                    got.push((frame.kind, frame.payload.to_vec()));
                }
            }
            let want: Vec<(u8, Vec<u8>)> = payloads.into_iter().enumerate().map(|(i, p)| (i as u8, p)).collect();
            prop_assert_eq!(got, want);
            prop_assert_eq!(decoder.buffered(), 0);
        }

        #[test]
        fn frames_kept_by_place_survive_reads_and_a_swap(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..3000), 1..8),
            cuts in proptest::collection::vec(1_usize..700, 1..20),
            swap_after in 0_usize..8,
        ) {
            let stream: Vec<u8> = payloads.iter().enumerate().flat_map(|(i, p)| frame(i as u8, p)).collect();
            let mut decoder = FrameDecoder::new(MAX_FRAME_PAYLOAD);
            // Frames taken by place, read back from the buffer they were taken in
            // (the decoder's own, or the one it handed over in a swap).
            let mut kept: Vec<FrameAt> = Vec::new();
            let mut got = Vec::new();
            let mut handed_over = false;
            let mut rest = &stream[..];
            let mut turn = 0;
            while !rest.is_empty() {
                let n = cuts[turn % cuts.len()].min(rest.len());
                turn += 1;
                decoder.input_keeping(n).extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                while let Some(at) = decoder.next_frame_at().unwrap() {
                    kept.push(at);
                    if kept.len() == swap_after && !handed_over {
                        let old: Vec<u8> = decoder.swap_buffer(Vec::with_capacity(16));
                        for at in kept.drain(..) {
                            got.push((at.kind, old[at.payload].to_vec()));
                        }
                        handed_over = true;
                    }
                }
            }
            for at in kept.drain(..) {
                let frame = decoder.frame(&at);
                got.push((frame.kind, frame.payload.to_vec()));
            }
            let want: Vec<(u8, Vec<u8>)> = payloads.into_iter().enumerate().map(|(i, p)| (i as u8, p)).collect();
            prop_assert_eq!(got, want);
            prop_assert_eq!(decoder.buffered(), 0);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_stay_bounded(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let mut decoder = FrameDecoder::new(1024);
            for piece in bytes.chunks(97) {
                decoder.push(piece);
                loop {
                    match decoder.next_frame() {
                        Ok(Some(frame)) => prop_assert!(frame.payload.len() <= 1024),
                        Ok(None) => break,
                        Err(_) => return Ok(()),
                    }
                }
                prop_assert!(decoder.buffered() <= 1024 + 11 + 97);
            }
        }
    }
}
