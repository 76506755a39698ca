//! Fuzzes the client's `config.toml` parser (compiled from its source): a file a
//! person writes. Parsing must never panic, and an error must name a line.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

#[allow(dead_code, missing_docs)]
#[path = "../../scheduler/src/config.rs"]
mod config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(error) = config::Config::parse(text, Path::new("c.toml"), Path::new("/cfg")) {
        assert!(error.to_string().starts_with("c.toml"), "{error}");
    }
});
