//! The wire protocol between client and store, as a pure codec: frames in, messages
//! out, and back. No sockets and no clock; the TLS connection around it and the
//! upload session that drives it are separate (see `docs/protocol.md`).
//!
//! Thin links pay for every byte, so the encoding is compact (one type byte, LEB128
//! lengths and integers, 32-byte ids, a bitmap for "which of these do you have"),
//! and requests are answered in order, so that a client pipelines them without
//! request ids and without waiting.
//!
//! Nothing a peer sends can make the decoder allocate by a length it claims: frame
//! lengths are checked against the decoder's limit (at most [`MAX_FRAME_PAYLOAD`])
//! as soon as they are read, and counts against the bytes actually present and
//! against the documented per-frame limits.

mod frame;
mod message;
mod wire;

pub use frame::{Frame, FrameAt, FrameDecoder, MAX_FRAME_PAYLOAD, frame_len};
pub use message::{
    ClientMessage, MAX_IDS_PER_FRAME, MAX_MANIFEST, MAX_PIECE, MAX_SNAPSHOTS_PER_FRAME,
    ObjectState, PROTOCOL_VERSION, ServerMessage, SnapshotEntry, WireError,
};

/// A peer broke the protocol: the connection cannot continue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// A frame announced more payload than the limit.
    #[error("the peer announced a frame of {len} bytes; the limit is {limit}")]
    FrameTooLarge {
        /// The announced length.
        len: u64,
        /// The limit.
        limit: usize,
    },
    /// A type byte that names no message of this direction.
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    /// A payload that does not decode.
    #[error("malformed message: {0}")]
    Malformed(&'static str),
}

#[cfg(test)]
mod tests;
