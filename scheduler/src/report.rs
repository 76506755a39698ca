//! `homing report`: per network, what the backup spent of its cap this period,
//! what is still queued and when it will drain at that budget, and the last
//! days' traffic as a chart a person can read at a glance.

use std::collections::BTreeMap;
use std::process::ExitCode;

use homing_policy::{Ledger, Policy, Span};
use jiff::{Timestamp, ToSpan};
use redb::{ReadableDatabase, ReadableTable};
use serde::Serialize;

use crate::commands::human_bytes;
use crate::paths::Paths;

/// One network's line of the report.
#[derive(Debug, Clone, Serialize)]
pub struct NetworkReport {
    /// The network (its policy's name).
    pub network: String,
    /// Whether its policy is among the current files.
    pub has_policy: bool,
    /// The current period (for a capped network).
    pub period_start: Option<String>,
    /// Its end.
    pub period_end: Option<String>,
    /// The cap.
    pub cap: Option<u64>,
    /// What Homing lets itself spend (cap × safety).
    pub allowance: Option<u64>,
    /// Counted bytes this period.
    pub spent: u64,
    /// All bytes this period (free hours included).
    pub all_bytes: u64,
    /// Payload bytes the budget still allows this period.
    pub left: Option<u64>,
    /// Queued bytes of the classes this network carries (the rest waits for
    /// another link).
    pub queued_bytes: u64,
    /// When that part of the queue would be gone if it went over this network:
    /// now (no cap or enough left), or the start of the period in which it
    /// fits; `None` when nothing of it ever goes over this link.
    pub drains: Option<String>,
    /// All bytes per day, oldest first: (date, bytes).
    pub days: Vec<(String, u64)>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// When it was made.
    pub at: String,
    /// Sealed bytes waiting in the spool.
    pub queued_bytes: u64,
    /// Objects waiting.
    pub queued_objects: u64,
    /// Sealed bytes waiting per priority class.
    pub queued_by_class: Queued,
    /// One entry per network with a ledger or a policy.
    pub networks: Vec<NetworkReport>,
}

/// Sealed bytes waiting in the spool, per priority class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Queued {
    /// Of critical sets.
    pub critical: u64,
    /// Of normal sets.
    pub normal: u64,
    /// Of bulk sets.
    pub bulk: u64,
    /// Without a class (a spool from before classes): they go over any link.
    pub unclassified: u64,
}

impl Queued {
    /// What a link that carries `classes` would take.
    pub fn carried_by(&self, classes: &[homing_policy::Class]) -> u64 {
        let mut bytes = self.unclassified;
        for class in classes {
            bytes += match class.index() {
                0 => self.critical,
                1 => self.normal,
                _ => self.bulk,
            };
        }
        bytes
    }

    /// Reads the spool's locations and classes.
    ///
    /// # Errors
    /// Database errors.
    pub fn of_spool(db: &redb::Database) -> anyhow::Result<Self> {
        let txn = db.begin_read()?;
        let at = txn.open_table(crate::spool::SPOOL_AT)?;
        let classes = txn.open_table(crate::state::SPOOL_CLASS)?;
        let mut queued = Self::default();
        for item in at.iter()? {
            let (id, location) = item?;
            let len =
                crate::spool::Location::decode(location.value()).map_or(0, |l| u64::from(l.len));
            let slot = match classes.get(id.value())?.map(|v| v.value()) {
                Some(0) => &mut queued.critical,
                Some(1) => &mut queued.normal,
                Some(_) => &mut queued.bulk,
                None => &mut queued.unclassified,
            };
            *slot += len;
        }
        Ok(queued)
    }
}

