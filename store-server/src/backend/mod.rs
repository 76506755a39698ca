//! Where object bytes live: append-only *segments*, behind a small trait.
//!
//! A laptop makes millions of small objects, so the store never keeps one file per
//! object: objects are appended to numbered segments, and the index (redb) says
//! where each one is. The [`Backend`] trait is all the object store needs from the
//! medium, so that a local directory ([`LocalBackend`]), a fault-injecting wrapper
//! for tests ([`FaultyBackend`]) and, later, an S3-compatible object store plug in
//! alike. The `conformance` module (tests, or the `conformance` feature) is the
//! test suite every backend must pass.

mod faulty;
mod local;

use std::io;

pub use faulty::{Fault, FaultyBackend};
pub use local::LocalBackend;

/// Segment storage: append, read back, list, delete, and cut a torn tail.
pub trait Backend: Send + Sync {
    /// Appends `parts`, one after the other, to `segment` (creating it if need be)
    /// and returns the offset the first starts at. When this returns `Ok`, the bytes
    /// are durable. When it returns an error, the segment may hold a torn tail past
    /// its previous length, which readers never see because the index never points
    /// there. Taking the parts apart lets a batch of objects go to the medium
    /// without first being copied into one buffer.
    ///
    /// # Errors
    /// Any failure of the medium (no space, IO error, ...).
    fn append(&self, segment: u64, parts: &[&[u8]]) -> Result<u64, BackendError>;

    /// Reads `len` bytes at `offset` of `segment`.
    ///
    /// # Errors
    /// [`BackendError::OutOfRange`] if the range reaches past the segment's end,
    /// [`BackendError::Io`] otherwise.
    fn read(&self, segment: u64, offset: u64, len: u32) -> Result<Vec<u8>, BackendError>;

    /// Every segment and its length, in segment order.
    ///
    /// # Errors
    /// A failure of the medium.
    fn list(&self) -> Result<Vec<(u64, u64)>, BackendError>;

    /// Removes a segment. Removing a missing segment is not an error.
    ///
    /// # Errors
    /// A failure of the medium.
    fn delete(&self, segment: u64) -> Result<(), BackendError>;

    /// Cuts `segment` back to `len` bytes (drops a torn tail), durably.
    ///
    /// # Errors
    /// A failure of the medium.
    fn truncate(&self, segment: u64, len: u64) -> Result<(), BackendError>;
}

/// A failure of a backend, with the operation and segment it concerns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The medium failed.
    #[error("{operation} of segment {segment:016x} failed: {source}")]
    Io {
        /// "append", "read", "list", "delete", "truncate".
        operation: &'static str,
        /// The segment.
        segment: u64,
        /// The medium's error (ENOSPC, EIO, ...).
        source: io::Error,
    },
    /// A read reached past the segment's end.
    #[error("segment {segment:016x} holds {len} bytes; {offset}+{want} is out of range")]
    OutOfRange {
        /// The segment.
        segment: u64,
        /// Its length.
        len: u64,
        /// Where the read started.
        offset: u64,
        /// Bytes wanted.
        want: u32,
    },
}

impl BackendError {
    /// Whether the failure may go away (as opposed to data that is not there).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Io { .. })
    }
}

/// The conformance suite: behaviour every [`Backend`] must show. Each backend's
/// tests call [`conformance::run`] with a constructor of empty backends; backends in
/// other crates get it with the `conformance` feature.
#[cfg(any(test, feature = "conformance"))]
#[allow(clippy::unwrap_used)] // a test suite: a failed unwrap is a failed check
pub mod conformance {
    use super::{Backend, BackendError};

    /// Runs every check against fresh backends from `make`.
    ///
    /// # Panics
    /// On the first behaviour that differs from the contract.
    pub fn run<B: Backend>(mut make: impl FnMut() -> B) {
        appends_return_offsets_and_read_back(&make());
        ranged_reads_return_exactly_the_range(&make());
        reads_past_the_end_are_refused(&make());
        listing_shows_segments_and_lengths(&make());
        delete_and_truncate(&make());
    }

    fn appends_return_offsets_and_read_back(backend: &impl Backend) {
        assert_eq!(backend.append(1, &[b"hello".as_slice()]).unwrap(), 0);
        assert_eq!(backend.append(1, &[b" world".as_slice()]).unwrap(), 5);
        assert_eq!(backend.append(2, &[b"other".as_slice()]).unwrap(), 0);
        assert_eq!(backend.read(1, 0, 11).unwrap(), b"hello world");
        assert_eq!(backend.read(2, 0, 5).unwrap(), b"other");
        assert_eq!(backend.read(1, 11, 0).unwrap(), b"");
        // Parts land one after the other, empty ones included.
        assert_eq!(
            backend
                .append(1, &[b"!".as_slice(), b"".as_slice(), b"??".as_slice()])
                .unwrap(),
            11
        );
        assert_eq!(backend.read(1, 10, 4).unwrap(), b"d!??");
        assert_eq!(backend.append(1, &[]).unwrap(), 14);
        assert_eq!(backend.list().unwrap(), vec![(1, 14), (2, 5)]);
    }

    fn ranged_reads_return_exactly_the_range(backend: &impl Backend) {
        let data: Vec<u8> = (0..10_000_u32).map(|i| (i * 7) as u8).collect();
        backend.append(3, &[data.as_slice()]).unwrap();
        for (offset, len) in [(0, 1), (1, 9_999), (4_096, 100), (9_999, 1), (5_000, 5_000)] {
            let got = backend.read(3, offset, len).unwrap();
            assert_eq!(
                got,
                &data[offset as usize..offset as usize + len as usize],
                "{offset}+{len}"
            );
        }
    }

    fn reads_past_the_end_are_refused(backend: &impl Backend) {
        backend.append(4, &[b"1234".as_slice()]).unwrap();
        assert!(matches!(
            backend.read(4, 2, 3),
            Err(BackendError::OutOfRange { len: 4, .. })
        ));
        assert!(matches!(
            backend.read(4, 5, 0),
            Err(BackendError::OutOfRange { .. })
        ));
        assert!(backend.read(99, 0, 1).is_err(), "a missing segment");
    }

    fn listing_shows_segments_and_lengths(backend: &impl Backend) {
        assert_eq!(backend.list().unwrap(), vec![]);
        backend.append(7, &[[0_u8; 300].as_slice()]).unwrap();
        backend.append(5, &[[0_u8; 10].as_slice()]).unwrap();
        backend.append(7, &[[0_u8; 5].as_slice()]).unwrap();
        assert_eq!(backend.list().unwrap(), vec![(5, 10), (7, 305)]);
    }

    fn delete_and_truncate(backend: &impl Backend) {
        backend
            .append(8, &[b"keep this, not that".as_slice()])
            .unwrap();
        backend.truncate(8, 9).unwrap();
        assert_eq!(backend.list().unwrap(), vec![(8, 9)]);
        assert_eq!(backend.append(8, &[b"!".as_slice()]).unwrap(), 9);
        assert_eq!(backend.read(8, 0, 10).unwrap(), b"keep this!");
        backend.delete(8).unwrap();
        backend.delete(8).unwrap();
        assert_eq!(backend.list().unwrap(), vec![]);
    }
}
