//! Sealed objects: compress (when it helps), then seal; open, decompress, verify.
//!
//! The payload that the crypto layer seals starts with one codec byte, so whether an
//! object was compressed is itself encrypted:
//!
//! ```text
//! payload = codec (0 = stored, 1 = zstd frame) || body
//! ```
//!
//! An object's id is the keyed hash of its *uncompressed* plaintext, so the same
//! content has the same id whatever the compression did.

use homing_crypto::{HEADER_LEN, KeyRing, ObjectId, ObjectKind, TAG_LEN};

use crate::error::Error;

/// The largest plaintext of any object Homing writes (chunks are far smaller; tree
/// objects of huge directories are split before they reach this).
pub const MAX_OBJECT_PLAINTEXT: usize = 16 * 1024 * 1024;

/// The default zstd level: fast enough to keep up with the primitives on one core.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

const CODEC_STORED: u8 = 0;
const CODEC_ZSTD: u8 = 1;
const PAYLOAD_AT: usize = HEADER_LEN + 1;

/// An object ready for the spool and the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedObject {
    /// Its id (keyed hash of the plaintext).
    pub id: ObjectId,
    /// Its kind.
    pub kind: ObjectKind,
    /// Length of the plaintext.
    pub plain_len: u32,
    /// The sealed bytes, as stored and sent.
    pub bytes: Vec<u8>,
}

/// Turns plaintexts into sealed objects. One per thread: it owns a zstd context.
pub struct Sealer<'k> {
    keys: &'k KeyRing,
    compressor: zstd::bulk::Compressor<'static>,
}

impl<'k> Sealer<'k> {
    /// A sealer compressing at the given zstd level (1-22; 0 means zstd's default).
    ///
    /// # Errors
    /// [`Error::Compress`] if zstd cannot set up a context at that level.
    pub fn new(keys: &'k KeyRing, zstd_level: i32) -> Result<Self, Error> {
        let compressor = zstd::bulk::Compressor::new(zstd_level).map_err(Error::Compress)?;
        Ok(Self { keys, compressor })
    }

    /// The id `plaintext` has as an object.
    pub fn object_id(&self, plaintext: &[u8]) -> ObjectId {
        self.keys.object_id(plaintext)
    }

    /// Seals `plaintext` as an object of `kind`.
    ///
    /// # Errors
    /// [`Error::TooLarge`] past [`MAX_OBJECT_PLAINTEXT`]; [`Error::Crypto`] if no
    /// nonce can be drawn.
    pub fn seal(&mut self, kind: ObjectKind, plaintext: &[u8]) -> Result<SealedObject, Error> {
        let id = self.keys.object_id(plaintext);
        self.seal_with_id(kind, id, plaintext)
    }

    /// Seals `plaintext` whose id the caller has already computed (for example to
    /// skip objects the store has).
    ///
    /// # Errors
    /// As [`Sealer::seal`].
    pub fn seal_with_id(
        &mut self,
        kind: ObjectKind,
        id: ObjectId,
        plaintext: &[u8],
    ) -> Result<SealedObject, Error> {
        if plaintext.len() > MAX_OBJECT_PLAINTEXT {
            return Err(Error::TooLarge {
                id,
                len: plaintext.len() as u64,
                limit: MAX_OBJECT_PLAINTEXT as u64,
            });
        }
        // Compress straight into the final buffer, after room for the header and
        // the codec byte, with room for the tag at the end: nothing is zeroed
        // first, and sealing does not have to grow (copy) the buffer. A compressed
        // body must be strictly smaller than the plaintext to be worth its
        // decompression.
        let mut bytes = Vec::with_capacity(PAYLOAD_AT + plaintext.len() + TAG_LEN);
        bytes.resize(PAYLOAD_AT, 0);
        let compressed = if plaintext.is_empty() || looks_incompressible(plaintext) {
            false
        } else {
            let mut out = std::io::Cursor::new(bytes);
            out.set_position(PAYLOAD_AT as u64);
            let result = self.compressor.compress_to_buffer(plaintext, &mut out);
            bytes = out.into_inner();
            matches!(result, Ok(len) if len < plaintext.len())
        };
        if compressed {
            bytes[HEADER_LEN] = CODEC_ZSTD;
        } else {
            bytes.truncate(PAYLOAD_AT);
            bytes[HEADER_LEN] = CODEC_STORED;
            bytes.extend_from_slice(plaintext);
        }
        self.keys.seal_in_place(kind, &id, &mut bytes)?;
        Ok(SealedObject {
            id,
            kind,
            plain_len: u32::try_from(plaintext.len()).expect("bounded by MAX_OBJECT_PLAINTEXT"),
            bytes,
        })
    }
}

