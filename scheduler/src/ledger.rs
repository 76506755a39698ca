//! The cap ledger on disk, and the [`Meter`] that charges every byte of the
//! store connection to it.
//!
//! The policy engine's [`Ledger`] does the arithmetic; here its quarter-hour
//! buckets live in the state database per network, and the meter reserves bytes
//! in chunks: a chunk is charged and made durable *before* any of its bytes are
//! written, and what was not used goes back when the connection ends. A crash or
//! kill -9 can therefore only over-count what was sent (by at most one chunk),
//! and reservations never pass what the policy allows. Bytes received are
//! charged in chunks as they arrive; a kill loses at most one chunk of them, and
//! the policy's safety margin covers them.

use std::sync::{Arc, Mutex};

use homing_policy::{Ledger, Policy, Tally};
use homing_transfer::stream::Meter;
use jiff::Timestamp;
use redb::{Database, ReadableDatabase, TableDefinition};

/// (network, bucket start second) → counted bytes, all bytes.
pub const LEDGER: TableDefinition<(&str, i64), (u64, u64)> = TableDefinition::new("ledger");

/// How much history the ledger keeps: more than the longest budget period (a
/// rolling window of 366 days), and a year of reports. Older buckets are dropped
/// whenever a network's ledger is written, so that a daemon running for years
/// neither grows its state nor loads ever more buckets at each run.
pub const KEEP_SECONDS: i64 = 400 * 24 * 3600;

/// Loads a network's ledger.
///
/// # Errors
/// Database errors.
pub fn load(db: &Database, network: &str) -> anyhow::Result<Ledger> {
    let txn = db.begin_read()?;
    let Some(table) = crate::state::optional_table(&txn, LEDGER)? else {
        return Ok(Ledger::default());
    };
    let mut buckets = Vec::new();
    for item in table.range((network, i64::MIN)..=(network, i64::MAX))? {
        let (key, value) = item?;
        let (counted, raw) = value.value();
        buckets.push((key.value().1, Tally { counted, raw }));
    }
    Ok(Ledger::from_buckets(buckets))
}

/// Writes the buckets of `ledger` at and after `from` (those a change touched),
/// and drops the network's buckets older than [`KEEP_SECONDS`] before `from`.
fn store(db: &Database, network: &str, ledger: &Ledger, from: i64) -> anyhow::Result<()> {
    let txn = db.begin_write()?;
    {
        let mut table = txn.open_table(LEDGER)?;
        for (bucket, tally) in ledger.buckets_from(from) {
            table.insert((network, bucket), (tally.counted, tally.raw))?;
        }
        table.retain_in(
            (network, i64::MIN)..(network, from - KEEP_SECONDS),
            |_, _| false,
        )?;
    }
    txn.commit()?;
    Ok(())
}

/// The reservation chunk for a policy: one durable write per chunk, and a kill
/// over-counts at most one. Under a cap, a thousandth of the allowance between
/// 16 KiB and 256 KiB (a killed run on a 1 GB plan costs a quarter megabyte of
/// budget, not a megabyte); without a cap, 4 MiB (nothing to protect, and fast
/// links would otherwise write the ledger hundreds of times a second).
fn chunk(policy: &Policy) -> u64 {
    policy.budget.as_ref().map_or(4 << 20, |b| {
        (b.allowance() / 1000).clamp(16 << 10, 256 << 10)
    })
}

/// A [`Meter`] backed by a network's persisted ledger.
pub struct LedgerMeter {
    db: Arc<Database>,
    network: String,
    policy: Policy,
    inner: Mutex<MeterState>,
    now: fn() -> Timestamp,
}

struct MeterState {
    ledger: Ledger,
    /// Payload bytes reserved in the ledger and not yet written.
    credit: u64,
    /// When the credit was reserved (its bucket is where unused bytes go back).
    credit_at: Timestamp,
    /// Bytes received and not yet charged.
    received: u64,
    /// A persistence failure: the meter grants nothing after it.
    failed: bool,
}

impl std::fmt::Debug for LedgerMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerMeter")
            .field("network", &self.network)
            .finish_non_exhaustive()
    }
}

