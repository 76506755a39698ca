//! Fuzzes the decoders of what the store hands back once opened: trees, chunk
//! lists, manifests (compiled from their source). A damaged or hostile store
//! can only reach them through authenticated objects, but the decoders must
//! never panic nor allocate by a count they read; what decodes re-encodes.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code, missing_docs)]
#[path = "../../scheduler/src/tree.rs"]
mod tree;

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = tree::decode_tree(data) {
        assert_eq!(tree::encode_tree(&entries), data);
    }
    if let Ok(ids) = tree::decode_list(data) {
        assert_eq!(tree::encode_list(&ids), data);
    }
    if let Ok(content) = tree::Content::from_bytes(data) {
        assert_eq!(content.to_bytes(), data);
    }
    let _ = tree::Manifest::decode(data);
});