/// Builds the report for the last `days` days.
///
/// # Errors
/// Bad policy files, database errors.
pub fn build(paths: &Paths, days: u32, now: Timestamp) -> anyhow::Result<Report> {
    let db = crate::state::open(&paths.state)?;
    let (queued_bytes, queued_objects) = crate::state::spool_size(&db)?;
    let queued_by_class = Queued::of_spool(&db)?;
    // Every network that ever spent, and every policy there is.
    let mut names: BTreeMap<String, Option<Policy>> = BTreeMap::new();
    {
        let txn = db.begin_read()?;
        if let Some(table) = crate::state::optional_table(&txn, crate::ledger::LEDGER)? {
            for item in table.iter()? {
                let (key, _) = item?;
                names.entry(key.value().0.to_string()).or_insert(None);
            }
        }
    }
    if let Some(set) = crate::policy::load_set(paths)? {
        for policy in set.policies() {
            names.insert(policy.name.clone(), Some(policy.clone()));
        }
    }
    let mut networks = Vec::new();
    for (name, policy) in names {
        let ledger = crate::ledger::load(&db, &name)?;
        // A network without a policy file now carries what a run without
        // policies would: everything.
        let queued = policy.as_ref().map_or(queued_bytes, |p| {
            queued_by_class.carried_by(&p.link.classes)
        });
        networks.push(network_report(
            &name,
            policy.as_ref(),
            &ledger,
            queued,
            days,
            now,
        ));
    }
    Ok(Report {
        at: now.to_string(),
        queued_bytes,
        queued_objects,
        queued_by_class,
        networks,
    })
}

fn network_report(
    name: &str,
    policy: Option<&Policy>,
    ledger: &Ledger,
    queued: u64,
    days: u32,
    now: Timestamp,
) -> NetworkReport {
    let budget = policy.and_then(|p| p.budget.as_ref());
    let period = budget.map(|b| b.period_at(now));
    let spent = budget.map_or(0, |b| ledger.spent(b, now));
    let all_bytes = period.map_or(0, |p| ledger.raw_in(p));
    let left = budget
        .and_then(|b| policy.map(|p| p.link.payload_within(b.allowance().saturating_sub(spent))));
    let drains = match (policy, budget, left) {
        (Some(p), _, _) if p.link.amateur => None,
        _ if queued == 0 => None,
        (Some(_), Some(b), Some(left)) => {
            if queued <= left {
                Some("this period".to_string())
            } else {
                // Whole periods of allowance after this one.
                let per_period = policy.map_or(0, |p| p.link.payload_within(b.allowance()));
                if per_period == 0 {
                    None
                } else {
                    let more = (queued - left).div_ceil(per_period);
                    let mut start = period.map_or(now, |p| p.end);
                    for _ in 1..more {
                        start = b.period_at(start).end;
                    }
                    Some(format!("by the period starting {start}"))
                }
            }
        }
        (Some(_), None, _) => Some("now (no cap)".to_string()),
        _ => None,
    };
    let mut history = Vec::new();
    let today = now.to_zoned(jiff::tz::TimeZone::UTC).date();
    for back in (0..days).rev() {
        let Ok(date) = today.checked_sub(i64::from(back).days()) else {
            continue;
        };
        let (Ok(start), Ok(end)) = (
            date.to_zoned(jiff::tz::TimeZone::UTC),
            date.tomorrow()
                .and_then(|d| d.to_zoned(jiff::tz::TimeZone::UTC)),
        ) else {
            continue;
        };
        let span = Span {
            start: start.timestamp(),
            end: end.timestamp(),
        };
        history.push((date.to_string(), ledger.raw_in(span)));
    }
    NetworkReport {
        network: name.to_string(),
        has_policy: policy.is_some(),
        period_start: period.map(|p| p.start.to_string()),
        period_end: period.map(|p| p.end.to_string()),
        cap: budget.map(|b| b.bytes),
        allowance: budget.map(homing_policy::Budget::allowance),
        spent,
        all_bytes,
        left,
        queued_bytes: queued,
        drains,
        days: history,
    }
}

/// `homing report`
///
/// # Errors
/// As [`build`].
pub fn run(paths: &Paths, days: u32, json: bool) -> anyhow::Result<ExitCode> {
    let report = build(paths, days, Timestamp::now())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", to_text(&report));
    Ok(ExitCode::SUCCESS)
}

