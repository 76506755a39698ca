//! The master key and the subkeys derived from it.

use std::fmt;

use chacha20poly1305::{KeyInit, XChaCha20Poly1305};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::Error;
use crate::id::{ObjectId, ObjectKind};

/// Context strings for BLAKE3 `derive_key`, one per purpose.
///
/// They follow BLAKE3's advice ("application, date, purpose") and carry a version:
/// changing any of them changes every id and every sealed object, so they are part of
/// the format (see `docs/format.md`) and pinned by the known-answer vectors.
pub mod context {
    /// Subkey for object ids (keyed hash of plaintext).
    pub const OBJECT_ID: &str = "homing 2026-11-27 object id v1";
    /// Subkey sealing chunk objects and other objects.
    pub const DATA: &str = "homing 2026-11-27 data sealing v1";
    /// Subkey sealing tree objects.
    pub const TREE: &str = "homing 2026-11-27 tree sealing v1";
    /// Subkey sealing snapshot manifests.
    pub const SNAPSHOT: &str = "homing 2026-11-27 snapshot manifest sealing v1";
    /// Subkey for the client's local state (index, spool, head records).
    pub const LOCAL_STATE: &str = "homing 2026-11-27 local state v1";
    /// Seed of the chunker's gear table.
    pub const CHUNKER_SEED: &str = "homing 2026-11-27 chunker gear seed v1";
    /// The key check stored in every sealed object, and the key fingerprint shown to users.
    pub const KEY_CHECK: &str = "homing 2026-11-27 key check v1";
}

/// Length of a master key or a subkey in bytes.
pub const KEY_LEN: usize = 32;

/// A backup owner's master key: 256 random bits from which every other key derives.
///
/// Losing it loses the backups. It has no `Clone`, its `Debug` is redacted, and its
/// bytes are zeroized when it is dropped.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct MasterKey {
    bytes: [u8; KEY_LEN],
}

impl MasterKey {
    /// Draws a new master key from the operating system's random number generator.
    ///
    /// # Errors
    /// [`Error::Random`] if the operating system cannot provide randomness.
    pub fn generate() -> Result<Self, Error> {
        let mut key = Self {
            bytes: [0; KEY_LEN],
        };
        getrandom::fill(&mut key.bytes).map_err(Error::Random)?;
        Ok(key)
    }

    /// Takes ownership of key bytes, for example decoded from a paper form; the
    /// caller's array is zeroized.
    pub fn from_bytes(bytes: &mut [u8; KEY_LEN]) -> Self {
        let key = Self { bytes: *bytes };
        bytes.zeroize();
        key
    }

    /// The raw key bytes, for writing the key file and the paper form only.
    pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }

    /// Derives every subkey. Cheap enough to call once per process.
    pub fn key_ring(&self) -> KeyRing {
        KeyRing::derive(self)
    }

    /// A short public fingerprint that names this key in messages and in the paper
    /// form, without revealing anything about it.
    pub fn fingerprint(&self) -> KeyFingerprint {
        KeyFingerprint(key_check(&self.bytes))
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({}, secret redacted)", self.fingerprint())
    }
}

/// A public, 32-bit name for a master key (the key check of every sealed object).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyFingerprint(pub(crate) u32);

impl KeyFingerprint {
    /// The fingerprint as a number.
    pub const fn value(self) -> u32 {
        self.0
    }
}

impl fmt::Display for KeyFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

/// A 256-bit subkey derived from the master key. No `Clone`, redacted `Debug`,
/// zeroized on drop.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct SubKey([u8; KEY_LEN]);

impl SubKey {
    fn derive(context: &str, master: &MasterKey) -> Self {
        Self(blake3::derive_key(context, &master.bytes))
    }

    /// The raw subkey bytes, for keyed hashing or sealing of local state.
    pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for SubKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SubKey(secret redacted)")
    }
}

