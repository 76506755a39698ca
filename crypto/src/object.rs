//! Sealing and opening objects: XChaCha20-Poly1305 with a fresh random nonce per object.
//!
//! Layout of a sealed object (all integers little-endian; see `docs/format.md`):
//!
//! ```text
//! offset  len  field
//!      0    1  format version (1)
//!      1    1  object kind (1 chunk, 2 tree, 3 snapshot, 4 other)
//!      2    4  key check: a 32-bit public fingerprint of the master key
//!      6   24  nonce, random for every seal
//!     30    n  ciphertext of the payload
//!   30+n   16  Poly1305 tag
//! ```
//!
//! The associated data is `MAGIC || bytes 0..6 || object id`: the magic, version,
//! kind, key check and id are all authenticated, but only version, kind and key check
//! travel in the object (the magic is a constant, and the id is the object's name,
//! known to both sides).

use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{Tag, XNonce};

use crate::error::Error;
use crate::id::{ObjectId, ObjectKind};
use crate::key::KeyRing;

/// Version of the sealed object format written by this build.
pub const OBJECT_FORMAT_VERSION: u8 = 1;
/// Bytes before the ciphertext: version, kind, key check and nonce.
pub const HEADER_LEN: usize = 30;
/// Length of the Poly1305 tag after the ciphertext.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed object adds to its payload.
pub const SEAL_OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// Domain-separation magic at the start of the associated data.
pub const OBJECT_MAGIC: &[u8; 16] = b"homing object v1";

const NONCE_LEN: usize = 24;
const NONCE_AT: usize = 6;
const AD_LEN: usize = OBJECT_MAGIC.len() + NONCE_AT + ObjectId::LEN;

impl KeyRing {
    /// Seals `payload` as an object of `kind` named `id`, with a fresh random nonce.
    ///
    /// # Errors
    /// [`Error::Random`] if the operating system cannot provide a nonce.
    pub fn seal(&self, kind: ObjectKind, id: &ObjectId, payload: &[u8]) -> Result<Vec<u8>, Error> {
        let mut buffer = Vec::with_capacity(SEAL_OVERHEAD + payload.len());
        buffer.resize(HEADER_LEN, 0);
        buffer.extend_from_slice(payload);
        self.seal_in_place(kind, id, &mut buffer)?;
        Ok(buffer)
    }

