//! A backend that fails on purpose: for tests of what the store does when the disk
//! is full, returns errors, or tears a write in half.

use std::io;
use std::sync::Mutex;

use super::{Backend, BackendError};

/// A fault to inject into the next append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fail with "no space left on device", writing nothing.
    NoSpace,
    /// Fail with an IO error, writing nothing.
    Io,
    /// Write only the first half of the bytes, then fail (a crash or a full disk
    /// mid-write).
    Torn,
}

/// Wraps a backend and injects faults into appends, as scheduled.
#[derive(Debug)]
pub struct FaultyBackend<B> {
    inner: B,
    /// Faults for the coming appends, in order; `None` lets one through.
    plan: Mutex<Vec<Option<Fault>>>,
    /// Fail every read with an IO error.
    fail_reads: Mutex<bool>,
}

impl<B: Backend> FaultyBackend<B> {
    /// Wraps `inner` with no faults planned.
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            plan: Mutex::new(Vec::new()),
            fail_reads: Mutex::new(false),
        }
    }

    /// Plans faults for the next appends, in order (`None` lets one through).
    pub fn plan(&self, faults: impl IntoIterator<Item = Option<Fault>>) {
        let mut plan = self.plan.lock().unwrap_or_else(|p| p.into_inner());
        plan.extend(faults);
    }

    /// Makes every read fail (or succeed again).
    pub fn fail_reads(&self, fail: bool) {
        *self.fail_reads.lock().unwrap_or_else(|p| p.into_inner()) = fail;
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    fn next_fault(&self) -> Option<Fault> {
        let mut plan = self.plan.lock().unwrap_or_else(|p| p.into_inner());
        if plan.is_empty() {
            None
        } else {
            plan.remove(0)
        }
    }
}

impl<B: Backend> Backend for FaultyBackend<B> {
    fn append(&self, segment: u64, parts: &[&[u8]]) -> Result<u64, BackendError> {
        let fail = |kind: io::ErrorKind, text: &str| BackendError::Io {
            operation: "append",
            segment,
            source: io::Error::new(kind, text.to_string()),
        };
        match self.next_fault() {
            None => self.inner.append(segment, parts),
            Some(Fault::NoSpace) => Err(fail(
                io::ErrorKind::StorageFull,
                "no space left on device (injected)",
            )),
            Some(Fault::Io) => Err(fail(io::ErrorKind::Other, "input/output error (injected)")),
            Some(Fault::Torn) => {
                let bytes = parts.concat();
                self.inner.append(segment, &[&bytes[..bytes.len() / 2]])?;
                Err(fail(
                    io::ErrorKind::StorageFull,
                    "write torn half-way (injected)",
                ))
            }
        }
    }

    fn read(&self, segment: u64, offset: u64, len: u32) -> Result<Vec<u8>, BackendError> {
        if *self.fail_reads.lock().unwrap_or_else(|p| p.into_inner()) {
            return Err(BackendError::Io {
                operation: "read",
                segment,
                source: io::Error::other("input/output error (injected)"),
            });
        }
        self.inner.read(segment, offset, len)
    }

    fn list(&self) -> Result<Vec<(u64, u64)>, BackendError> {
        self.inner.list()
    }

    fn delete(&self, segment: u64) -> Result<(), BackendError> {
        self.inner.delete(segment)
    }

    fn truncate(&self, segment: u64, len: u64) -> Result<(), BackendError> {
        self.inner.truncate(segment, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{LocalBackend, conformance};

    #[test]
    fn a_faulty_backend_without_faults_conforms() {
        let dirs: std::cell::RefCell<Vec<tempfile::TempDir>> = Default::default();
        conformance::run(|| {
            let dir = tempfile::tempdir().unwrap();
            let backend = FaultyBackend::new(LocalBackend::open(dir.path()).unwrap());
            dirs.borrow_mut().push(dir);
            backend
        });
    }

    #[test]
    fn faults_surface_as_errors() {
        let dir = tempfile::tempdir().unwrap();
        let backend = FaultyBackend::new(LocalBackend::open(dir.path()).unwrap());
        backend.plan([
            Some(Fault::NoSpace),
            Some(Fault::Io),
            Some(Fault::Torn),
            None,
        ]);
        let no_space = backend.append(1, &[b"abcd".as_slice()]).unwrap_err();
        assert!(no_space.to_string().contains("no space"), "{no_space}");
        assert!(backend.append(1, &[b"abcd".as_slice()]).is_err());
        assert!(backend.append(1, &[b"abcd".as_slice()]).is_err());
        assert_eq!(
            backend.list().unwrap(),
            vec![(1, 2)],
            "the torn write left half"
        );
        assert_eq!(backend.append(1, &[b"ef".as_slice()]).unwrap(), 2);
        backend.fail_reads(true);
        assert!(backend.read(1, 0, 1).is_err());
    }
}
