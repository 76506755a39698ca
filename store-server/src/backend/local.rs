//! Segments as files in a local directory: `<dir>/<segment as 16 hex digits>.seg`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::path::{Path, PathBuf};

use super::{Backend, BackendError};

/// Segment files in one directory, appended and fsynced.
#[derive(Debug)]
pub struct LocalBackend {
    dir: PathBuf,
}

impl LocalBackend {
    /// Uses (and creates) `dir` for segment files.
    ///
    /// # Errors
    /// If the directory cannot be created.
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, segment: u64) -> PathBuf {
        self.dir.join(format!("{segment:016x}.seg"))
    }

    fn sync_dir(&self) -> io::Result<()> {
        File::open(&self.dir)?.sync_all()
    }
}

impl Backend for LocalBackend {
    fn append(&self, segment: u64, parts: &[&[u8]]) -> Result<u64, BackendError> {
        let io = |source| BackendError::Io {
            operation: "append",
            segment,
            source,
        };
        let path = self.path(segment);
        let created = !path.exists();
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        let offset = file.metadata().map_err(io)?.len();
        write_all_parts(&mut file, parts).map_err(io)?;
        file.sync_data().map_err(io)?;
        if created {
            self.sync_dir().map_err(io)?;
        }
        Ok(offset)
    }

    fn read(&self, segment: u64, offset: u64, len: u32) -> Result<Vec<u8>, BackendError> {
        let io = |source| BackendError::Io {
            operation: "read",
            segment,
            source,
        };
        let file = File::open(self.path(segment)).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        if offset > size || u64::from(len) > size - offset {
            return Err(BackendError::OutOfRange {
                segment,
                len: size,
                offset,
                want: len,
            });
        }
        let mut out = vec![0; len as usize];
        read_exact_at(&file, &mut out, offset).map_err(io)?;
        Ok(out)
    }

    fn list(&self) -> Result<Vec<(u64, u64)>, BackendError> {
        let io = |source| BackendError::Io {
            operation: "list",
            segment: 0,
            source,
        };
        let mut segments = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            let Some(number) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| u64::from_str_radix(n, 16).ok())
            else {
                continue; // not a segment (a temporary file, a stray file)
            };
            segments.push((number, entry.metadata().map_err(io)?.len()));
        }
        segments.sort_unstable();
        Ok(segments)
    }

    fn delete(&self, segment: u64) -> Result<(), BackendError> {
        match fs::remove_file(self.path(segment)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(BackendError::Io {
                operation: "delete",
                segment,
                source: e,
            }),
            _ => self.sync_dir().map_err(|source| BackendError::Io {
                operation: "delete",
                segment,
                source,
            }),
        }
    }

    fn truncate(&self, segment: u64, len: u64) -> Result<(), BackendError> {
        let io = |source| BackendError::Io {
            operation: "truncate",
            segment,
            source,
        };
        let file = OpenOptions::new()
            .write(true)
            .open(self.path(segment))
            .map_err(io)?;
        file.set_len(len).map_err(io)?;
        file.sync_all().map_err(io)
    }
}

#[cfg(unix)]
fn read_exact_at(file: &File, out: &mut [u8], offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(out, offset)
}

#[cfg(not(unix))]
fn read_exact_at(file: &File, out: &mut [u8], offset: u64) -> io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = file;
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(out)
}

/// Writes every part, in order, with as few system calls as the kernel allows.
fn write_all_parts(file: &mut File, parts: &[&[u8]]) -> io::Result<()> {
    /// The fewest slices every platform takes in one `writev` (POSIX's `IOV_MAX`
    /// is at least 16; Linux and the BSDs take 1024).
    const MAX_SLICES: usize = 1024;
    let mut slices: Vec<IoSlice<'_>> = parts
        .iter()
        .filter(|part| !part.is_empty())
        .map(|part| IoSlice::new(part))
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let take = rest.len().min(MAX_SLICES);
        match file.write_vectored(&rest[..take]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => IoSlice::advance_slices(&mut rest, written),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::conformance;

    #[test]
    fn local_backend_conforms() {
        let dirs: std::cell::RefCell<Vec<tempfile::TempDir>> = Default::default();
        conformance::run(|| {
            let dir = tempfile::tempdir().unwrap();
            let backend = LocalBackend::open(dir.path()).unwrap();
            dirs.borrow_mut().push(dir);
            backend
        });
    }

    #[test]
    fn stray_files_are_not_segments() {
        let dir = tempfile::tempdir().unwrap();
        let backend = LocalBackend::open(dir.path()).unwrap();
        fs::write(dir.path().join("notes.txt"), b"x").unwrap();
        fs::write(dir.path().join("zz.seg"), b"x").unwrap();
        backend.append(1, &[b"a".as_slice()]).unwrap();
        assert_eq!(backend.list().unwrap(), vec![(1, 1)]);
    }
}