    /// Seals in place, without copying: on entry `buffer[HEADER_LEN..]` holds the
    /// payload (the first [`HEADER_LEN`] bytes are scratch); on return `buffer` is
    /// the sealed object. Lets a caller compress straight into the final buffer.
    ///
    /// # Errors
    /// [`Error::Random`] if the operating system cannot provide a nonce.
    ///
    /// # Panics
    /// If `buffer` is shorter than [`HEADER_LEN`]: that is a bug in the caller.
    pub fn seal_in_place(
        &self,
        kind: ObjectKind,
        id: &ObjectId,
        buffer: &mut Vec<u8>,
    ) -> Result<(), Error> {
        let mut nonce = [0_u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(Error::Random)?;
        self.seal_with_nonce(kind, id, buffer, nonce);
        Ok(())
    }

    /// Seals with a nonce chosen by the caller. Only for known-answer vectors:
    /// reusing a nonce under the same key destroys confidentiality and integrity.
    #[cfg(any(test, feature = "danger-fixed-nonce"))]
    pub fn danger_seal_with_fixed_nonce(
        &self,
        kind: ObjectKind,
        id: &ObjectId,
        payload: &[u8],
        nonce: [u8; 24],
    ) -> Vec<u8> {
        let mut buffer = vec![0; HEADER_LEN];
        buffer.extend_from_slice(payload);
        self.seal_with_nonce(kind, id, &mut buffer, nonce);
        buffer
    }

    fn seal_with_nonce(
        &self,
        kind: ObjectKind,
        id: &ObjectId,
        buffer: &mut Vec<u8>,
        nonce: [u8; NONCE_LEN],
    ) {
        assert!(
            buffer.len() >= HEADER_LEN,
            "seal_in_place needs HEADER_LEN bytes of scratch before the payload"
        );
        buffer[0] = OBJECT_FORMAT_VERSION;
        buffer[1] = kind.to_byte();
        buffer[2..NONCE_AT].copy_from_slice(&self.key_check.to_le_bytes());
        buffer[NONCE_AT..HEADER_LEN].copy_from_slice(&nonce);
        let ad = associated_data(&buffer[..NONCE_AT], id);
        let body = &mut buffer[HEADER_LEN..];
        let nonce = XNonce::from(nonce);
        // XChaCha20-Poly1305 refuses only payloads over 256 GiB; objects are bounded
        // far below that by the chunker and the tree builder.
        let tag = self
            .cipher(kind)
            .encrypt_inout_detached(&nonce, &ad, body.into())
            .expect("an object payload is far below XChaCha20-Poly1305's 256 GiB limit");
        buffer.extend_from_slice(&tag);
    }

    /// Opens a sealed object, checking that it is an object of `kind` named `id`
    /// sealed under this key, and returns its payload.
    ///
    /// # Errors
    /// A typed error for a truncated object, an unknown format version, an unknown
    /// or wrong kind, an object of another key, and any modification (including a
    /// wrong id), in that order of checking.
    pub fn open(&self, kind: ObjectKind, id: &ObjectId, sealed: &[u8]) -> Result<Vec<u8>, Error> {
        let Parts { header, body, tag } = self.check_header(kind, id, sealed)?;
        let mut payload = vec![0_u8; body.len()];
        let ad = associated_data(&header[..NONCE_AT], id);
        let nonce: [u8; NONCE_LEN] = header[NONCE_AT..HEADER_LEN]
            .try_into()
            .expect("check_header returns a header of HEADER_LEN bytes");
        let tag: [u8; TAG_LEN] = tag
            .try_into()
            .expect("check_header returns TAG_LEN tag bytes");
        let buffer = chacha20poly1305::aead::inout::InOutBuf::new(body, &mut payload)
            .expect("input and output have the same length");
        self.cipher(kind)
            .decrypt_inout_detached(&XNonce::from(nonce), &ad, buffer, &Tag::from(tag))
            .map_err(|_| Error::Authentication { id: *id })?;
        Ok(payload)
    }

    fn check_header<'a>(
        &self,
        kind: ObjectKind,
        id: &ObjectId,
        sealed: &'a [u8],
    ) -> Result<Parts<'a>, Error> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(Error::ObjectTruncated {
                id: *id,
                len: sealed.len(),
                min: SEAL_OVERHEAD,
            });
        }
        if sealed[0] != OBJECT_FORMAT_VERSION {
            return Err(Error::ObjectVersion {
                id: *id,
                version: sealed[0],
                supported: OBJECT_FORMAT_VERSION,
            });
        }
        let found = ObjectKind::from_byte(sealed[1]).ok_or(Error::UnknownKind {
            id: *id,
            byte: sealed[1],
        })?;
        if found != kind {
            return Err(Error::WrongKind {
                id: *id,
                expected: kind,
                found,
            });
        }
        let check = u32::from_le_bytes([sealed[2], sealed[3], sealed[4], sealed[5]]);
        if check != self.key_check {
            return Err(Error::WrongKey {
                id: *id,
                expected: self.key_check,
                found: check,
            });
        }
        let (header, rest) = sealed.split_at(HEADER_LEN);
        let (body, tag) = rest.split_at(rest.len() - TAG_LEN);
        Ok(Parts { header, body, tag })
    }
}

/// The three parts of a sealed object whose header passed the checks.
struct Parts<'a> {
    header: &'a [u8],
    body: &'a [u8],
    tag: &'a [u8],
}

/// Reads the kind byte of a sealed object without opening it, for tools that sort
/// objects; the answer is unauthenticated until [`KeyRing::open`] succeeds.
pub fn peek_kind(sealed: &[u8]) -> Option<ObjectKind> {
    sealed.get(1).copied().and_then(ObjectKind::from_byte)
}

