//! Fuzzes the paper-form reader: people type it by hand, so any text must give a
//! key or a clear error, and a key that reads back must print as the same groups.
#![no_main]

use homing_crypto::{from_paper, to_paper};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(key) = from_paper(text) {
        let again = from_paper(&to_paper(&key)).expect("a printed form reads back");
        assert_eq!(again.expose_secret(), key.expose_secret());
    }
});
