//! The key file: the master key at rest, optionally wrapped by a passphrase (Argon2id).
//!
//! Layout, version 1 (integers little-endian; see `docs/format.md`):
//!
//! ```text
//! offset  len  field
//!      0    8  magic 89 48 4d 4b 0d 0a 1a 0a ("\x89HMK\r\n\x1a\n")
//!      8    1  format version (1)
//!      9    1  protection: 0 = none (mode 0600 protects it), 1 = Argon2id passphrase
//! protection 0:
//!     10   32  master key
//!     42   32  BLAKE3 of bytes 0..42
//! protection 1:
//!     10    4  Argon2id memory in KiB
//!     14    4  Argon2id passes
//!     18    4  Argon2id lanes
//!     22   16  salt
//!     38   24  XChaCha20-Poly1305 nonce
//!     62   32  master key, encrypted under the Argon2id output (associated data: bytes 0..62)
//!     94   16  Poly1305 tag
//!    110   32  BLAKE3 of bytes 0..110
//! ```
//!
//! The trailing checksum tells a damaged file apart from a wrong passphrase.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::aead::inout::InOutBuf;
use chacha20poly1305::{KeyInit, Tag, XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

use crate::error::{Error, KeyFileError};
use crate::key::{KEY_LEN, MasterKey};

/// The first eight bytes of every key file. Like PNG's, it catches files mangled by
/// text-mode transfers (CR/LF conversion, 7-bit channels).
pub const KEY_FILE_MAGIC: [u8; 8] = [0x89, b'H', b'M', b'K', b'\r', b'\n', 0x1a, b'\n'];
/// The key file format version written by this build.
pub const KEY_FILE_VERSION: u8 = 1;

const PREFIX_LEN: usize = 10;
const CHECKSUM_LEN: usize = 32;
const PLAIN_LEN: usize = PREFIX_LEN + KEY_LEN + CHECKSUM_LEN;
const SALT_LEN: usize = 16;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const WRAPPED_AD_LEN: usize = PREFIX_LEN + 12 + SALT_LEN + NONCE_LEN;
const WRAPPED_LEN: usize = WRAPPED_AD_LEN + KEY_LEN + TAG_LEN + CHECKSUM_LEN;

const PROTECTION_NONE: u8 = 0;
const PROTECTION_ARGON2ID: u8 = 1;

/// Argon2id cost parameters for wrapping the key with a passphrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    memory_kib: u32,
    passes: u32,
    lanes: u32,
}

impl KdfParams {
    /// The default: 64 MiB, 3 passes, 1 lane (about a quarter of a second here).
    pub const DEFAULT: Self = Self {
        memory_kib: 64 * 1024,
        passes: 3,
        lanes: 1,
    };
    /// The largest memory cost a key file may ask for (4 GiB), so that a hostile
    /// file cannot make the client allocate without bound.
    pub const MAX_MEMORY_KIB: u32 = 4 * 1024 * 1024;
    /// The most passes a key file may ask for.
    pub const MAX_PASSES: u32 = 64;
    /// The most lanes a key file may ask for.
    pub const MAX_LANES: u32 = 64;

    /// Checks parameters against the accepted range.
    ///
    /// # Errors
    /// [`KeyFileError::KdfParams`] naming the value out of range.
    pub fn try_new(memory_kib: u32, passes: u32, lanes: u32) -> Result<Self, KeyFileError> {
        let fail = |what: String| Err(KeyFileError::KdfParams(what));
        if !(1..=Self::MAX_LANES).contains(&lanes) {
            return fail(format!("lanes {lanes} not in 1..={}", Self::MAX_LANES));
        }
        if !(8 * lanes..=Self::MAX_MEMORY_KIB).contains(&memory_kib) {
            return fail(format!(
                "memory {memory_kib} KiB not in {}..={} KiB",
                8 * lanes,
                Self::MAX_MEMORY_KIB
            ));
        }
        if !(1..=Self::MAX_PASSES).contains(&passes) {
            return fail(format!("passes {passes} not in 1..={}", Self::MAX_PASSES));
        }
        Ok(Self {
            memory_kib,
            passes,
            lanes,
        })
    }

    /// Memory cost in KiB.
    pub const fn memory_kib(&self) -> u32 {
        self.memory_kib
    }

    /// Number of passes.
    pub const fn passes(&self) -> u32 {
        self.passes
    }

    /// Degree of parallelism.
    pub const fn lanes(&self) -> u32 {
        self.lanes
    }