/// The report as a person reads it: a table, the queue, and a bar per day.
pub fn to_text(report: &Report) -> String {
    let mut out = format!(
        "{:<18} {:<23} {:>10} {:>10} {:>10}  {}\n",
        "network", "period", "cap", "spent", "left", "queue drains"
    );
    for n in &report.networks {
        let period = match (&n.period_start, &n.period_end) {
            (Some(start), Some(end)) => format!("{} → {}", &start[..10], &end[..10]),
            _ => "no cap".into(),
        };
        let or_dash = |v: Option<u64>| v.map_or_else(|| "-".into(), human_bytes);
        out.push_str(&format!(
            "{:<18} {:<23} {:>10} {:>10} {:>10}  {}{}\n",
            n.network,
            period,
            or_dash(n.cap),
            human_bytes(n.spent),
            or_dash(n.left),
            match (&n.drains, n.queued_bytes) {
                (Some(when), _) => when.as_str(),
                (None, 0) => "nothing queued for it",
                (None, _) => "never over this link",
            },
            if n.has_policy {
                ""
            } else {
                " (no policy file now)"
            },
        ));
    }
    let q = &report.queued_by_class;
    out.push_str(&format!(
        "\nqueued: {} in {} objects (critical {}, normal {}, bulk {}{})\n",
        human_bytes(report.queued_bytes),
        report.queued_objects,
        human_bytes(q.critical),
        human_bytes(q.normal),
        human_bytes(q.bulk),
        if q.unclassified > 0 {
            format!(", without a class {}", human_bytes(q.unclassified))
        } else {
            String::new()
        },
    ));
    let widest = report
        .networks
        .iter()
        .flat_map(|n| n.days.iter().map(|(_, b)| *b))
        .max()
        .unwrap_or(0);
    if widest > 0 {
        out.push_str("\nall bytes per day (UTC):\n");
        for n in &report.networks {
            if n.days.iter().all(|(_, b)| *b == 0) {
                continue;
            }
            out.push_str(&format!("{}\n", n.network));
            for (date, bytes) in &n.days {
                let width = ((*bytes as f64 / widest as f64) * 40.0).round() as usize;
                out.push_str(&format!(
                    "  {date} {:<40} {}\n",
                    "█".repeat(width),
                    human_bytes(*bytes)
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn a_network_report_says_spent_left_and_when_the_queue_drains() {
        let policy = Policy::parse(
            "[budget]\nbytes = \"100 MB\"\nperiod = \"month\"\nbilling_day = 17\n",
            Path::new("hotspot.toml"),
        )
        .unwrap();
        let budget = policy.budget.clone().unwrap();
        let now: Timestamp = "2026-11-27T12:00:00Z".parse().unwrap();
        let mut ledger = Ledger::default();
        ledger.charge(
            Some(&budget),
            "2026-11-20T10:00:00Z".parse().unwrap(),
            60_000_000,
        );
        ledger.charge(
            Some(&budget),
            "2026-11-27T10:00:00Z".parse().unwrap(),
            5_000_000,
        );
        let small = network_report("hotspot", Some(&policy), &ledger, 10_000_000, 3, now);
        assert_eq!(small.spent, 65_000_000);
        assert_eq!(small.drains.as_deref(), Some("this period"));
        assert_eq!(small.days.len(), 3);
        assert_eq!(small.days[2], ("2026-11-27".to_string(), 5_000_000));
        // 29 MB fit this period, ~93.6 MB a month after: 230 MB need three more
        // months, the last starting 17 February.
        let big = network_report("hotspot", Some(&policy), &ledger, 230_000_000, 3, now);
        assert_eq!(
            big.drains.as_deref(),
            Some("by the period starting 2027-02-17T00:00:00Z")
        );
        let text = to_text(&Report {
            at: now.to_string(),
            queued_bytes: 230_000_000,
            queued_objects: 7000,
            queued_by_class: Queued {
                normal: 230_000_000,
                ..Queued::default()
            },
            networks: vec![big],
        });
        assert!(text.contains("hotspot") && text.contains("█"), "{text}");
        assert!(text.contains("normal 230.0 MB"), "{text}");
        // Nothing of the queue for this link: nothing drains over it.
        let idle = network_report("hotspot", Some(&policy), &ledger, 0, 3, now);
        assert_eq!(idle.drains, None);
        assert!(
            to_text(&Report {
                at: now.to_string(),
                queued_bytes: 0,
                queued_objects: 0,
                queued_by_class: Queued::default(),
                networks: vec![idle],
            })
            .contains("nothing queued for it")
        );
    }

    #[test]
    fn a_link_carries_only_its_classes_of_the_queue() {
        let queued = Queued {
            critical: 1,
            normal: 20,
            bulk: 300,
            unclassified: 4000,
        };
        let narrow = Policy::parse(
            "[link]\nclasses = [\"critical\"]\n",
            Path::new("narrow.toml"),
        )
        .unwrap();
        assert_eq!(queued.carried_by(&narrow.link.classes), 4001);
        let everything = Policy::parse("", Path::new("home.toml")).unwrap();
        assert_eq!(queued.carried_by(&everything.link.classes), 4321);
    }
}
