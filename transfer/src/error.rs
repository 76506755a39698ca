//! Errors of the transfer crate.

use std::io;

use homing_crypto::ObjectId;

/// Everything that can go wrong while chunking, sealing or opening objects.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading the data to back up failed.
    #[error("reading the data failed at byte {offset}: {source}")]
    Read {
        /// Offset in the stream where the read failed.
        offset: u64,
        /// The reader's error.
        source: io::Error,
    },
    /// Sealing or opening failed in the crypto layer (wrong key, tampering, ...).
    #[error(transparent)]
    Crypto(#[from] homing_crypto::Error),
    /// zstd could not set up a compression context (for example, an invalid level).
    #[error("zstd could not set up compression: {0}")]
    Compress(io::Error),
    /// An opened object's payload is not a valid compressed payload.
    #[error("object {id}: its payload does not decompress ({reason}); the object is damaged")]
    Decompress {
        /// The object.
        id: ObjectId,
        /// What zstd or the payload header said.
        reason: String,
    },
    /// An object is larger than any object Homing writes.
    #[error("object {id}: {len} bytes exceed the limit of {limit} bytes")]
    TooLarge {
        /// The object.
        id: ObjectId,
        /// Its size, or the size its payload claims.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// An object opened and decompressed, but its plaintext does not hash to its id.
    #[error("object {id}: its content does not match its id; the object is damaged or forged")]
    IdMismatch {
        /// The object.
        id: ObjectId,
    },
    /// The peer broke the wire protocol.
    #[error(transparent)]
    Protocol(#[from] crate::proto::ProtocolError),
    /// A worker thread of the sealing pipeline panicked.
    #[error("a sealing worker thread stopped unexpectedly")]
    WorkerPanicked,
}

impl Error {
    /// Whether trying the same operation again may succeed (a transient IO error),
    /// as opposed to a permanent one (damaged data, wrong key).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Read { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            Self::Crypto(homing_crypto::Error::Random(_)) => true,
            _ => false,
        }
    }
}