/// Plaintexts shorter than this are always offered to zstd.
const PROBE_MIN: usize = 8 * 1024;
/// Bytes sampled at each of [`PROBE_SPOTS`] spots spread over the plaintext.
const PROBE_SPAN: usize = 512;
const PROBE_SPOTS: usize = 8;
/// Byte entropy (bits per byte, measured on one spot) above which a spot looks
/// random. 512 random bytes measure 7.64 on average (a small sample falls short
/// of 8) and rarely below 7.5; text measures about 4.5, machine code about 6,
/// a run of zeros 0.
const PROBE_ENTROPY: f64 = 7.3;

/// `c * log2(c)` for the counts a spot can have.
fn c_log2_c() -> &'static [f64; PROBE_SPAN + 1] {
    static TABLE: std::sync::OnceLock<[f64; PROBE_SPAN + 1]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = [0.0; PROBE_SPAN + 1];
        for (count, slot) in table.iter_mut().enumerate().skip(1) {
            let c = count as f64;
            *slot = c * c.log2();
        }
        table
    })
}

/// Whether `plaintext` looks like compressed or encrypted data (photos, video,
/// archives), on which zstd's match finder would run over every byte only to
/// give up. Every one of the spots spread over the plaintext must look random:
/// text, code or zeros at any of them send the plaintext to zstd. A wrong guess
/// costs only compression, never correctness (the id does not depend on it).
fn looks_incompressible(plaintext: &[u8]) -> bool {
    if plaintext.len() < PROBE_MIN {
        return false;
    }
    let table = c_log2_c();
    let stride = (plaintext.len() - PROBE_SPAN) / (PROBE_SPOTS - 1);
    let span = PROBE_SPAN as f64;
    (0..PROBE_SPOTS).all(|spot| {
        let mut counts = [0_u16; 256];
        let at = spot * stride;
        for &byte in &plaintext[at..at + PROBE_SPAN] {
            counts[usize::from(byte)] += 1;
        }
        let sum: f64 = counts.iter().map(|&c| table[usize::from(c)]).sum();
        span.log2() - sum / span > PROBE_ENTROPY
    })
}

/// Opens a sealed object: authenticates it as `kind` named `id`, decompresses it,
/// and checks that the plaintext hashes to `id`.
///
/// # Errors
/// [`Error::Crypto`] for anything the authentication catches (tampering, wrong
/// kind, wrong key, wrong id), [`Error::Decompress`] or [`Error::TooLarge`] for a
/// bad payload, [`Error::IdMismatch`] if the content does not match its id.
pub fn open_object(
    keys: &KeyRing,
    kind: ObjectKind,
    id: &ObjectId,
    sealed: &[u8],
) -> Result<Vec<u8>, Error> {
    // Refuse before decrypting anything: no object Homing writes is this large.
    let limit = (MAX_OBJECT_PLAINTEXT + 1 + homing_crypto::SEAL_OVERHEAD) as u64;
    if sealed.len() as u64 > limit {
        return Err(Error::TooLarge {
            id: *id,
            len: sealed.len() as u64,
            limit,
        });
    }
    let payload = keys.open(kind, id, sealed)?;
    let damaged = |reason: &str| Error::Decompress {
        id: *id,
        reason: reason.to_string(),
    };
    let (&codec, body) = payload
        .split_first()
        .ok_or_else(|| damaged("empty payload"))?;
    let plaintext = match codec {
        CODEC_STORED => body.to_vec(),
        CODEC_ZSTD => {
            let claimed = zstd::zstd_safe::get_frame_content_size(body)
                .map_err(|_| damaged("not a zstd frame"))?
                .ok_or_else(|| damaged("zstd frame without content size"))?;
            if claimed > MAX_OBJECT_PLAINTEXT as u64 {
                return Err(Error::TooLarge {
                    id: *id,
                    len: claimed,
                    limit: MAX_OBJECT_PLAINTEXT as u64,
                });
            }
            // The claimed size is bounded above, so this allocation is too.
            let mut out = Vec::with_capacity(claimed as usize);
            zstd::bulk::Decompressor::new()
                .and_then(|mut d| d.decompress_to_buffer(body, &mut out))
                .map_err(|e| damaged(&e.to_string()))?;
            out
        }
        other => return Err(damaged(&format!("unknown codec byte {other:#04x}"))),
    };
    if keys.object_id(&plaintext) != *id {
        return Err(Error::IdMismatch { id: *id });
    }
    Ok(plaintext)
}

