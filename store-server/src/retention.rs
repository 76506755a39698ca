//! Which snapshots a retention policy keeps: a pure function of the snapshots'
//! commit times, so that it is tested without a clock or a store.
//!
//! A policy keeps the newest snapshot of each of the last `hourly` hours that
//! have snapshots, of each of the last `daily` days, and of each of the last
//! `weekly` weeks (weeks start on Monday; hours, days and weeks in UTC, the
//! store's clock being the only one it trusts). A snapshot kept by one rule is
//! kept; the head is always kept; a policy of zeros keeps everything.

use std::collections::BTreeSet;

/// How many hourly, daily and weekly snapshots to keep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    /// Newest snapshot of each of the last N hours with snapshots.
    pub hourly: u32,
    /// Newest snapshot of each of the last N days with snapshots.
    pub daily: u32,
    /// Newest snapshot of each of the last N weeks with snapshots.
    pub weekly: u32,
}

impl Policy {
    /// Whether the policy keeps everything (no retention set).
    pub fn keeps_all(&self) -> bool {
        self.hourly == 0 && self.daily == 0 && self.weekly == 0
    }

    /// The policy's bytes in the index.
    pub fn encode(&self) -> [u8; 12] {
        let mut out = [0; 12];
        out[..4].copy_from_slice(&self.hourly.to_le_bytes());
        out[4..8].copy_from_slice(&self.daily.to_le_bytes());
        out[8..].copy_from_slice(&self.weekly.to_le_bytes());
        out
    }

    /// Reads what [`Policy::encode`] wrote; anything else keeps everything.
    pub fn decode(bytes: &[u8]) -> Self {
        let at = |i: usize| {
            bytes
                .get(i..i + 4)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u32::from_le_bytes)
        };
        Self {
            hourly: at(0),
            daily: at(4),
            weekly: at(8),
        }
    }
}

/// Which hour, day or week a time falls in.
type Bucket = fn(u64) -> u64;

const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;
/// 1970-01-01 was a Thursday: shifted by three days, weeks start on Monday.
const WEEK_SHIFT: u64 = 3 * DAY;

/// The sequence numbers `policy` keeps among `snapshots` (sequence, committed
/// at, in seconds since the epoch), `head` always among them.
pub fn kept(snapshots: &[(u64, u64)], head: Option<u64>, policy: Policy) -> BTreeSet<u64> {
    if policy.keeps_all() {
        return snapshots.iter().map(|(s, _)| *s).collect();
    }
    let mut newest_first = snapshots.to_vec();
    // Newest first by time, the sequence number breaking ties (a later commit is
    // newer even within the same second).
    newest_first.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
    let mut keep: BTreeSet<u64> = head.into_iter().collect();
    let rules: [(u32, Bucket); 3] = [
        (policy.hourly, |t| t / HOUR),
        (policy.daily, |t| t / DAY),
        (policy.weekly, |t| (t + WEEK_SHIFT) / (7 * DAY)),
    ];
    for (count, bucket_of) in rules {
        let mut left = count;
        let mut last = None;
        for &(sequence, at) in &newest_first {
            if left == 0 {
                break;
            }
            let bucket = bucket_of(at);
            if last != Some(bucket) {
                keep.insert(sequence);
                last = Some(bucket);
                left -= 1;
            }
        }
    }
    keep
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Snapshots every `step` seconds from `start`, numbered from 1.
    fn series(start: u64, step: u64, count: u64) -> Vec<(u64, u64)> {
        (0..count).map(|i| (i + 1, start + i * step)).collect()
    }

    #[test]
    fn hourly_snapshots_over_three_weeks() {
        // 2026-11-02 00:00 UTC is a Monday.
        let monday = 1_793_577_600;
        let snapshots = series(monday, HOUR, 21 * 24);
        let head = Some(21 * 24);
        let policy = Policy {
            hourly: 24,
            daily: 7,
            weekly: 4,
        };
        let kept = kept(&snapshots, head, policy);
        // The last 24 hours, one per day for 7 days (6 more, today's is among the
        // hours), one per week for 3 weeks (2 more).
        assert_eq!(kept.len(), 24 + 6 + 2, "{kept:?}");
        assert!(kept.contains(&(21 * 24)));
        // The newest of each earlier day is its 23:00 snapshot.
        assert!(kept.contains(&(20 * 24 - 24)));
        // The first week's newest: Sunday 23:00, number 7 * 24.
        assert!(kept.contains(&(7 * 24)));
        assert!(!kept.contains(&1));
    }

    #[test]
    fn zeros_keep_everything_and_the_head_is_always_kept() {
        let snapshots = series(1_000_000, 60, 10);
        assert_eq!(kept(&snapshots, Some(10), Policy::default()).len(), 10);
        let one = Policy {
            hourly: 1,
            daily: 0,
            weekly: 0,
        };
        // All ten fall in one hour: the newest is kept, and the head.
        assert_eq!(kept(&snapshots, Some(3), one), BTreeSet::from([3, 10]));
    }

    proptest! {
        #[test]
        fn never_more_than_the_rules_allow_and_always_the_newest(
            times in proptest::collection::vec(0_u64..10_000_000, 1..200),
            hourly in 0_u32..30,
            daily in 0_u32..10,
            weekly in 0_u32..6,
        ) {
            let snapshots: Vec<(u64, u64)> =
                times.iter().enumerate().map(|(i, t)| (i as u64 + 1, *t)).collect();
            let head = snapshots.len() as u64;
            let policy = Policy { hourly, daily, weekly };
            let kept = kept(&snapshots, Some(head), policy);
            prop_assert!(kept.contains(&head));
            if !policy.keeps_all() {
                prop_assert!(kept.len() as u64 <= u64::from(hourly + daily + weekly) + 1);
                // The newest snapshot (by time) is kept by any rule with a count.
                let newest = snapshots
                    .iter()
                    .max_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)))
                    .unwrap();
                prop_assert!(kept.contains(&newest.0));
            } else {
                prop_assert_eq!(kept.len(), snapshots.len());
            }
            // Keeping is stable: applying the policy to what it kept keeps it all.
            let survivors: Vec<(u64, u64)> =
                snapshots.iter().copied().filter(|(s, _)| kept.contains(s)).collect();
            let again = super::kept(&survivors, Some(head), policy);
            prop_assert_eq!(again, kept);
        }
    }
}
