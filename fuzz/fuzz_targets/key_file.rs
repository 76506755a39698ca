//! Fuzzes the key file parser: a file on disk may be damaged or hostile. Parsing
//! must never panic nor allocate by a length in the file, and a file that parses
//! must never unlock with a wrong passphrase.
#![no_main]

use homing_crypto::KeyFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = KeyFile::parse(data) {
        // Re-encoding what parsed gives the same bytes.
        assert_eq!(file.to_bytes().as_slice(), data);
        // A wrapped key opens only with its passphrase: input the fuzzer made up
        // cannot carry a valid tag. (Bounded Argon2id cost keeps this affordable.)
        if file.kdf_params().is_some_and(|p| p.memory_kib() <= 1024 && p.passes() <= 2) {
            assert!(file.unlock(Some(b"not the passphrase")).is_err());
        }
    }
});