    fn derive(&self, passphrase: &[u8], salt: &[u8; SALT_LEN]) -> Zeroizing<[u8; KEY_LEN]> {
        let params = argon2::Params::new(self.memory_kib, self.passes, self.lanes, Some(KEY_LEN))
            .expect("KdfParams::try_new keeps the parameters inside Argon2's limits");
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut out = Zeroizing::new([0_u8; KEY_LEN]);
        argon
            .hash_password_into(passphrase, salt, out.as_mut())
            .expect("salt and output lengths are fixed and valid for Argon2");
        out
    }
}

impl Default for KdfParams {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A parsed key file: the master key in the clear or wrapped by a passphrase.
pub struct KeyFile {
    body: Body,
}

enum Body {
    Plain(Zeroizing<[u8; KEY_LEN]>),
    Wrapped {
        params: KdfParams,
        salt: [u8; SALT_LEN],
        nonce: [u8; NONCE_LEN],
        ciphertext: [u8; KEY_LEN],
        tag: [u8; TAG_LEN],
    },
}

impl KeyFile {
    /// Prepares a key file for `master`, wrapped with `passphrase` under `params` if
    /// a passphrase is given.
    ///
    /// # Errors
    /// [`Error::Random`] if no salt or nonce can be drawn.
    pub fn new(master: &MasterKey, passphrase: Option<(&[u8], KdfParams)>) -> Result<Self, Error> {
        let Some((passphrase, params)) = passphrase else {
            return Ok(Self {
                body: Body::Plain(Zeroizing::new(*master.expose_secret())),
            });
        };
        let mut salt = [0_u8; SALT_LEN];
        let mut nonce = [0_u8; NONCE_LEN];
        getrandom::fill(&mut salt).map_err(Error::Random)?;
        getrandom::fill(&mut nonce).map_err(Error::Random)?;
        let mut ciphertext = *master.expose_secret();
        let wrapping = params.derive(passphrase, &salt);
        let ad = wrapped_ad(&params, &salt, &nonce);
        let tag = XChaCha20Poly1305::new(&(*wrapping).into())
            .encrypt_inout_detached(&XNonce::from(nonce), &ad, ciphertext.as_mut_slice().into())
            .expect("32 bytes are far below the AEAD's length limit");
        Ok(Self {
            body: Body::Wrapped {
                params,
                salt,
                nonce,
                ciphertext,
                tag: tag.into(),
            },
        })
    }

    /// Parses key file bytes. Never panics, whatever the bytes.
    ///
    /// # Errors
    /// A [`KeyFileError`] saying what is wrong: not a key file, truncated, trailing
    /// bytes, unknown version or protection, damaged, or Argon2id parameters out of range.
    pub fn parse(bytes: &[u8]) -> Result<Self, KeyFileError> {
        let magic_len = bytes.len().min(KEY_FILE_MAGIC.len());
        if bytes[..magic_len] != KEY_FILE_MAGIC[..magic_len] {
            return Err(KeyFileError::NotAKeyFile);
        }
        if bytes.len() < PREFIX_LEN {
            return Err(KeyFileError::Truncated {
                len: bytes.len(),
                expected: PREFIX_LEN,
            });
        }
        if bytes[8] != KEY_FILE_VERSION {
            return Err(KeyFileError::UnsupportedVersion {
                found: bytes[8],
                supported: KEY_FILE_VERSION,
            });
        }
        let expected = match bytes[9] {
            PROTECTION_NONE => PLAIN_LEN,
            PROTECTION_ARGON2ID => WRAPPED_LEN,
            other => return Err(KeyFileError::UnknownProtection(other)),
        };
        if bytes.len() < expected {
            return Err(KeyFileError::Truncated {
                len: bytes.len(),
                expected,
            });
        }
        if bytes.len() > expected {
            return Err(KeyFileError::TrailingBytes {
                extra: bytes.len() - expected,
            });
        }
        let (content, checksum) = bytes.split_at(expected - CHECKSUM_LEN);
        if blake3::hash(content).as_bytes() != checksum {
            return Err(KeyFileError::Corrupt);
        }
        let mut reader = Fields(&content[PREFIX_LEN..]);
        let body = if bytes[9] == PROTECTION_NONE {
            Body::Plain(Zeroizing::new(reader.array()))
        } else {
            let params = KdfParams::try_new(reader.u32(), reader.u32(), reader.u32())?;
            Body::Wrapped {
                params,
                salt: reader.array(),
                nonce: reader.array(),
                ciphertext: reader.array(),
                tag: reader.array(),
            }
        };
        Ok(Self { body })
    }

