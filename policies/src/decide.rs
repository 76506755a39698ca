//! The release decision: given the link's policy, its ledger, what is queued and
//! the time, what may go now, how fast, how much, and why.

use jiff::Timestamp;

use crate::ledger::{BUCKET, Ledger};
use crate::policy::{Class, Policy, Window};

/// Queued bytes per priority class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Queue {
    /// Critical sets.
    pub critical: u64,
    /// Normal sets.
    pub normal: u64,
    /// Bulk sets.
    pub bulk: u64,
}

impl Queue {
    /// One byte of `class` queued: what a decision for that class alone asks.
    pub fn only(class: Class) -> Self {
        let mut queue = Self::default();
        match class {
            Class::Critical => queue.critical = 1,
            Class::Normal => queue.normal = 1,
            Class::Bulk => queue.bulk = 1,
        }
        queue
    }

    /// Queued bytes of a class.
    pub fn of(&self, class: Class) -> u64 {
        match class {
            Class::Critical => self.critical,
            Class::Normal => self.normal,
            Class::Bulk => self.bulk,
        }
    }
}

/// What the release loop may do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether anything may go.
    pub send: bool,
    /// The classes that may go, most urgent first.
    pub classes: Vec<Class>,
    /// Payload bytes that may go before the next decision (`u64::MAX`: no cap
    /// now).
    pub max_bytes: u64,
    /// Bytes per second, if limited.
    pub rate: Option<u64>,
    /// Why, in words, for status and reports.
    pub reasons: Vec<String>,
    /// When the decision may change by itself (a period ends, a window opens or
    /// closes); the release loop decides again then.
    pub recheck_at: Option<Timestamp>,
}