#[cfg(test)]
mod tests {
    use homing_crypto::MasterKey;
    use proptest::prelude::*;

    use super::*;

    fn keys() -> KeyRing {
        MasterKey::from_bytes(&mut [3; 32]).key_ring()
    }

    #[test]
    fn compressible_data_is_compressed_and_round_trips() {
        let keys = keys();
        let mut sealer = Sealer::new(&keys, DEFAULT_ZSTD_LEVEL).unwrap();
        let text = "all work and no play makes jack a dull boy\n".repeat(1000);
        let object = sealer.seal(ObjectKind::Chunk, text.as_bytes()).unwrap();
        assert!(
            object.bytes.len() < text.len() / 10,
            "{} bytes",
            object.bytes.len()
        );
        let back = open_object(&keys, ObjectKind::Chunk, &object.id, &object.bytes).unwrap();
        assert_eq!(back, text.as_bytes());
    }

    #[test]
    fn incompressible_data_is_stored_with_fixed_overhead() {
        let keys = keys();
        let mut sealer = Sealer::new(&keys, DEFAULT_ZSTD_LEVEL).unwrap();
        let noise: Vec<u8> = (0..10_000_u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let object = sealer.seal(ObjectKind::Chunk, &noise).unwrap();
        assert!(object.bytes.len() <= noise.len() + homing_crypto::SEAL_OVERHEAD + 1);
        let back = open_object(&keys, ObjectKind::Chunk, &object.id, &object.bytes).unwrap();
        assert_eq!(back, noise);
    }

    /// xorshift64: bytes no compressor can shrink.
    fn random(len: usize, mut state: u64) -> Vec<u8> {
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    #[test]
    fn random_bytes_skip_zstd_and_anything_with_structure_does_not() {
        // Random bytes are recognised every time (a miss would only cost time).
        for seed in 1..500 {
            assert!(looks_incompressible(&random(32 * 1024, seed)), "{seed}");
        }
        assert!(looks_incompressible(&random(PROBE_MIN, 2)));
        // Text, zeros, and random data with a run of text or zeros in it are
        // offered to zstd.
        let text = "all work and no play makes jack a dull boy\n".repeat(800);
        assert!(!looks_incompressible(text.as_bytes()));
        assert!(!looks_incompressible(&vec![0; 32 * 1024]));
        for (at, len) in [(0, 6000), (13_000, 5000), (32 * 1024 - 5000, 5000)] {
            let mut mixed = random(32 * 1024, 3);
            mixed[at..at + len].fill(0);
            assert!(!looks_incompressible(&mixed), "zeros at {at}");
            mixed[at..at + len].copy_from_slice(&text.as_bytes()[..len]);
            assert!(!looks_incompressible(&mixed), "text at {at}");
        }
        // Short plaintexts always go to zstd.
        assert!(!looks_incompressible(&random(PROBE_MIN - 1, 4)));
    }

    #[test]
    fn ids_do_not_depend_on_compression() {
        let keys = keys();
        let data = b"same content".repeat(100);
        let fast = Sealer::new(&keys, 1)
            .unwrap()
            .seal(ObjectKind::Chunk, &data)
            .unwrap();
        let slow = Sealer::new(&keys, 19)
            .unwrap()
            .seal(ObjectKind::Chunk, &data)
            .unwrap();
        assert_eq!(fast.id, slow.id);
        assert_eq!(fast.id, keys.object_id(&data));
    }

    #[test]
    fn a_payload_that_lies_about_its_size_is_refused() {
        let keys = keys();
        // A valid zstd frame of 17 MiB of zeros, sealed with the right key: a
        // decompression bomb from someone who holds the key.
        let bomb = zstd::bulk::compress(&vec![0; MAX_OBJECT_PLAINTEXT + 1024 * 1024], 3).unwrap();
        let mut payload = vec![CODEC_ZSTD];
        payload.extend_from_slice(&bomb);
        let id = keys.object_id(b"whatever");
        let sealed = keys.seal(ObjectKind::Chunk, &id, &payload).unwrap();
        let result = open_object(&keys, ObjectKind::Chunk, &id, &sealed);
        assert!(matches!(result, Err(Error::TooLarge { .. })), "{result:?}");
    }

    #[test]
    fn damaged_payloads_and_wrong_content_get_their_own_errors() {
        let keys = keys();
        let id = keys.object_id(b"content");
        let unknown_codec = keys.seal(ObjectKind::Chunk, &id, &[9, 1, 2]).unwrap();
        let result = open_object(&keys, ObjectKind::Chunk, &id, &unknown_codec);
        assert!(
            matches!(result, Err(Error::Decompress { .. })),
            "{result:?}"
        );

        let not_zstd = keys
            .seal(ObjectKind::Chunk, &id, &[CODEC_ZSTD, 1, 2, 3])
            .unwrap();
        let result = open_object(&keys, ObjectKind::Chunk, &id, &not_zstd);
        assert!(
            matches!(result, Err(Error::Decompress { .. })),
            "{result:?}"
        );

        // Authentic, but its content is not what the id names.
        let forged = keys
            .seal(ObjectKind::Chunk, &id, &[CODEC_STORED, b'x'])
            .unwrap();
        let result = open_object(&keys, ObjectKind::Chunk, &id, &forged);
        assert!(
            matches!(result, Err(Error::IdMismatch { .. })),
            "{result:?}"
        );

        let mut flipped = keys
            .seal(ObjectKind::Chunk, &id, &[CODEC_STORED, 1])
            .unwrap();
        flipped[40] ^= 1;
        let result = open_object(&keys, ObjectKind::Chunk, &id, &flipped);
        assert!(matches!(result, Err(Error::Crypto(_))), "{result:?}");
    }

    #[test]
    fn the_empty_object_round_trips() {
        let keys = keys();
        let object = Sealer::new(&keys, 3)
            .unwrap()
            .seal(ObjectKind::Tree, b"")
            .unwrap();
        assert_eq!(
            open_object(&keys, ObjectKind::Tree, &object.id, &object.bytes).unwrap(),
            b""
        );
    }

    proptest! {
        #[test]
        fn seal_open_round_trip(data in proptest::collection::vec(0_u8..4, 0..20_000)) {
            let keys = keys();
            let object = Sealer::new(&keys, 3).unwrap().seal(ObjectKind::Chunk, &data).unwrap();
            prop_assert_eq!(open_object(&keys, ObjectKind::Chunk, &object.id, &object.bytes).unwrap(), data);
        }

        #[test]
        fn open_of_arbitrary_payloads_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..600)) {
            let keys = keys();
            let id = keys.object_id(b"x");
            let sealed = keys.seal(ObjectKind::Chunk, &id, &payload).unwrap();
            let _ = open_object(&keys, ObjectKind::Chunk, &id, &sealed);
        }
    }
}
