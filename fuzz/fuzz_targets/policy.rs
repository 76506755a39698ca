//! Fuzzes the policy parser: a policy file is written by a person and may be
//! anything. Parsing must never panic; a policy that parses must decide without
//! panicking at any time.
#![no_main]

use std::path::Path;

use homing_policy::{Ledger, Policy, Queue, decide};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(policy) = Policy::parse(text, Path::new("fuzz.toml")) {
        let mut ledger = Ledger::default();
        for second in [0_i64, 1_790_000_000, 1_800_000_000] {
            let now = jiff::Timestamp::from_second(second).expect("a valid time");
            let granted = ledger.reserve(&policy, now, 1_000_000);
            ledger.settle(&policy, now, granted, granted / 2);
            let queue = Queue { critical: 1, normal: 1, bulk: 1 };
            let _ = decide(&policy, &ledger, &queue, now, second % 2 == 0);
        }
    }
});
