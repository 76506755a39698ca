//! Known-answer vectors: a fixed key, fixed nonces and fixed plaintexts must give
//! exactly the ids and sealed bytes checked in under `tests/vectors/`, so that the
//! format never drifts silently. Old key files checked in there must still open.
//!
//! To write the file anew after a deliberate format change (which also needs a new
//! format version): `HOMING_BLESS=1 cargo test -p homing-crypto vectors`.

#![allow(clippy::unwrap_used)] // a test module: a failed unwrap is a failed test

use serde::{Deserialize, Serialize};

use crate::{KdfParams, KeyFile, MasterKey, ObjectId, ObjectKind, from_paper, to_paper};

const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/crypto-v1.json");

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Vectors {
    master_key: String,
    key_fingerprint: String,
    chunker_seed: u64,
    /// BLAKE3 of the local-state subkey: pins its context string without
    /// printing a subkey.
    local_state_subkey_hash: String,
    objects: Vec<ObjectVector>,
    paper_form: String,
    key_files: Vec<KeyFileVector>,
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct ObjectVector {
    kind: String,
    plaintext: String,
    nonce: String,
    id: String,
    sealed: String,
}

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct KeyFileVector {
    passphrase: Option<String>,
    bytes: String,
}

fn master() -> MasterKey {
    MasterKey::from_bytes(&mut core::array::from_fn(|i| i as u8))
}

fn kind_named(name: &str) -> ObjectKind {
    ObjectKind::ALL
        .into_iter()
        .find(|k| k.to_string() == name)
        .expect("vector names a known kind")
}

fn compute(previous_key_files: Option<Vec<KeyFileVector>>) -> Vectors {
    let master = master();
    let keys = master.key_ring();
    let plaintexts: [(&str, &[u8]); 5] = [
        ("chunk", b""),
        ("chunk", b"Homing backs up roaming laptops."),
        ("tree", &[0xff; 100]),
        ("snapshot", b"snapshot manifest"),
        ("other", b"chunk list page"),
    ];
    let objects = plaintexts
        .iter()
        .enumerate()
        .map(|(n, (kind, plaintext))| {
            let nonce: [u8; 24] = core::array::from_fn(|i| (i + 24 * n) as u8);
            let id = keys.object_id(plaintext);
            let sealed = keys.danger_seal_with_fixed_nonce(kind_named(kind), &id, plaintext, nonce);
            ObjectVector {
                kind: kind.to_string(),
                plaintext: hex::encode(plaintext),
                nonce: hex::encode(nonce),
                id: id.to_string(),
                sealed: hex::encode(sealed),
            }
        })
        .collect();
    // Wrapped key files draw a random salt and nonce, so they are made once and then
    // only read back: they are fixtures of files users already have.
    let key_files = previous_key_files.unwrap_or_else(|| {
        let params = KdfParams::try_new(256, 2, 1).unwrap();
        vec![
            KeyFileVector {
                passphrase: None,
                bytes: hex::encode(KeyFile::new(&master, None).unwrap().to_bytes()),
            },
            KeyFileVector {
                passphrase: Some("correct horse battery staple".into()),
                bytes: hex::encode(
                    KeyFile::new(&master, Some((b"correct horse battery staple", params)))
                        .unwrap()
                        .to_bytes(),
                ),
            },
        ]
    });
    Vectors {
        master_key: hex::encode(master.expose_secret()),
        key_fingerprint: master.fingerprint().to_string(),
        chunker_seed: keys.chunker_seed(),
        local_state_subkey_hash: blake3::hash(keys.local_state().expose_secret())
            .to_hex()
            .to_string(),
        objects,
        paper_form: to_paper(&master).to_string(),
        key_files,
    }
}

#[test]
fn known_answer_vectors_match_the_checked_in_file() {
    if std::env::var_os("HOMING_BLESS").is_some() {
        // Keep the key-file fixtures of an existing file: they stand for files that
        // users already have.
        // Read only the fixtures, so that a change to the other fields cannot drop them.
        let previous = std::fs::read_to_string(PATH)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| {
                serde_json::from_value::<Vec<KeyFileVector>>(v["key_files"].clone()).ok()
            });
        let vectors = compute(previous);
        let text = serde_json::to_string_pretty(&vectors).unwrap() + "\n";
        std::fs::write(PATH, text).unwrap();
    }
    let text = std::fs::read_to_string(PATH).expect("the vector file is checked in");
    let stored: Vectors = serde_json::from_str(&text).unwrap();
    let key_files = stored
        .key_files
        .iter()
        .map(|k| KeyFileVector {
            passphrase: k.passphrase.clone(),
            bytes: k.bytes.clone(),
        })
        .collect();
    assert_eq!(
        compute(Some(key_files)),
        stored,
        "the object format drifted"
    );
}

#[test]
fn checked_in_vectors_open_and_name_their_contents() {
    let text = std::fs::read_to_string(PATH).unwrap();
    let stored: Vectors = serde_json::from_str(&text).unwrap();
    let keys = master().key_ring();
    for object in &stored.objects {
        let id = ObjectId::from_hex(&object.id).unwrap();
        let sealed = hex::decode(&object.sealed).unwrap();
        let opened = keys.open(kind_named(&object.kind), &id, &sealed).unwrap();
        assert_eq!(hex::encode(&opened), object.plaintext);
        assert_eq!(keys.object_id(&opened), id);
    }
    for file in &stored.key_files {
        let parsed = KeyFile::parse(&hex::decode(&file.bytes).unwrap()).unwrap();
        let key = parsed
            .unlock(file.passphrase.as_deref().map(str::as_bytes))
            .unwrap();
        assert_eq!(key.expose_secret(), master().expose_secret());
    }
    let from_paper = from_paper(&stored.paper_form).unwrap();
    assert_eq!(from_paper.expose_secret(), master().expose_secret());
}