    /// The file's bytes. Zeroized on drop, since an unwrapped key is in them.
    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(WRAPPED_LEN));
        out.extend_from_slice(&KEY_FILE_MAGIC);
        out.push(KEY_FILE_VERSION);
        match &self.body {
            Body::Plain(key) => {
                out.push(PROTECTION_NONE);
                out.extend_from_slice(key.as_ref());
            }
            Body::Wrapped {
                params,
                salt,
                nonce,
                ciphertext,
                tag,
            } => {
                out.extend_from_slice(&wrapped_ad(params, salt, nonce)[PREFIX_LEN - 1..]);
                out.extend_from_slice(ciphertext);
                out.extend_from_slice(tag);
            }
        }
        let checksum = blake3::hash(&out);
        out.extend_from_slice(checksum.as_bytes());
        out
    }

    /// Whether [`KeyFile::unlock`] needs a passphrase.
    pub fn needs_passphrase(&self) -> bool {
        matches!(self.body, Body::Wrapped { .. })
    }

    /// The Argon2id parameters of a passphrase-protected file.
    pub fn kdf_params(&self) -> Option<KdfParams> {
        match self.body {
            Body::Plain(_) => None,
            Body::Wrapped { params, .. } => Some(params),
        }
    }

    /// Recovers the master key. A passphrase given for an unprotected file is ignored.
    ///
    /// # Errors
    /// [`KeyFileError::PassphraseRequired`] or [`KeyFileError::WrongPassphrase`].
    pub fn unlock(&self, passphrase: Option<&[u8]>) -> Result<MasterKey, KeyFileError> {
        match &self.body {
            Body::Plain(key) => Ok(MasterKey::from_bytes(&mut key.clone())),
            Body::Wrapped {
                params,
                salt,
                nonce,
                ciphertext,
                tag,
            } => {
                let passphrase = passphrase.ok_or(KeyFileError::PassphraseRequired)?;
                let wrapping = params.derive(passphrase, salt);
                let ad = wrapped_ad(params, salt, nonce);
                let mut key = Zeroizing::new([0_u8; KEY_LEN]);
                let buffer = InOutBuf::new(ciphertext, key.as_mut_slice())
                    .expect("input and output are both KEY_LEN bytes");
                XChaCha20Poly1305::new(&(*wrapping).into())
                    .decrypt_inout_detached(&XNonce::from(*nonce), &ad, buffer, &Tag::from(*tag))
                    .map_err(|_| KeyFileError::WrongPassphrase)?;
                Ok(MasterKey::from_bytes(&mut key))
            }
        }
    }

    /// Reads and parses a key file, refusing one that group or others can read.
    ///
    /// # Errors
    /// [`Error::KeyFileIo`], [`Error::KeyFileInsecure`] or [`Error::KeyFile`].
    pub fn read(path: &Path) -> Result<Self, Error> {
        let io = |action| {
            move |source| Error::KeyFileIo {
                action,
                path: path.to_path_buf(),
                source,
            }
        };
        let mut file = File::open(path).map_err(io("open"))?;
        check_permissions(path, &file)?;
        // Read through the handle whose mode was checked, not by path again. A key
        // file is 142 bytes at most; reading at most a little more tells a file with
        // trailing bytes apart without reading a huge wrong file whole.
        let mut bytes = Zeroizing::new(Vec::with_capacity(WRAPPED_LEN + 1));
        (&mut file)
            .take(WRAPPED_LEN as u64 + 1024)
            .read_to_end(&mut bytes)
            .map_err(io("read"))?;
        Self::parse(&bytes).map_err(|source| Error::KeyFile {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Writes the key file with mode 0600, durably, and never over an existing file.
    ///
    /// The bytes go to a temporary file in the same directory, which is synced and
    /// then hard-linked to `path` (which fails if `path` exists), so that a crash
    /// leaves either no key file or a whole one.
    ///
    /// # Errors
    /// [`Error::KeyFileExists`] if `path` exists, [`Error::KeyFileIo`] otherwise.
    pub fn write_new(&self, path: &Path) -> Result<(), Error> {
        let io = |action| {
            move |source| Error::KeyFileIo {
                action,
                path: path.to_path_buf(),
                source,
            }
        };
        if path.symlink_metadata().is_ok() {
            return Err(Error::KeyFileExists {
                path: path.to_path_buf(),
            });
        }
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut suffix = [0_u8; 8];
        getrandom::fill(&mut suffix).map_err(Error::Random)?;
        let temp = dir.join(format!(
            ".homing-key-{:016x}.tmp",
            u64::from_le_bytes(suffix)
        ));
        let result = (|| {
            let mut file = create_private(&temp).map_err(io("create"))?;
            file.write_all(&self.to_bytes()).map_err(io("write"))?;
            file.sync_all().map_err(io("sync"))?;
            fs::hard_link(&temp, path).map_err(|source| {
                if source.kind() == std::io::ErrorKind::AlreadyExists {
                    Error::KeyFileExists {
                        path: path.to_path_buf(),
                    }
                } else {
                    io("link")(source)
                }
            })?;
            // The directory entry must reach the disk too, or a power cut loses the key.
            File::open(&dir)
                .and_then(|d| d.sync_all())
                .map_err(io("sync the directory of"))
        })();
        let _ = fs::remove_file(&temp);
        result
    }
}

fn wrapped_ad(
    params: &KdfParams,
    salt: &[u8; SALT_LEN],
    nonce: &[u8; NONCE_LEN],
) -> [u8; WRAPPED_AD_LEN] {
    let mut ad = [0_u8; WRAPPED_AD_LEN];
    let fields = [
        &KEY_FILE_MAGIC[..],
        &[KEY_FILE_VERSION, PROTECTION_ARGON2ID],
        &params.memory_kib.to_le_bytes(),
        &params.passes.to_le_bytes(),
        &params.lanes.to_le_bytes(),
        salt,
        nonce,
    ];
    let mut at = 0;
    for field in fields {
        ad[at..at + field.len()].copy_from_slice(field);
        at += field.len();
    }
    ad
}

/// Reads fixed-size fields in order from a slice whose length was checked beforehand.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let (head, rest) = self.0.split_at(N);
        self.0 = rest;
        head.try_into().expect("split_at(N) yields N bytes")
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
}

#[cfg(unix)]
fn create_private(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn create_private(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().write(true).create_new(true).open(path)
}

#[cfg(unix)]
fn check_permissions(path: &Path, file: &File) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    let mode = file
        .metadata()
        .map_err(|source| Error::KeyFileIo {
            action: "inspect",
            path: path.to_path_buf(),
            source,
        })?
        .permissions()
        .mode()
        & 0o7777;
    if mode & 0o077 != 0 {
        return Err(Error::KeyFileInsecure {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_permissions(_path: &Path, _file: &File) -> Result<(), Error> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Cheap parameters so that tests do not spend 64 MiB and a quarter second each.
    fn fast() -> KdfParams {
        KdfParams::try_new(64, 1, 1).unwrap()
    }

    fn key() -> MasterKey {
        MasterKey::from_bytes(&mut [0x42; KEY_LEN])
    }

    #[test]
    fn plain_and_wrapped_files_round_trip() {
        let plain = KeyFile::new(&key(), None).unwrap();
        let bytes = plain.to_bytes();
        assert_eq!(bytes.len(), PLAIN_LEN);
        let parsed = KeyFile::parse(&bytes).unwrap();
        assert!(!parsed.needs_passphrase());
        assert_eq!(parsed.unlock(None).unwrap().expose_secret(), &[0x42; 32]);

        let wrapped = KeyFile::new(&key(), Some((b"correct horse", fast()))).unwrap();
        let bytes = wrapped.to_bytes();
        assert_eq!(bytes.len(), WRAPPED_LEN);
        assert!(
            !bytes.windows(32).any(|w| w == [0x42; 32]),
            "the key must not appear in clear"
        );
        let parsed = KeyFile::parse(&bytes).unwrap();
        assert_eq!(parsed.kdf_params(), Some(fast()));
        let unlocked = parsed.unlock(Some(b"correct horse")).unwrap();
        assert_eq!(unlocked.expose_secret(), &[0x42; 32]);
    }

    #[test]
    fn default_parameters_are_at_least_64_mib_and_3_passes_and_work() {
        let params = KdfParams::default();
        assert!(params.memory_kib() >= 64 * 1024 && params.passes() >= 3);
        let file = KeyFile::new(&key(), Some((b"pw", params))).unwrap();
        let parsed = KeyFile::parse(&file.to_bytes()).unwrap();
        assert_eq!(parsed.kdf_params(), Some(KdfParams::DEFAULT));
        assert!(parsed.unlock(Some(b"pw")).is_ok());
    }

    #[test]
    fn wrong_or_missing_passphrase_is_refused() {
        let file = KeyFile::new(&key(), Some((b"right", fast()))).unwrap();
        assert!(matches!(
            file.unlock(Some(b"wrong")),
            Err(KeyFileError::WrongPassphrase)
        ));
        assert!(matches!(
            file.unlock(None),
            Err(KeyFileError::PassphraseRequired)
        ));
    }

    #[test]
    fn each_kind_of_damage_has_its_own_error() {
        let bytes = KeyFile::new(&key(), Some((b"pw", fast())))
            .unwrap()
            .to_bytes()
            .to_vec();
        let err = |b: &[u8]| KeyFile::parse(b).err().unwrap();

        assert_eq!(err(b"-----BEGIN"), KeyFileError::NotAKeyFile);
        assert_eq!(
            err(b""),
            KeyFileError::Truncated {
                len: 0,
                expected: PREFIX_LEN
            }
        );
        assert_eq!(
            err(&bytes[..50]),
            KeyFileError::Truncated {
                len: 50,
                expected: WRAPPED_LEN
            }
        );
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(err(&long), KeyFileError::TrailingBytes { extra: 1 });
        let mut version = bytes.clone();
        version[8] = 2;
        assert_eq!(
            err(&version),
            KeyFileError::UnsupportedVersion {
                found: 2,
                supported: 1
            }
        );
        let mut protection = bytes.clone();
        protection[9] = 9;
        assert_eq!(err(&protection), KeyFileError::UnknownProtection(9));
        let mut flipped = bytes.clone();
        flipped[70] ^= 1;
        assert_eq!(err(&flipped), KeyFileError::Corrupt);
    }

    #[test]
    fn hostile_kdf_parameters_are_refused_before_any_work() {
        let file = KeyFile::new(&key(), Some((b"pw", fast()))).unwrap();
        let mut bytes = file.to_bytes().to_vec();
        bytes[10..14].copy_from_slice(&u32::MAX.to_le_bytes());
        let checksum = *blake3::hash(&bytes[..WRAPPED_LEN - CHECKSUM_LEN]).as_bytes();
        bytes[WRAPPED_LEN - CHECKSUM_LEN..].copy_from_slice(&checksum);
        assert!(matches!(
            KeyFile::parse(&bytes),
            Err(KeyFileError::KdfParams(_))
        ));
    }

    #[test]
    fn written_file_is_private_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        KeyFile::new(&key(), None)
            .unwrap()
            .write_new(&path)
            .unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let again = KeyFile::new(&MasterKey::generate().unwrap(), None).unwrap();
        assert!(matches!(
            again.write_new(&path),
            Err(Error::KeyFileExists { .. })
        ));
        let read = KeyFile::read(&path).unwrap().unlock(None).unwrap();
        assert_eq!(read.expose_secret(), &[0x42; 32], "the first key survives");
        let leftovers: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
    }

    #[cfg(unix)]
    #[test]
    fn a_key_file_others_can_read_is_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        KeyFile::new(&key(), None)
            .unwrap()
            .write_new(&path)
            .unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let error = KeyFile::read(&path).err().unwrap();
        assert!(matches!(error, Error::KeyFileInsecure { mode: 0o644, .. }));
        let message = error.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains("0644"), "{message}");
        assert!(
            message.contains(&format!("chmod 600 {}", path.display())),
            "{message}"
        );
    }

    #[test]
    fn a_missing_file_names_the_path() {
        let error = KeyFile::read(Path::new("/nonexistent/homing.key"))
            .err()
            .unwrap();
        assert!(
            error.to_string().contains("/nonexistent/homing.key"),
            "{error}"
        );
    }

    proptest! {
        #[test]
        fn parse_of_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = KeyFile::parse(&bytes);
        }

        #[test]
        fn parse_of_mutated_files_never_panics(index in 0_usize..WRAPPED_LEN, byte: u8, cut in 0_usize..=WRAPPED_LEN) {
            let mut bytes = KeyFile::new(&key(), Some((b"pw", fast()))).unwrap().to_bytes().to_vec();
            bytes[index] = byte;
            bytes.truncate(cut);
            if let Ok(file) = KeyFile::parse(&bytes) {
                let _ = file.unlock(Some(b"pw"));
            }
        }
    }
}
