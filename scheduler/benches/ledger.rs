//! The ledger's overhead per frame: what the metered stream asks of a
//! `LedgerMeter` for every write (reserve, then settle), against a meter that
//! charges nothing, in the same run. A frame is one TLS record as it goes to
//! the socket (16 406 bytes). Every chunk the meter reserves is written to the
//! state database durably before a byte of it goes, so the cost per frame is
//! the bookkeeping plus that write shared by the frames of a chunk.
//!
//! `cargo bench -p homing --bench ledger`; prints figures and a JSON line.

use std::path::Path;
use std::sync::Arc;

use homing::ledger::LedgerMeter;
use homing_policy::Policy;
use homing_transfer::stream::{Meter, Unmetered};
use tokio::time::Instant;

const FRAME: usize = 16_406;

/// Seconds to push `bytes` through `meter` in frames, and the frames.
fn push(meter: &dyn Meter, bytes: u64) -> (f64, u64) {
    let started = Instant::now();
    let mut frames = 0;
    let mut left = bytes;
    while left > 0 {
        let want = FRAME.min(left as usize);
        let mut sent = 0;
        while sent < want {
            let granted = meter.reserve(want - sent);
            assert!(granted > 0, "the budget is large enough");
            meter.settle(granted, granted);
            sent += granted;
        }
        left -= want as u64;
        frames += 1;
    }
    (started.elapsed().as_secs_f64(), frames)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = tempfile::tempdir().expect("a directory");
    let db = Arc::new(homing::state::open(dir.path()).expect("the state"));
    let bytes: u64 = 256 << 20;
    let (base_seconds, frames) = push(&Unmetered, bytes);
    let base_ns = base_seconds * 1e9 / frames as f64;
    println!("{frames} frames of {FRAME} bytes ({} MiB)", bytes >> 20);
    println!("baseline, a meter that charges nothing: {base_ns:.1} ns a frame");
    let mut report = serde_json::Map::new();
    report.insert("unmetered_ns_per_frame".into(), base_ns.into());
    for (name, budget) in [
        (
            "satellite, 2 GB a month",
            "bytes = \"2 GB\"\nperiod = \"month\"\n",
        ),
        (
            "hotel, 500 MB a day",
            "bytes = \"500 MB\"\nperiod = \"day\"\n",
        ),
        (
            "hotspot, 50 MB a day",
            "bytes = \"50 MB\"\nperiod = \"day\"\n",
        ),
        ("no cap", ""),
    ] {
        let text = if budget.is_empty() {
            String::new()
        } else {
            format!("[budget]\n{budget}")
        };
        let policy = Policy::parse(&text, Path::new("bench.toml")).expect("a policy");
        // A fresh network each time, so that no earlier run's spending counts.
        let meter = LedgerMeter::new(Arc::clone(&db), name, policy).expect("a meter");
        // Less than any of these allowances, so the budget never runs out.
        let volume = 32 << 20;
        let (seconds, frames) = push(&meter, volume);
        meter.finish().expect("settled");
        let ns = seconds * 1e9 / frames as f64;
        // A frame at 100 MB/s takes 164 us on the wire.
        let share = ns / (FRAME as f64 / 100e6 * 1e9) * 100.0;
        println!(
            "{name}: {ns:.0} ns a frame, {:.0} ns more than the baseline ({share:.2} % of \
             sending a frame at 100 MB/s)",
            ns - base_ns
        );
        report.insert(format!("{name}_ns_per_frame"), ns.into());
    }
    println!("{}", serde_json::Value::Object(report));
}
