//! Budget periods and the ledger's arithmetic.
//!
//! The ledger keeps, per network, what went over the link in quarter-hour
//! buckets (every time zone's offset is a multiple of a quarter hour, so a local
//! midnight is always a bucket boundary): the bytes that count against the cap
//! and all bytes, for reports. Bytes are charged *before* they are written (a
//! reservation) and the unused part is given back after, so a crash between the
//! two can only over-count. A reservation is granted only as far as the cap
//! allows: spending never passes the cap times the safety factor.
//!
//! Pure: the caller passes the time and persists the buckets (the daemon keeps
//! them in redb).

use std::collections::BTreeMap;

use jiff::{Timestamp, ToSpan, Zoned};

use crate::policy::{Budget, PeriodKind, Policy};

/// Seconds in a ledger bucket.
pub const BUCKET: i64 = 900;

/// A stretch of time, `start` inclusive, `end` exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Its first instant.
    pub start: Timestamp,
    /// The instant after it.
    pub end: Timestamp,
}

impl Budget {
    /// The period the cap applies to at `now`.
    pub fn period_at(&self, now: Timestamp) -> Span {
        let zoned = now.to_zoned(self.time_zone.clone());
        let date = zoned.date();
        let midnight = |d: jiff::civil::Date| -> Timestamp {
            d.to_zoned(self.time_zone.clone())
                .map_or(now, |z: Zoned| z.timestamp())
        };
        match self.period {
            PeriodKind::Day => Span {
                start: midnight(date),
                end: midnight(date.tomorrow().unwrap_or(date)),
            },
            PeriodKind::Week => {
                let back = i64::from(date.weekday().to_monday_zero_offset());
                let monday = date.checked_sub(back.days()).unwrap_or(date);
                Span {
                    start: midnight(monday),
                    end: midnight(monday.checked_add(7.days()).unwrap_or(monday)),
                }
            }
            PeriodKind::Month => {
                let start = billing_start(date, self.billing_day);
                let next = next_month(start, self.billing_day);
                Span {
                    start: midnight(start),
                    end: midnight(next),
                }
            }
            PeriodKind::Rolling => Span {
                start: now
                    .checked_sub(i64::from(self.rolling_hours).hours())
                    .unwrap_or(now),
                end: now.checked_add(1.second()).unwrap_or(now),
            },
        }
    }

    /// Whether traffic at `now` counts against the cap (it does not in free
    /// windows, nor outside the counted hours).
    pub fn counts_at(&self, now: Timestamp) -> bool {
        let time = now.to_zoned(self.time_zone.clone()).time();
        let minute =
            u16::from(time.hour().unsigned_abs()) * 60 + u16::from(time.minute().unsigned_abs());
        self.counted.is_none_or(|w| w.contains(minute))
            && !self.free.iter().any(|w| w.contains(minute))
    }

    /// Bytes the ledger lets itself spend in a period: the cap times the safety
    /// factor.
    pub fn allowance(&self) -> u64 {
        (self.bytes as f64 * self.safety).floor() as u64
    }
}

/// The first day of the billing month `date` is in.
fn billing_start(date: jiff::civil::Date, billing_day: u8) -> jiff::civil::Date {
    let this_month = on_day(date.year(), date.month(), billing_day);
    if date >= this_month {
        this_month
    } else {
        let previous = date.first_of_month().yesterday().unwrap_or(date);
        on_day(previous.year(), previous.month(), billing_day)
    }
}

/// The billing day of the month after `start`'s.
fn next_month(start: jiff::civil::Date, billing_day: u8) -> jiff::civil::Date {
    let next = start
        .first_of_month()
        .checked_add(1.month())
        .unwrap_or(start);
    on_day(next.year(), next.month(), billing_day)
}

/// `day` of a month, or its last day when the month is shorter (31 in February).
fn on_day(year: i16, month: i8, day: u8) -> jiff::civil::Date {
    let first = jiff::civil::Date::new(year, month, 1).expect("a valid month");
    let day = i8::try_from(day).unwrap_or(31).min(first.days_in_month());
    jiff::civil::Date::new(year, month, day).expect("a day of the month")
}

/// What went over a link in one bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Bytes that count against the cap.
    pub counted: u64,
    /// All bytes (free ones too).
    pub raw: u64,
}

/// One network's spending, bucket by bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    buckets: BTreeMap<i64, Tally>,
}

fn bucket_of(at: Timestamp) -> i64 {
    at.as_second().div_euclid(BUCKET) * BUCKET
}

impl Ledger {
    /// A ledger from persisted buckets (start second → tally).
    pub fn from_buckets(buckets: impl IntoIterator<Item = (i64, Tally)>) -> Self {
        Self {
            buckets: buckets.into_iter().collect(),
        }
    }