impl LedgerMeter {
    /// A meter for `network` under `policy`, with the wall clock.
    ///
    /// # Errors
    /// Database errors.
    pub fn new(db: Arc<Database>, network: &str, policy: Policy) -> anyhow::Result<Self> {
        Self::with_clock(db, network, policy, Timestamp::now)
    }

    /// The same with a clock of the caller's (tests).
    ///
    /// # Errors
    /// Database errors.
    pub fn with_clock(
        db: Arc<Database>,
        network: &str,
        policy: Policy,
        now: fn() -> Timestamp,
    ) -> anyhow::Result<Self> {
        let mut ledger = load(&db, network)?;
        ledger.prune(Timestamp::from_second(now().as_second() - KEEP_SECONDS)?);
        Ok(Self {
            db,
            network: network.to_string(),
            policy,
            inner: Mutex::new(MeterState {
                ledger,
                credit: 0,
                credit_at: now(),
                received: 0,
                failed: false,
            }),
            now,
        })
    }

    /// Gives back the unused credit and charges what was received (call when the
    /// connection ends; dropping the meter does it too).
    ///
    /// # Errors
    /// Database errors.
    pub fn finish(&self) -> anyhow::Result<()> {
        let mut state = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = (self.now)();
        let first = now.as_second().min(state.credit_at.as_second()) - homing_policy::BUCKET;
        if state.credit > 0 {
            let credit = state.credit;
            let at = state.credit_at;
            state.ledger.settle(&self.policy, at, credit, 0);
            state.credit = 0;
        }
        if state.received > 0 {
            let wire = self.policy.link.on_the_wire(state.received);
            state.ledger.charge(self.policy.budget.as_ref(), now, wire);
            state.received = 0;
        }
        store(&self.db, &self.network, &state.ledger, first)
    }

    /// What the current period has spent, in bytes counted against the cap.
    pub fn spent(&self) -> u64 {
        let state = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        self.policy
            .budget
            .as_ref()
            .map_or(0, |b| state.ledger.spent(b, (self.now)()))
    }
}

impl Drop for LedgerMeter {
    fn drop(&mut self) {
        if let Err(error) = self.finish() {
            tracing::error!(%error, network = %self.network, "cannot settle the ledger");
        }
    }
}

impl Meter for LedgerMeter {
    fn reserve(&self, want: usize) -> usize {
        // A write gets at most one chunk: what a kill can leave charged and
        // unsent stays one chunk, however large the writes.
        let want = (want as u64).min(chunk(&self.policy));
        let mut state = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if state.failed {
            return 0;
        }
        if state.credit < want {
            let now = (self.now)();
            let asked = chunk(&self.policy).max(want - state.credit);
            let granted = state.ledger.reserve(&self.policy, now, asked);
            if granted > 0 {
                // Durable before a byte of it is written.
                let bucket = now.as_second() - homing_policy::BUCKET;
                if let Err(error) = store(&self.db, &self.network, &state.ledger, bucket) {
                    tracing::error!(%error, "cannot record a reservation; sending stops");
                    state.failed = true;
                    return 0;
                }
                state.credit += granted;
                state.credit_at = now;
            }
        }
        let given = want.min(state.credit);
        state.credit -= given;
        given as usize
    }

    fn settle(&self, reserved: usize, sent: usize) {
        let mut state = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        state.credit += (reserved - sent.min(reserved)) as u64;
    }

