//! Errors of the crypto crate: one enum for key files, objects and the paper form.

use std::io;
use std::path::PathBuf;

use crate::id::{ObjectId, ObjectKind};

/// Everything that can go wrong in `homing-crypto`.
///
/// Each variant says what failed and where (a path or an object id); the messages
/// end with what the user can do when there is something to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Reading or writing the key file failed at the operating-system level.
    #[error("cannot {action} key file {}: {source}", path.display())]
    KeyFileIo {
        /// What was being done: "open", "inspect", "read", "create", "write", "sync",
        /// "link", "sync the directory of".
        action: &'static str,
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The key file is readable by group or others.
    #[error(
        "key file {} has mode {mode:04o}, so group or others may read it; \
         run `chmod 600 {}` and check who may have copied it",
        path.display(), path.display()
    )]
    KeyFileInsecure {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A key file already exists where a new one was to be written.
    #[error(
        "key file {} already exists; Homing never overwrites a key \
         (move it away first if you really mean to replace it)",
        path.display()
    )]
    KeyFileExists {
        /// The existing file.
        path: PathBuf,
    },
    /// The key file's bytes are not a valid key file.
    #[error("key file {}: {source}", path.display())]
    KeyFile {
        /// The key file.
        path: PathBuf,
        /// What is wrong with its content.
        source: KeyFileError,
    },
    /// The operating system's random number generator failed.
    #[error("the operating system's random number generator failed: {0}")]
    Random(getrandom::Error),
    /// A sealed object is shorter than the smallest possible object.
    #[error("object {id} is truncated: {len} bytes, a sealed object has at least {min}")]
    ObjectTruncated {
        /// The object.
        id: ObjectId,
        /// Its length.
        len: usize,
        /// The minimum length of a sealed object.
        min: usize,
    },
    /// A sealed object has a format version this build does not read.
    #[error(
        "object {id} has format version {version}; this Homing reads version {supported}: upgrade Homing"
    )]
    ObjectVersion {
        /// The object.
        id: ObjectId,
        /// The version byte found.
        version: u8,
        /// The version this build reads.
        supported: u8,
    },
    /// A sealed object's kind byte names no known kind.
    #[error("object {id} has an unknown kind byte {byte:#04x}")]
    UnknownKind {
        /// The object.
        id: ObjectId,
        /// The kind byte found.
        byte: u8,
    },
    /// A sealed object is of another kind than the one asked for.
    #[error("object {id} is a {found} object where a {expected} object was expected")]
    WrongKind {
        /// The object.
        id: ObjectId,
        /// The kind asked for.
        expected: ObjectKind,
        /// The kind found in the object.
        found: ObjectKind,
    },
    /// A sealed object was sealed under another master key.
    #[error(
        "object {id} was sealed with another key (key check {found:08x}, this key's is \
         {expected:08x}): use the key these backups were made with"
    )]
    WrongKey {
        /// The object.
        id: ObjectId,
        /// Key check of this key ring.
        expected: u32,
        /// Key check found in the object.
        found: u32,
    },
    /// A sealed object failed authentication.
    #[error(
        "object {id} failed authentication: its bytes were modified, or it is not \
         the object with this id"
    )]
    Authentication {
        /// The object.
        id: ObjectId,
    },
    /// The paper form of a key could not be read.
    #[error("paper key: {0}")]
    Paper(#[from] PaperError),
}

/// What is wrong with the bytes of a key file (see `docs/format.md`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// The file does not start with the key file magic.
    #[error("not a Homing key file (it does not start with the key file magic)")]
    NotAKeyFile,
    /// The file ends before its fields do.
    #[error(
        "truncated: {len} bytes where {expected} were expected; restore it from your backup copy"
    )]
    Truncated {
        /// Bytes present.
        len: usize,
        /// Bytes the header promises.
        expected: usize,
    },
    /// The file has more bytes than its fields.
    #[error("{extra} unexpected bytes after the end of the key; the file is damaged")]
    TrailingBytes {
        /// How many bytes follow the key.
        extra: usize,
    },
    /// The format version is not one this build reads.
    #[error("format version {found}; this Homing reads version {supported}: upgrade Homing")]
    UnsupportedVersion {
        /// Version found.
        found: u8,
        /// Version this build reads.
        supported: u8,
    },
    /// The protection byte names no known protection.
    #[error("unknown protection scheme {0:#04x}")]
    UnknownProtection(u8),
    /// The checksum over the file does not match: the file is damaged.
    #[error(
        "checksum mismatch: the file is damaged; restore it from your backup copy or the paper form"
    )]
    Corrupt,
    /// The stored Argon2id parameters are outside the accepted range.
    #[error("Argon2id parameters out of range ({0})")]
    KdfParams(String),
    /// The key is protected by a passphrase and none was given.
    #[error("the key is protected by a passphrase; give it (or --passphrase-file)")]
    PassphraseRequired,
    /// The passphrase does not open the key.
    #[error("wrong passphrase")]
    WrongPassphrase,
}

/// What is wrong with a typed-in paper form of a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PaperError {
    /// A character outside the paper alphabet.
    #[error("character {ch:?} at position {position} is not part of the paper alphabet")]
    InvalidCharacter {
        /// The character.
        ch: char,
        /// Its position among the significant characters (1-based).
        position: usize,
    },
    /// Too few or too many characters.
    #[error("expected {expected} characters (9 groups of 8), found {found}")]
    WrongLength {
        /// Significant characters expected.
        expected: usize,
        /// Significant characters found.
        found: usize,
    },
    /// A group's check character does not match: a typo in that group.
    #[error("group {group} does not match its checksum: check it for a typo")]
    GroupChecksum {
        /// The group, 1-based as printed.
        group: usize,
    },
    /// Every group is well-formed but the whole-key check fails.
    #[error(
        "the groups are well-formed but do not belong together (groups swapped or mixed from two keys?)"
    )]
    KeyChecksum,
}