fn associated_data(header: &[u8], id: &ObjectId) -> [u8; AD_LEN] {
    let mut ad = [0_u8; AD_LEN];
    ad[..OBJECT_MAGIC.len()].copy_from_slice(OBJECT_MAGIC);
    ad[OBJECT_MAGIC.len()..OBJECT_MAGIC.len() + NONCE_AT].copy_from_slice(header);
    ad[OBJECT_MAGIC.len() + NONCE_AT..].copy_from_slice(id.as_bytes());
    ad
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::key::MasterKey;

    fn ring(byte: u8) -> KeyRing {
        MasterKey::from_bytes(&mut [byte; 32]).key_ring()
    }

    #[test]
    fn seal_then_open_returns_the_payload() {
        let keys = ring(1);
        let payload = b"the quick brown fox";
        let id = keys.object_id(payload);
        let sealed = keys.seal(ObjectKind::Chunk, &id, payload).unwrap();
        assert_eq!(sealed.len(), payload.len() + SEAL_OVERHEAD);
        assert_eq!(keys.open(ObjectKind::Chunk, &id, &sealed).unwrap(), payload);
    }

    #[test]
    fn nonces_are_fresh_for_every_seal() {
        let keys = ring(1);
        let id = keys.object_id(b"x");
        let a = keys.seal(ObjectKind::Chunk, &id, b"x").unwrap();
        let b = keys.seal(ObjectKind::Chunk, &id, b"x").unwrap();
        assert_ne!(a[NONCE_AT..HEADER_LEN], b[NONCE_AT..HEADER_LEN]);
        assert_ne!(a, b);
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        let keys = ring(2);
        let payload: Vec<u8> = (0..200_u8).collect();
        let id = keys.object_id(&payload);
        let sealed = keys.seal(ObjectKind::Tree, &id, &payload).unwrap();
        for bit in 0..sealed.len() * 8 {
            let mut bad = sealed.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                keys.open(ObjectKind::Tree, &id, &bad).is_err(),
                "flip of bit {bit} was accepted"
            );
        }
    }

    #[test]
    fn each_kind_of_bad_object_gets_its_own_error() {
        let keys = ring(3);
        let payload = b"payload";
        let id = keys.object_id(payload);
        let sealed = keys.seal(ObjectKind::Snapshot, &id, payload).unwrap();

        let truncated = keys.open(ObjectKind::Snapshot, &id, &sealed[..SEAL_OVERHEAD - 1]);
        assert!(matches!(
            truncated,
            Err(Error::ObjectTruncated { len: 45, .. })
        ));
        // Cutting the tag short but keeping the minimum length is an authentication failure.
        let short = keys.open(ObjectKind::Snapshot, &id, &sealed[..sealed.len() - 1]);
        assert!(matches!(short, Err(Error::Authentication { .. })));

        let mut future = sealed.clone();
        future[0] = 2;
        let result = keys.open(ObjectKind::Snapshot, &id, &future);
        assert!(matches!(
            result,
            Err(Error::ObjectVersion {
                version: 2,
                supported: 1,
                ..
            })
        ));

        let wrong_kind = keys.open(ObjectKind::Chunk, &id, &sealed);
        assert!(matches!(
            wrong_kind,
            Err(Error::WrongKind {
                expected: ObjectKind::Chunk,
                found: ObjectKind::Snapshot,
                ..
            })
        ));

        let mut unknown = sealed.clone();
        unknown[1] = 0x7f;
        let result = keys.open(ObjectKind::Snapshot, &id, &unknown);
        assert!(matches!(result, Err(Error::UnknownKind { byte: 0x7f, .. })));

        let other = ring(4);
        let result = other.open(ObjectKind::Snapshot, &id, &sealed);
        assert!(matches!(result, Err(Error::WrongKey { .. })), "{result:?}");

        let other_id = keys.object_id(b"another payload");
        let result = keys.open(ObjectKind::Snapshot, &other_id, &sealed);
        assert!(matches!(result, Err(Error::Authentication { id }) if id == other_id));
    }

    #[test]
    fn relabelling_the_kind_byte_fails_authentication() {
        let keys = ring(5);
        let id = keys.object_id(b"data");
        // Chunks and "other" objects share a subkey, so only the associated data
        // stops the store from relabelling one as the other.
        let mut sealed = keys.seal(ObjectKind::Chunk, &id, b"data").unwrap();
        sealed[1] = ObjectKind::Other.to_byte();
        let result = keys.open(ObjectKind::Other, &id, &sealed);
        assert!(matches!(result, Err(Error::Authentication { .. })));
    }

    #[test]
    fn peek_kind_reads_the_kind_byte() {
        let keys = ring(6);
        let id = keys.object_id(b"");
        let sealed = keys.seal(ObjectKind::Tree, &id, b"").unwrap();
        assert_eq!(peek_kind(&sealed), Some(ObjectKind::Tree));
        assert_eq!(peek_kind(&[1]), None);
    }

    proptest! {
        #[test]
        fn seal_open_round_trip(payload in proptest::collection::vec(any::<u8>(), 0..4096),
                                kind in 0_usize..4) {
            let keys = ring(9);
            let kind = ObjectKind::ALL[kind];
            let id = keys.object_id(&payload);
            let sealed = keys.seal(kind, &id, &payload).unwrap();
            prop_assert_eq!(keys.open(kind, &id, &sealed).unwrap(), payload);
        }

        #[test]
        fn open_of_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512),
                                                kind in 0_usize..4) {
            let keys = ring(9);
            let id = ObjectId::from_bytes([0; 32]);
            prop_assert!(keys.open(ObjectKind::ALL[kind], &id, &bytes).is_err());
        }
    }
}