    fn received(&self, bytes: usize) {
        let mut state = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        state.received += bytes as u64;
        if state.received >= chunk(&self.policy) {
            let now = (self.now)();
            let wire = self.policy.link.on_the_wire(state.received);
            state.ledger.charge(self.policy.budget.as_ref(), now, wire);
            state.received = 0;
            let bucket = now.as_second() - homing_policy::BUCKET;
            if let Err(error) = store(&self.db, &self.network, &state.ledger, bucket) {
                tracing::error!(%error, "cannot record received bytes; sending stops");
                state.failed = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use homing_policy::Span;

    use super::*;

    fn noon() -> Timestamp {
        "2026-11-27T12:00:00Z".parse().expect("a time")
    }

    fn policy(budget: &str) -> Policy {
        Policy::parse(&format!("[budget]\n{budget}"), Path::new("p.toml")).expect("a policy")
    }

    #[test]
    fn reservations_are_durable_before_use_and_the_rest_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(crate::state::open(dir.path()).unwrap());
        let p = policy("bytes = \"10 MB\"\nperiod = \"day\"\n");
        let budget = p.budget.clone().unwrap();
        let meter = LedgerMeter::with_clock(Arc::clone(&db), "hotspot", p.clone(), noon).unwrap();
        let granted = meter.reserve(1000);
        assert_eq!(granted, 1000);
        // A whole chunk is on disk already: a crash now over-counts, never under.
        let on_disk = load(&db, "hotspot").unwrap().spent(&budget, noon());
        assert!(on_disk >= p.link.on_the_wire(1000), "{on_disk}");
        meter.settle(granted, 1000);
        meter.received(500);
        drop(meter);
        // After the connection: exactly what went, both ways, with overhead.
        let after = load(&db, "hotspot").unwrap().spent(&budget, noon());
        assert_eq!(after, p.link.on_the_wire(1000) + p.link.on_the_wire(500));
    }

    #[test]
    fn history_older_than_the_ledger_keeps_is_dropped_when_it_is_written() {
        fn long_ago() -> Timestamp {
            "2024-11-01T12:00:00Z".parse().expect("a time")
        }
        fn last_year() -> Timestamp {
            "2025-12-01T12:00:00Z".parse().expect("a time")
        }
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(crate::state::open(dir.path()).unwrap());
        let p = policy("bytes = \"10 MB\"\nperiod = \"day\"\n");
        let totals = || {
            let mut seen = Vec::new();
            let ledger = load(&db, "hotspot").unwrap();
            for at in [long_ago(), last_year(), noon()] {
                let day = Span {
                    start: at,
                    end: at.checked_add(jiff::SignedDuration::from_hours(1)).unwrap(),
                };
                seen.push(ledger.raw_in(day));
            }
            seen
        };
        for (network, clock) in [
            ("hotspot", long_ago as fn() -> Timestamp),
            ("hotspot", last_year),
            ("radio", long_ago),
        ] {
            let meter =
                LedgerMeter::with_clock(Arc::clone(&db), network, p.clone(), clock).unwrap();
            let granted = meter.reserve(1000);
            meter.settle(granted, 1000);
        }
        let before = totals();
        assert!(
            before[0] > 0 && before[1] > 0 && before[2] == 0,
            "{before:?}"
        );
        // A connection now: the bucket of two years ago goes, last year's stays.
        let meter = LedgerMeter::with_clock(Arc::clone(&db), "hotspot", p, noon).unwrap();
        let granted = meter.reserve(1000);
        meter.settle(granted, 1000);
        drop(meter);
        let after = totals();
        assert_eq!(after[0], 0, "{after:?}");
        assert_eq!(after[1], before[1]);
        assert!(after[2] > 0);
        // Another network's history is its own.
        assert!(
            load(&db, "radio").unwrap().raw_in(Span {
                start: long_ago(),
                end: noon(),
            }) > 0
        );
    }

    #[test]
    fn the_meter_stops_at_the_cap_and_a_new_meter_remembers() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(crate::state::open(dir.path()).unwrap());
        let p = policy("bytes = \"100 kB\"\nperiod = \"day\"\n");
        let budget = p.budget.clone().unwrap();
        let meter = LedgerMeter::with_clock(Arc::clone(&db), "radio", p.clone(), noon).unwrap();
        let mut sent = 0;
        loop {
            let granted = meter.reserve(16 * 1024);
            if granted == 0 {
                break;
            }
            meter.settle(granted, granted);
            sent += granted as u64;
        }
        assert!(p.link.on_the_wire(sent) <= budget.allowance());
        assert!(sent > 80_000, "{sent}");
        drop(meter);
        let again = LedgerMeter::with_clock(Arc::clone(&db), "radio", p, noon).unwrap();
        assert_eq!(again.reserve(1000), 0, "the day's budget is spent");
    }
}
