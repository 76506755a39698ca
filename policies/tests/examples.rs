//! The example policies that ship in `policies/examples/` load together, and say
//! what their comments promise.

use std::path::{Path, PathBuf};

use homing_policy::{Class, Ledger, LinkKind, Observation, PolicySet, Queue, decide};
use jiff::Timestamp;

fn examples() -> Vec<(PathBuf, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files: Vec<(PathBuf, String)> = std::fs::read_dir(&dir)
        .expect("the examples directory")
        .map(|entry| {
            let path = entry.expect("an entry").path();
            let text = std::fs::read_to_string(&path).expect("a readable example");
            (path, text)
        })
        .filter(|(path, _)| path.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

fn set() -> PolicySet {
    let files = examples();
    PolicySet::load(files.iter().map(|(p, t)| (p.as_path(), t.as_str())))
        .unwrap_or_else(|errors| panic!("{errors:?}"))
}

#[test]
fn every_example_loads_and_they_load_together() {
    assert_eq!(examples().len(), 6);
    let set = set();
    assert_eq!(set.policies().count(), 6);
}

#[test]
fn each_network_gets_its_policy() {
    let set = set();
    let now: Timestamp = "2026-11-27T10:00:00Z".parse().unwrap();
    let queue = Queue {
        critical: 10_000,
        normal: 1_000_000,
        bulk: 100_000_000,
    };
    let home = Observation {
        interface: "wlan0".into(),
        kind: Some(LinkKind::Wifi),
        gateway_mac: Some("00:1a:2b:3c:4d:5e".into()),
        ..Observation::default()
    };
    let policy = set.select(&home).unwrap().policy;
    assert_eq!(policy.name, "home");
    let d = decide(policy, &Ledger::default(), &queue, now, false);
    assert!(d.send && d.max_bytes == u64::MAX && d.rate.is_none());

    let iphone = Observation {
        interface: "wlan0".into(),
        kind: Some(LinkKind::Wifi),
        ssid: Some("Anna's iPhone".into()),
        addresses: vec!["172.20.10.2".parse().unwrap()],
        ..Observation::default()
    };
    let policy = set.select(&iphone).unwrap().policy;
    assert_eq!(policy.name, "phone-hotspot");
    let d = decide(policy, &Ledger::default(), &queue, now, false);
    assert_eq!(d.classes, vec![Class::Critical, Class::Normal]);
    assert!(!decide(policy, &Ledger::default(), &queue, now, true).send);

    let radio = Observation {
        interface: "ax0".into(),
        kind: Some(LinkKind::Radio),
        ..Observation::default()
    };
    let policy = set.select(&radio).unwrap().policy;
    assert_eq!(policy.name, "packet-radio");
    let d = decide(policy, &Ledger::default(), &queue, now, false);
    assert!(!d.send && d.reasons[0].contains("amateur"));

    let cafe = Observation {
        interface: "wlan0".into(),
        kind: Some(LinkKind::Wifi),
        ssid: Some("Cafe Free".into()),
        gateway_mac: Some("00:11:22:33:44:55".into()),
        ..Observation::default()
    };
    let selection = set.select(&cafe).unwrap();
    assert_eq!(selection.policy.name, "unknown-network");
    let d = decide(selection.policy, &Ledger::default(), &queue, now, false);
    assert_eq!(d.classes, vec![Class::Critical]);
    assert!(d.max_bytes < 20_000_000);

    let satellite = Observation {
        interface: "enx00e04c680001".into(),
        kind: Some(LinkKind::Ethernet),
        gateway_mac: Some("02:00:5e:10:00:01".into()),
        ..Observation::default()
    };
    let policy = set.select(&satellite).unwrap().policy;
    assert_eq!(policy.name, "satellite");
    // 03:00 in Denver is free: no cap on what goes.
    let night: Timestamp = "2026-11-27T10:00:00Z".parse().unwrap();
    assert_eq!(
        decide(policy, &Ledger::default(), &queue, night, false).max_bytes,
        u64::MAX
    );
}