    /// The buckets from second `from` on, to persist (those a change touched).
    pub fn buckets_from(&self, from: i64) -> impl Iterator<Item = (i64, Tally)> + '_ {
        self.buckets.range(from..).map(|(k, v)| (*k, *v))
    }

    /// Charges `wire` bytes at `now` (counted when the budget counts now).
    pub fn charge(&mut self, budget: Option<&Budget>, now: Timestamp, wire: u64) {
        let tally = self.buckets.entry(bucket_of(now)).or_default();
        tally.raw = tally.raw.saturating_add(wire);
        if budget.is_some_and(|b| b.counts_at(now)) {
            tally.counted = tally.counted.saturating_add(wire);
        }
    }

    /// Gives back `wire` bytes charged at `charged_at` (never below zero).
    pub fn refund(&mut self, budget: Option<&Budget>, charged_at: Timestamp, wire: u64) {
        if let Some(tally) = self.buckets.get_mut(&bucket_of(charged_at)) {
            tally.raw = tally.raw.saturating_sub(wire);
            if budget.is_some_and(|b| b.counts_at(charged_at)) {
                tally.counted = tally.counted.saturating_sub(wire);
            }
        }
    }

    /// Counted bytes in `span`.
    pub fn counted_in(&self, span: Span) -> u64 {
        let start = bucket_of(span.start);
        self.buckets
            .range(start..span.end.as_second())
            .map(|(_, t)| t.counted)
            .sum()
    }

    /// All bytes in `span` (for reports).
    pub fn raw_in(&self, span: Span) -> u64 {
        let start = bucket_of(span.start);
        self.buckets
            .range(start..span.end.as_second())
            .map(|(_, t)| t.raw)
            .sum()
    }

    /// What the budget's current period has spent at `now`.
    pub fn spent(&self, budget: &Budget, now: Timestamp) -> u64 {
        self.counted_in(budget.period_at(now))
    }

    /// Reserves up to `want` payload bytes to write at `now` under `policy`:
    /// grants what the budget allows (all of it in free time or without a
    /// budget) and charges its bytes on the wire at once. Returns the grant.
    pub fn reserve(&mut self, policy: &Policy, now: Timestamp, want: u64) -> u64 {
        let granted = match &policy.budget {
            Some(budget) if budget.counts_at(now) => {
                let left = budget.allowance().saturating_sub(self.spent(budget, now));
                want.min(policy.link.payload_within(left))
            }
            _ => want,
        };
        if granted > 0 {
            self.charge(
                policy.budget.as_ref(),
                now,
                policy.link.on_the_wire(granted),
            );
        }
        granted
    }

    /// Settles a reservation of `granted` payload bytes made at `reserved_at` of
    /// which `used` were written: the rest goes back.
    pub fn settle(&mut self, policy: &Policy, reserved_at: Timestamp, granted: u64, used: u64) {
        let link = &policy.link;
        let (charged, needed) = (
            link.on_the_wire(granted),
            link.on_the_wire(used.min(granted)),
        );
        self.refund(policy.budget.as_ref(), reserved_at, charged - needed);
    }

    /// Drops buckets before `before` (history older than reports need).
    pub fn prune(&mut self, before: Timestamp) {
        self.buckets = self.buckets.split_off(&bucket_of(before));
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use proptest::prelude::*;

    use super::*;

    fn policy(budget: &str) -> Policy {
        Policy::parse(&format!("[budget]\n{budget}"), Path::new("p.toml")).unwrap()
    }

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn billing_months_start_on_their_day_and_short_months_on_their_last() {
        let p =
            policy("bytes = \"2 GB\"\nperiod = \"month\"\nbilling_day = 31\ntime_zone = \"UTC\"\n");
        let budget = p.budget.as_ref().unwrap();
        let feb = budget.period_at(at("2027-02-15T12:00:00Z"));
        assert_eq!(feb.start, at("2027-01-31T00:00:00Z"));
        assert_eq!(feb.end, at("2027-02-28T00:00:00Z"));
        let march = budget.period_at(at("2027-03-01T00:00:00Z"));
        assert_eq!(march.start, at("2027-02-28T00:00:00Z"));
        assert_eq!(march.end, at("2027-03-31T00:00:00Z"));
        let leap = budget.period_at(at("2028-02-29T23:00:00Z"));
        assert_eq!(leap.start, at("2028-02-29T00:00:00Z"));
        let p = policy(
            "bytes = \"2 GB\"\nperiod = \"month\"\nbilling_day = 17\ntime_zone = \"Europe/Berlin\"\n",
        );
        let budget = p.budget.as_ref().unwrap();
        // 17 November, midnight in Berlin, is 23:00 UTC the day before.
        let span = budget.period_at(at("2026-11-27T10:00:00Z"));
        assert_eq!(span.start, at("2026-11-16T23:00:00Z"));
        assert_eq!(span.end, at("2026-12-16T23:00:00Z"));
        // Before the 17th, the period began in the previous month.
        let span = budget.period_at(at("2026-11-16T22:59:59Z"));
        assert_eq!(span.start, at("2026-10-16T22:00:00Z"));
    }

    #[test]
    fn days_follow_daylight_saving_time() {
        let p = policy("bytes = \"1 GB\"\nperiod = \"day\"\ntime_zone = \"Europe/Berlin\"\n");
        let budget = p.budget.as_ref().unwrap();
        // 29 March 2026: clocks go forward, the day has 23 hours.
        let spring = budget.period_at(at("2026-03-29T12:00:00Z"));
        assert_eq!(spring.end.as_second() - spring.start.as_second(), 23 * 3600);
        // 25 October 2026: clocks go back, the day has 25 hours.
        let autumn = budget.period_at(at("2026-10-25T12:00:00Z"));
        assert_eq!(autumn.end.as_second() - autumn.start.as_second(), 25 * 3600);
        let p = policy("bytes = \"1 GB\"\nperiod = \"week\"\ntime_zone = \"UTC\"\n");
        // Friday 27 November 2026: the week began on Monday the 23rd.
        let week = p
            .budget
            .as_ref()
            .unwrap()
            .period_at(at("2026-11-27T10:00:00Z"));
        assert_eq!(week.start, at("2026-11-23T00:00:00Z"));
        assert_eq!(week.end, at("2026-11-30T00:00:00Z"));
    }

    #[test]
    fn counted_hours_and_free_windows() {
        let p = policy(
            "bytes = \"1 TB\"\nperiod = \"month\"\ntime_zone = \"UTC\"\ncounted_hours = \"07:00-23:00\"\nfree_hours = [\"12:00-13:00\"]\n",
        );
        let budget = p.budget.as_ref().unwrap();
        assert!(budget.counts_at(at("2026-11-27T07:00:00Z")));
        assert!(!budget.counts_at(at("2026-11-27T23:30:00Z")));
        assert!(!budget.counts_at(at("2026-11-27T12:30:00Z")));
        let mut ledger = Ledger::default();
        ledger.charge(Some(budget), at("2026-11-27T03:00:00Z"), 1000);
        ledger.charge(Some(budget), at("2026-11-27T09:00:00Z"), 500);
        assert_eq!(ledger.spent(budget, at("2026-11-27T10:00:00Z")), 500);
        let day = Span {
            start: at("2026-11-27T00:00:00Z"),
            end: at("2026-11-28T00:00:00Z"),
        };
        assert_eq!(ledger.raw_in(day), 1500);
    }

    #[test]
    fn a_rolling_window_forgets_what_is_older() {
        let p = policy("bytes = \"500 MB\"\nperiod = \"rolling\"\nrolling_hours = 24\n");
        let budget = p.budget.as_ref().unwrap();
        let mut ledger = Ledger::default();
        ledger.charge(Some(budget), at("2026-11-26T08:00:00Z"), 300);
        ledger.charge(Some(budget), at("2026-11-27T07:00:00Z"), 200);
        assert_eq!(ledger.spent(budget, at("2026-11-27T07:30:00Z")), 500);
        assert_eq!(ledger.spent(budget, at("2026-11-27T08:30:00Z")), 200);
    }

    proptest! {
        /// Whatever is asked for and however it is settled, counted spending in a
        /// period never passes the allowance and never goes below zero.
        #[test]
        fn reservations_never_pass_the_cap(
            steps in proptest::collection::vec((1_u64..5_000_000, 0_u64..=100, 0_i64..86_400), 1..200),
        ) {
            let p = policy("bytes = \"50 MB\"\nperiod = \"day\"\ntime_zone = \"UTC\"\n");
            let budget = p.budget.clone().unwrap();
            let day = at("2026-11-27T00:00:00Z");
            let mut ledger = Ledger::default();
            let mut times: Vec<i64> = steps.iter().map(|s| s.2).collect();
            times.sort_unstable();
            for ((want, used_percent, _), offset) in steps.iter().zip(times) {
                let now = day.checked_add(offset.seconds()).unwrap();
                let granted = ledger.reserve(&p, now, *want);
                prop_assert!(granted <= *want);
                prop_assert!(ledger.spent(&budget, now) <= budget.allowance());
                let used = granted * used_percent / 100;
                ledger.settle(&p, now, granted, used);
                prop_assert!(ledger.spent(&budget, now) <= budget.allowance());
            }
        }

        #[test]
        fn settling_in_full_changes_nothing_and_settling_nothing_gives_all_back(
            want in 1_u64..10_000_000,
        ) {
            let p = policy("bytes = \"1 GB\"\nperiod = \"day\"\n");
            let budget = p.budget.clone().unwrap();
            let now = at("2026-11-27T10:00:00Z");
            let mut ledger = Ledger::default();
            let granted = ledger.reserve(&p, now, want);
            let spent = ledger.spent(&budget, now);
            ledger.settle(&p, now, granted, granted);
            prop_assert_eq!(ledger.spent(&budget, now), spent);
            let mut again = Ledger::default();
            let granted = again.reserve(&p, now, want);
            again.settle(&p, now, granted, 0);
            prop_assert_eq!(again.spent(&budget, now), 0);
        }
    }
}