/// Every subkey of one master key, ready for use.
///
/// A `KeyRing` computes object ids ([`KeyRing::object_id`]) and seals and opens
/// objects ([`KeyRing::seal`], [`KeyRing::open`]); see the crate documentation for
/// an example.
pub struct KeyRing {
    pub(crate) id: SubKey,
    pub(crate) data: XChaCha20Poly1305,
    pub(crate) tree: XChaCha20Poly1305,
    pub(crate) snapshot: XChaCha20Poly1305,
    local_state: SubKey,
    chunker_seed: u64,
    pub(crate) key_check: u32,
}

impl KeyRing {
    fn derive(master: &MasterKey) -> Self {
        let cipher = |context| {
            let key = Zeroizing::new(blake3::derive_key(context, &master.bytes));
            XChaCha20Poly1305::new(&(*key).into())
        };
        let seed = Zeroizing::new(blake3::derive_key(context::CHUNKER_SEED, &master.bytes));
        let mut seed_bytes = [0_u8; 8];
        seed_bytes.copy_from_slice(&seed[..8]);
        Self {
            id: SubKey::derive(context::OBJECT_ID, master),
            data: cipher(context::DATA),
            tree: cipher(context::TREE),
            snapshot: cipher(context::SNAPSHOT),
            local_state: SubKey::derive(context::LOCAL_STATE, master),
            chunker_seed: u64::from_le_bytes(seed_bytes),
            key_check: key_check(&master.bytes),
        }
    }

    /// The id of an object with this plaintext: BLAKE3 keyed with the id subkey.
    pub fn object_id(&self, plaintext: &[u8]) -> ObjectId {
        ObjectId::from_bytes(*blake3::keyed_hash(&self.id.0, plaintext).as_bytes())
    }

    /// The seed for the chunker's gear table, so that chunk boundaries (and with them
    /// the sizes of a known file's chunks) cannot be predicted without the key.
    pub fn chunker_seed(&self) -> u64 {
        self.chunker_seed
    }

    /// The subkey for the client's local state.
    pub fn local_state(&self) -> &SubKey {
        &self.local_state
    }

    /// The fingerprint of the master key this ring derives from.
    pub fn fingerprint(&self) -> KeyFingerprint {
        KeyFingerprint(self.key_check)
    }

    pub(crate) fn cipher(&self, kind: ObjectKind) -> &XChaCha20Poly1305 {
        match kind {
            ObjectKind::Chunk | ObjectKind::Other => &self.data,
            ObjectKind::Tree => &self.tree,
            ObjectKind::Snapshot => &self.snapshot,
        }
    }
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyRing({}, secrets redacted)", self.fingerprint())
    }
}

fn key_check(master: &[u8; KEY_LEN]) -> u32 {
    let derived = Zeroizing::new(blake3::derive_key(context::KEY_CHECK, master));
    u32::from_le_bytes([derived[0], derived[1], derived[2], derived[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subkeys_differ_from_each_other_and_from_the_master() {
        let master = MasterKey::from_bytes(&mut [7; KEY_LEN]);
        let contexts = [
            context::OBJECT_ID,
            context::DATA,
            context::TREE,
            context::SNAPSHOT,
            context::LOCAL_STATE,
            context::CHUNKER_SEED,
            context::KEY_CHECK,
        ];
        let mut keys: Vec<[u8; 32]> = contexts
            .iter()
            .map(|c| blake3::derive_key(c, master.expose_secret()))
            .collect();
        keys.push(*master.expose_secret());
        let count = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), count);
    }

    #[test]
    fn debug_output_hides_secrets() {
        let mut bytes = [0xAB; KEY_LEN];
        let master = MasterKey::from_bytes(&mut bytes);
        assert_eq!(bytes, [0; KEY_LEN], "the caller's copy is zeroized");
        let shown = format!(
            "{master:?} {:?} {:?}",
            master.key_ring(),
            master.key_ring().local_state()
        );
        assert!(!shown.to_lowercase().contains("abab"), "{shown}");
        assert!(!shown.contains("171"), "{shown}");
    }

    #[test]
    fn generated_keys_differ() {
        let a = MasterKey::generate().unwrap();
        let b = MasterKey::generate().unwrap();
        assert_ne!(a.expose_secret(), b.expose_secret());
    }
}
