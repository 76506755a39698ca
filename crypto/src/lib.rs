//! Homing's cryptography: the master key and its key file, subkeys, object ids, and
//! the sealing of objects.
//!
//! This crate does no IO apart from reading and writing the key file. It uses only
//! the RustCrypto and BLAKE3 implementations of its primitives:
//!
//! - a 256-bit [`MasterKey`] per backup owner, kept in a [`KeyFile`] (mode 0600,
//!   optionally wrapped by a passphrase with Argon2id) and printable on paper
//!   ([`to_paper`], [`from_paper`]);
//! - subkeys from BLAKE3 `derive_key` with versioned [`context`] strings, held in a
//!   [`KeyRing`];
//! - [`ObjectId`]: the BLAKE3 keyed hash of an object's plaintext, so the store can
//!   compare ids but never confirm that someone holds a known file;
//! - [`KeyRing::seal`] / [`KeyRing::open`]: XChaCha20-Poly1305 with a fresh random
//!   nonce; the associated data binds a magic, the format version, the object kind,
//!   the key check and the object id.
//!
//! The byte layouts are in `docs/format.md`.
//!
//! # Example
//!
//! ```
//! use homing_crypto::{MasterKey, ObjectKind};
//!
//! let master = MasterKey::generate()?;
//! let keys = master.key_ring();
//! let plaintext = b"contents of a file";
//! let id = keys.object_id(plaintext);
//! let sealed = keys.seal(ObjectKind::Chunk, &id, plaintext)?;
//! assert_eq!(keys.open(ObjectKind::Chunk, &id, &sealed)?, plaintext);
//! // The store may not relabel the object or serve it under another id.
//! assert!(keys.open(ObjectKind::Tree, &id, &sealed).is_err());
//! # Ok::<(), homing_crypto::Error>(())
//! ```
//!
//! # Features
//!
//! - `keys` (default): everything that touches key material. Without it, only
//!   [`ObjectId`] and [`ObjectKind`] remain, which is all the store server needs.
//! - `danger-fixed-nonce`: sealing with a caller-chosen nonce, for test vectors only.

mod id;

pub use id::{ObjectId, ObjectKind};

#[cfg(feature = "keys")]
mod error;
#[cfg(feature = "keys")]
mod key;
#[cfg(feature = "keys")]
mod keyfile;
#[cfg(feature = "keys")]
mod object;
#[cfg(feature = "keys")]
mod paper;

#[cfg(feature = "keys")]
pub use error::{Error, KeyFileError, PaperError};
#[cfg(feature = "keys")]
pub use key::{KEY_LEN, KeyFingerprint, KeyRing, MasterKey, SubKey, context};
#[cfg(feature = "keys")]
pub use keyfile::{KEY_FILE_MAGIC, KEY_FILE_VERSION, KdfParams, KeyFile};
#[cfg(feature = "keys")]
pub use object::{
    HEADER_LEN, OBJECT_FORMAT_VERSION, OBJECT_MAGIC, SEAL_OVERHEAD, TAG_LEN, peek_kind,
};
#[cfg(feature = "keys")]
pub use paper::{from_paper, to_paper};

#[cfg(all(test, feature = "keys"))]
mod vectors;