/// Decides for `policy` with `ledger` and `queue` at `now`; `on_battery` says
/// whether the machine runs on battery.
pub fn decide(
    policy: &Policy,
    ledger: &Ledger,
    queue: &Queue,
    now: Timestamp,
    on_battery: bool,
) -> Decision {
    let mut decision = Decision {
        send: false,
        classes: Vec::new(),
        max_bytes: 0,
        rate: None,
        reasons: Vec::new(),
        recheck_at: next_edge(policy, now),
    };
    let name = &policy.name;
    if policy.link.amateur {
        decision.reasons.push(format!(
            "`{name}` is an amateur radio link: its rules forbid encrypted payloads, so \
             nothing is sent over it"
        ));
        decision.recheck_at = None;
        return decision;
    }
    if on_battery && policy.link.defer_on_battery {
        decision.reasons.push(format!(
            "on battery, and `{name}` defers uploads until on power"
        ));
        return decision;
    }
    let mut classes: Vec<Class> = policy.link.classes.clone();
    classes.sort();
    classes.dedup();
    let queued: u64 = classes.iter().map(|c| queue.of(*c)).sum();
    if queued == 0 {
        let waiting: Vec<String> = Class::ALL
            .iter()
            .filter(|c| queue.of(**c) > 0 && !classes.contains(c))
            .map(|c| format!("{c:?}").to_lowercase())
            .collect();
        decision.reasons.push(if waiting.is_empty() {
            "nothing is queued".to_string()
        } else {
            format!(
                "only {} sets are queued, and `{name}` carries {} sets only",
                waiting.join(" and "),
                classes
                    .iter()
                    .map(|c| format!("{c:?}").to_lowercase())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        });
        return decision;
    }
    decision.max_bytes = u64::MAX;
    if let Some(budget) = &policy.budget {
        if budget.counts_at(now) {
            let spent = ledger.spent(budget, now);
            let allowance = budget.allowance();
            let left = policy.link.payload_within(allowance.saturating_sub(spent));
            if left == 0 {
                let period = budget.period_at(now);
                decision.reasons.push(format!(
                    "`{name}`'s budget is spent: {spent} of {allowance} bytes this period \
                     (the cap of {} less a safety margin); more from {}",
                    budget.bytes,
                    if budget.period == crate::policy::PeriodKind::Rolling {
                        "when older traffic leaves the window".to_string()
                    } else {
                        period.end.to_string()
                    }
                ));
                decision.max_bytes = 0;
                return decision;
            }
            decision.max_bytes = left;
            decision.reasons.push(format!(
                "`{name}`: {spent} of {allowance} bytes spent this period, {left} payload \
                 bytes left"
            ));
        } else {
            decision.reasons.push(format!(
                "`{name}`: this hour does not count against the cap"
            ));
        }
    } else {
        decision.reasons.push(format!("`{name}` has no cap"));
    }
    decision.rate = policy.rate_at(now);
    decision.send = true;
    decision.classes = classes.into_iter().filter(|c| queue.of(*c) > 0).collect();
    decision
}

impl Policy {
    /// The sending rate at `now` in bytes per second (`None`: unlimited): the rate
    /// of the window `now` falls in, else the base rate, never above the link's
    /// raw speed. A run keeps it current as windows open and close.
    pub fn rate_at(&self, now: Timestamp) -> Option<u64> {
        let minute = minute_of(self, now);
        let mut rate = self
            .rate
            .windows
            .iter()
            .find(|(w, _)| w.contains(minute))
            .map(|(_, r)| *r)
            .or(self.rate.bytes_per_second);
        if let Some(bits) = self.link.bits_per_second {
            let line = (bits / 8).max(1);
            rate = Some(rate.map_or(line, |r| r.min(line)));
        }
        rate
    }

    /// The next instant after `now` at which a rate window opens or closes.
    pub fn next_rate_change(&self, now: Timestamp) -> Option<Timestamp> {
        let minute = i64::from(minute_of(self, now));
        let base = now.as_second() - now.as_second().rem_euclid(60);
        self.rate
            .windows
            .iter()
            .flat_map(|(w, _)| [w.start, w.end])
            .filter_map(|edge| {
                let mut ahead = i64::from(edge) - minute;
                if ahead <= 0 {
                    ahead += 24 * 60;
                }
                Timestamp::from_second(base + ahead * 60).ok()
            })
            .filter(|edge| *edge > now)
            .min()
    }
}

fn minute_of(policy: &Policy, now: Timestamp) -> u16 {
    let zone = policy
        .budget
        .as_ref()
        .map_or(jiff::tz::TimeZone::UTC, |b| b.time_zone.clone());
    let time = now.to_zoned(zone).time();
    u16::from(time.hour().unsigned_abs()) * 60 + u16::from(time.minute().unsigned_abs())
}

/// The next instant at which the decision may change by itself: the period's
/// end, an edge of a counted, free or rate window, or for a rolling window the
/// next bucket (older traffic leaves it).
fn next_edge(policy: &Policy, now: Timestamp) -> Option<Timestamp> {
    let mut edges: Vec<Timestamp> = Vec::new();
    let mut windows: Vec<Window> = policy.rate.windows.iter().map(|(w, _)| *w).collect();
    if let Some(budget) = &policy.budget {
        let period = budget.period_at(now);
        if budget.period == crate::policy::PeriodKind::Rolling {
            let next = (now.as_second().div_euclid(BUCKET) + 1) * BUCKET;
            edges.extend(Timestamp::from_second(next).ok());
        } else {
            edges.push(period.end);
        }
        windows.extend(budget.counted);
        windows.extend(budget.free.iter().copied());
    }
    let minute = i64::from(minute_of(policy, now));
    for window in windows {
        for edge in [window.start, window.end] {
            let mut ahead = i64::from(edge) - minute;
            if ahead <= 0 {
                ahead += 24 * 60;
            }
            // To the minute: the edge's second 0.
            let base = now.as_second() - now.as_second().rem_euclid(60);
            edges.extend(Timestamp::from_second(base + ahead * 60).ok());
        }
    }
    edges.into_iter().filter(|e| *e > now).min()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn policy(text: &str) -> Policy {
        Policy::parse(text, Path::new("net.toml")).unwrap()
    }

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn queue() -> Queue {
        Queue {
            critical: 1000,
            normal: 50_000,
            bulk: 1_000_000,
        }
    }

    #[test]
    fn unlimited_home_wifi_sends_everything_at_full_speed() {
        let home = policy("[match]\nssid = \"Home\"\n");
        let d = decide(
            &home,
            &Ledger::default(),
            &queue(),
            at("2026-11-27T10:00:00Z"),
            false,
        );
        assert!(d.send);
        assert_eq!(d.classes, vec![Class::Critical, Class::Normal, Class::Bulk]);
        assert_eq!(d.max_bytes, u64::MAX);
        assert_eq!(d.rate, None);
        assert_eq!(d.recheck_at, None);
    }

    #[test]
    fn a_spent_budget_stops_until_the_period_rolls_over() {
        let hotspot = policy(
            "[budget]\nbytes = \"2 GB\"\nperiod = \"month\"\nbilling_day = 17\ntime_zone = \"UTC\"\n",
        );
        let budget = hotspot.budget.clone().unwrap();
        let now = at("2026-11-27T10:00:00Z");
        let mut ledger = Ledger::default();
        ledger.charge(
            Some(&budget),
            at("2026-11-20T10:00:00Z"),
            budget.allowance(),
        );
        let d = decide(&hotspot, &ledger, &queue(), now, false);
        assert!(!d.send);
        assert!(d.reasons[0].contains("budget is spent"), "{:?}", d.reasons);
        assert_eq!(d.recheck_at, Some(at("2026-12-17T00:00:00Z")));
        // The next period starts fresh.
        let later = decide(
            &hotspot,
            &ledger,
            &queue(),
            at("2026-12-17T00:00:01Z"),
            false,
        );
        assert!(later.send);
        assert!(later.max_bytes > 1_800_000_000);
        // What went in the previous period counts there only: half spent, half left.
        let mut half = Ledger::default();
        half.charge(
            Some(&budget),
            at("2026-11-18T00:00:00Z"),
            budget.allowance() / 2,
        );
        let d = decide(&hotspot, &half, &queue(), now, false);
        assert!(d.send);
        let left = hotspot
            .link
            .payload_within(budget.allowance() - budget.allowance() / 2);
        assert_eq!(d.max_bytes, left);
    }

    #[test]
    fn free_hours_do_not_count_and_the_decision_says_when_they_end() {
        let satellite = policy(
            "[budget]\nbytes = \"1 TB\"\nperiod = \"month\"\ntime_zone = \"UTC\"\ncounted_hours = \"07:00-23:00\"\n",
        );
        let budget = satellite.budget.clone().unwrap();
        let mut ledger = Ledger::default();
        ledger.charge(
            Some(&budget),
            at("2026-11-20T10:00:00Z"),
            budget.allowance(),
        );
        let day = decide(
            &satellite,
            &ledger,
            &queue(),
            at("2026-11-27T12:00:00Z"),
            false,
        );
        assert!(!day.send);
        let night = decide(
            &satellite,
            &ledger,
            &queue(),
            at("2026-11-27T23:30:00Z"),
            false,
        );
        assert!(night.send);
        assert_eq!(night.max_bytes, u64::MAX);
        assert_eq!(night.recheck_at, Some(at("2026-11-28T07:00:00Z")));
    }

    #[test]
    fn classes_battery_and_amateur_links() {
        let radio = policy(
            "[budget]\nbytes = \"64 KiB\"\nperiod = \"day\"\n[link]\nclasses = [\"critical\"]\nbits_per_second = 1200\npacket_payload = 256\npacket_overhead = 20\n",
        );
        let d = decide(
            &radio,
            &Ledger::default(),
            &queue(),
            at("2026-11-27T10:00:00Z"),
            false,
        );
        assert!(d.send);
        assert_eq!(d.classes, vec![Class::Critical]);
        assert_eq!(d.rate, Some(150));
        // 64 KiB × 0.95 on the wire, less 20 bytes per 256.
        assert!(
            d.max_bytes < 62_259 && d.max_bytes > 55_000,
            "{}",
            d.max_bytes
        );
        let only_bulk = Queue {
            bulk: 5,
            ..Queue::default()
        };
        let d = decide(
            &radio,
            &Ledger::default(),
            &only_bulk,
            at("2026-11-27T10:00:00Z"),
            false,
        );
        assert!(!d.send);
        assert!(d.reasons[0].contains("bulk"), "{:?}", d.reasons);
        let ham = policy("[link]\namateur = true\n");
        let d = decide(
            &ham,
            &Ledger::default(),
            &queue(),
            at("2026-11-27T10:00:00Z"),
            false,
        );
        assert!(!d.send && d.reasons[0].contains("amateur"));
        let laptop = policy("[link]\ndefer_on_battery = true\n");
        let d = decide(
            &laptop,
            &Ledger::default(),
            &queue(),
            at("2026-11-27T10:00:00Z"),
            true,
        );
        assert!(!d.send && d.reasons[0].contains("battery"));
        let d = decide(
            &laptop,
            &Ledger::default(),
            &queue(),
            at("2026-11-27T10:00:00Z"),
            false,
        );
        assert!(d.send);
    }

    #[test]
    fn rates_follow_their_windows() {
        let hotel = policy(
            "[rate]\nbytes_per_second = \"1 MB\"\nwindows = [{ hours = \"18:00-23:00\", bytes_per_second = \"100 kB\" }]\n",
        );
        let day = decide(
            &hotel,
            &Ledger::default(),
            &queue(),
            at("2026-11-27T10:00:00Z"),
            false,
        );
        assert_eq!(day.rate, Some(1_000_000));
        assert_eq!(day.recheck_at, Some(at("2026-11-27T18:00:00Z")));
        let evening = decide(
            &hotel,
            &Ledger::default(),
            &queue(),
            at("2026-11-27T19:00:00Z"),
            false,
        );
        assert_eq!(evening.rate, Some(100_000));
        assert_eq!(evening.recheck_at, Some(at("2026-11-27T23:00:00Z")));
    }

    #[test]
    fn the_rate_follows_the_clock_through_its_windows() {
        let hotel = policy(
            "[rate]\nbytes_per_second = \"1 MB\"\nwindows = [{ hours = \"18:00-23:00\", bytes_per_second = \"100 kB\" }]\n[link]\nbits_per_second = 4000000\n",
        );
        assert_eq!(hotel.rate_at(at("2026-11-27T10:00:00Z")), Some(500_000));
        assert_eq!(hotel.rate_at(at("2026-11-27T18:30:00Z")), Some(100_000));
        assert_eq!(
            hotel.next_rate_change(at("2026-11-27T10:00:00Z")),
            Some(at("2026-11-27T18:00:00Z"))
        );
        assert_eq!(
            hotel.next_rate_change(at("2026-11-27T18:30:10Z")),
            Some(at("2026-11-27T23:00:00Z"))
        );
        let flat = policy("[rate]\nbytes_per_second = \"1 MB\"\n");
        assert_eq!(flat.next_rate_change(at("2026-11-27T10:00:00Z")), None);
    }

    #[test]
    fn rolling_windows_recheck_every_bucket() {
        let hotel =
            policy("[budget]\nbytes = \"500 MB\"\nperiod = \"rolling\"\nrolling_hours = 24\n");
        let budget = hotel.budget.clone().unwrap();
        let mut ledger = Ledger::default();
        ledger.charge(
            Some(&budget),
            at("2026-11-26T10:05:00Z"),
            budget.allowance(),
        );
        let d = decide(&hotel, &ledger, &queue(), at("2026-11-27T10:00:00Z"), false);
        assert!(!d.send);
        assert_eq!(d.recheck_at, Some(at("2026-11-27T10:15:00Z")));
        let d = decide(&hotel, &ledger, &queue(), at("2026-11-27T10:15:00Z"), false);
        assert!(d.send);
    }
}
