//! Over a real, shaped link between two network namespaces (`tests/netlab.sh`,
//! root only): a backup under a 1 MB daily cap with 3 MB to send stops at the
//! cap, and the kernel's own counters of the laptop's interface, both
//! directions, stay inside it; the ledger agrees with them within a few percent.
//!
//! Without root (or without `ip`), the test says so and passes, unless
//! `HOMING_REQUIRE_NETLAB` is set, as CI sets it: there it must run.

use std::path::Path;
use std::process::Stdio;

use homing_e2e::lab::{Lab, rig, run};

use super::stderr;

/// Incompressible bytes: zstd must not shrink them.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15_u64 ^ seed;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// What the ledger says the lab network spent (from `homing policy explain`).
fn ledger_spent(lab: &Lab, config: &Path) -> u64 {
    let explain = run(lab.homing(config).args(["policy", "explain", "--json"]));
    let explained: serde_json::Value = serde_json::from_slice(&explain.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", stderr(&explain)));
    explained["spent"].as_u64().expect("a budget")
}

#[test]
fn a_capped_link_stops_at_the_cap_by_the_kernels_own_count() {
    if !homing_e2e::lab::available() {
        return;
    }
    let lab = Lab::up("hmcap", "8mbit");
    let rig = rig(
        &lab,
        "[match]\ninterface = \"nlc0\"\n\n[budget]\nbytes = \"1 MB\"\nperiod = \"day\"\n",
    );
    let (home, config) = (&rig.home, &rig.config);
    let src = home.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let data = noise(3_000_000, 0);
    std::fs::write(src.join("three-megabytes.bin"), data).unwrap();
    let (tx0, rx0) = lab.client_counters();
    let backup = run(lab
        .homing(config)
        .args(["backup", "--json", src.to_str().unwrap()]));
    assert_eq!(backup.status.code(), Some(3), "{}", stderr(&backup));
    assert!(
        stderr(&backup).contains("data budget of this network is spent"),
        "{}",
        stderr(&backup)
    );
    let (tx1, rx1) = lab.client_counters();
    let kernel = (tx1 - tx0) + (rx1 - rx0);
    assert!(kernel <= 1_000_000, "the kernel counted {kernel} bytes");
    assert!(kernel > 700_000, "the cap was hardly used: {kernel} bytes");
    let spent = ledger_spent(&lab, config);
    let difference = (spent as f64 - kernel as f64).abs() / kernel as f64;
    eprintln!("1 MB cap: the kernel counted {kernel} bytes, the ledger {spent}");
    assert!(
        difference < 0.05,
        "the ledger says {spent}, the kernel {kernel}"
    );
}

#[test]
fn a_link_change_is_seen_within_a_second() {
    if !homing_e2e::lab::available() {
        return;
    }
    let lab = Lab::up("hmwatch", "8mbit");
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("client");
    std::fs::create_dir_all(config.join("policies")).unwrap();
    std::fs::write(
        config.join("config.toml"),
        format!(
            "[store]\naddress = \"{0}:7473\"\nserver_name = \"{0}\"\nca = \"ca.crt\"\ncertificate = \"c.crt\"\nkey = \"c.key\"\n",
            lab.get("SERVER_IP")
        ),
    )
    .unwrap();
    std::fs::write(
        config.join("policies/lab.toml"),
        "[match]\ninterface = \"nlc0\"\n",
    )
    .unwrap();
    // More specific: the lab link once it has an address in 10.99.0.0/24.
    std::fs::write(
        config.join("policies/second.toml"),
        "[match]\ninterface = \"nlc0\"\nprefix = \"10.99.0.0/24\"\n",
    )
    .unwrap();
    let mut watcher = lab
        .homing(&config)
        .args(["policy", "watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the watcher starts");
    let (lines, seen) = std::sync::mpsc::channel();
    let stdout = watcher.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if lines.send((tokio::time::Instant::now(), line)).is_err() {
                return;
            }
        }
    });
    let (_, first) = seen
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the first look");
    assert!(first.contains("nlc0 → lab"), "{first}");
    let changed_at = tokio::time::Instant::now();
    let status = lab
        .exec("CLIENT_NS", Path::new("ip"))
        .args(["addr", "add", "10.99.0.1/24", "dev", "nlc0"])
        .status()
        .unwrap();
    assert!(status.success());
    let (at, line) = seen
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("a line for the change");
    let after = at.duration_since(changed_at);
    eprintln!("a link change was seen after {after:?}: {line}");
    assert!(line.contains("→ second"), "{line}");
    assert!(
        after < std::time::Duration::from_secs(1),
        "the change took {after:?} to be seen"
    );
    let _ = watcher.kill();
    let _ = watcher.wait();
}

#[test]
fn backups_killed_mid_upload_never_leave_the_ledger_below_the_kernels_count() {
    if !homing_e2e::lab::available() {
        return;
    }
    let lab = Lab::up("hmkill", "8mbit");
    let rig = rig(
        &lab,
        "[match]\ninterface = \"nlc0\"\n\n[budget]\nbytes = \"1 GB\"\nperiod = \"day\"\n",
    );
    let src = rig.home.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let (tx0, rx0) = lab.client_counters();
    // Each round brings new data and is killed at a different point of its upload.
    for (round, wait) in [150_u64, 900, 400, 1300, 650, 250, 1100, 500]
        .into_iter()
        .enumerate()
    {
        std::fs::write(
            src.join(format!("part{round}.bin")),
            noise(1_500_000, round as u64 + 1),
        )
        .unwrap();
        let mut victim = lab
            .homing(&rig.config)
            .args(["backup", "--json"])
            .arg(&src)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(wait));
        let _ = victim.kill();
        let _ = victim.wait();
    }
    let (tx1, rx1) = lab.client_counters();
    let kernel = (tx1 - tx0) + (rx1 - rx0);
    let spent = ledger_spent(&lab, &rig.config);
    eprintln!("8 killed backups: the kernel counted {kernel} bytes, the ledger {spent}");
    assert!(
        kernel > 1_000_000,
        "the backups hardly sent anything: {kernel}"
    );
    assert!(
        spent >= kernel,
        "the ledger ({spent}) counted less than the kernel ({kernel})"
    );
    // Each kill strands at most a reservation chunk (256 KiB) and the send
    // buffer's worth.
    assert!(
        spent <= kernel + 8 * (384 << 10),
        "the ledger ({spent}) over-counts the kernel ({kernel}) by more than the kills explain"
    );
}

/// The daemon of the two tests below, uploading 3 MB of noise in a normal set
/// over the lab's link under a budgeted policy, with a second policy for the
/// same interface once it has an address in 10.99.0.0/24: another network, one
/// that carries critical sets only. Its log goes to `daemon.log` in the rig.
fn uploading_daemon(lab: &Lab) -> (homing_e2e::lab::Rig, std::process::Child) {
    // A budget (a generous one) gives the connection a small send buffer, as on
    // any capped link.
    let rig = rig(
        lab,
        "[match]\ninterface = \"nlc0\"\n\n[budget]\nbytes = \"1 GB\"\nperiod = \"day\"\n",
    );
    std::fs::write(
        rig.config.join("policies/narrow.toml"),
        "[match]\ninterface = \"nlc0\"\nprefix = \"10.99.0.0/24\"\n\n[link]\nclasses = [\"critical\"]\n",
    )
    .expect("a policy");
    let src = rig.home.path().join("src");
    std::fs::create_dir(&src).expect("a directory");
    std::fs::write(src.join("big.bin"), noise(3_000_000, 7)).expect("data");
    let mut config = std::fs::read_to_string(rig.config.join("config.toml")).expect("config");
    config.push_str(&format!(
        "\n[[set]]\nname = \"home\"\npaths = [\"{}\"]\n",
        src.display()
    ));
    std::fs::write(rig.config.join("config.toml"), config).expect("config");
    let daemon = lab
        .homing(&rig.config)
        .args(["daemon"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(rig.home.path().join("daemon.log")).expect("a log"))
        .spawn()
        .expect("the daemon starts");
    (rig, daemon)
}

/// Gives the lab client's interface one more address.
fn add_address(lab: &Lab, address: &str) {
    let status = lab
        .exec("CLIENT_NS", Path::new("ip"))
        .args(["addr", "add", address, "dev", "nlc0"])
        .status()
        .expect("ip runs");
    assert!(status.success());
}

#[test]
fn the_daemon_stops_an_upload_when_the_link_changes_under_it() {
    if !homing_e2e::lab::available() {
        return;
    }
    // A short shaper queue: what the kernel still holds when the upload stops is
    // small, so that the stop itself is what the counters show.
    let lab = Lab::up_queue("hmswitch", "1mbit", 300);
    let (rig, mut daemon) = uploading_daemon(&lab);
    // At 1 Mbit/s the 3 MB take about 25 s: switch networks a few seconds in.
    std::thread::sleep(std::time::Duration::from_secs(4));
    let (before, _) = lab.client_counters();
    add_address(&lab, "10.99.0.1/24");
    let (at_change, _) = lab.client_counters();
    // What was in the kernel's hands drains within a second; after that the
    // link is quiet (the new network carries no normal sets).
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let (drained, _) = lab.client_counters();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let (after, _) = lab.client_counters();
    let _ = daemon.kill();
    let _ = daemon.wait();
    let log = std::fs::read_to_string(rig.home.path().join("daemon.log")).unwrap_or_default();
    let draining = drained - at_change;
    let later = after - drained;
    eprintln!(
        "sent in the first 4 s: {before} bytes; in the 1.5 s after the link changed: \
         {draining}; in the 3 s after that: {later}"
    );
    assert!(
        before > 200_000,
        "the upload had not started: {before}\n{log}"
    );
    assert!(log.contains("the upload was stopped"), "{log}");
    // 1.5 s at 1 Mbit/s would be 190 kB: far less goes.
    assert!(
        draining < 120_000,
        "the upload went on after the link changed: {draining} bytes"
    );
    assert!(later < 10_000, "the link was not quiet: {later} bytes");
}

#[test]
fn the_daemon_goes_on_uploading_when_the_link_changes_within_its_network() {
    if !homing_e2e::lab::available() {
        return;
    }
    let lab = Lab::up_queue("hmsame", "1mbit", 300);
    let (rig, mut daemon) = uploading_daemon(&lab);
    let log = rig.home.path().join("daemon.log");
    std::thread::sleep(std::time::Duration::from_secs(4));
    // A new address outside 10.99.0.0/24 (as a renewed lease or a new IPv6
    // address would bring): the link changed, the policy that matches did not.
    add_address(&lab, "10.98.0.1/24");
    let (at_change, _) = lab.client_counters();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let (later, _) = lab.client_counters();
    let status = after_run(&lab, &rig.config, 1, &log);
    let _ = daemon.kill();
    let _ = daemon.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    eprintln!(
        "sent in the 3 s after the change: {} bytes",
        later - at_change
    );
    // 3 s at 1 Mbit/s is 375 kB: the upload went on at the link's pace.
    assert!(
        later - at_change > 250_000,
        "the upload stalled after the change: {} bytes\n{text}",
        later - at_change
    );
    assert!(!text.contains("the upload was stopped"), "{text}");
    assert!(
        status["sets"][0]["result"]["done"]["snapshot"].is_string(),
        "{status}\n{text}"
    );
}

/// `homing status --json` of the daemon in the lab (null while it does not
/// answer yet).
fn daemon_status(lab: &Lab, config: &Path) -> serde_json::Value {
    let out = run(lab.homing(config).args(["status", "--json"]));
    if !out.status.success() && stderr(&out).contains("no homing daemon answers") {
        return serde_json::Value::Null;
    }
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)))
}

/// Waits until the daemon has finished `runs` runs and is idle; its status then.
fn after_run(lab: &Lab, config: &Path, runs: u64, log: &Path) -> serde_json::Value {
    let deadline = std::time::Duration::from_secs(120);
    let started = tokio::time::Instant::now();
    loop {
        let status = daemon_status(lab, config);
        if status["runs"].as_u64() >= Some(runs) && status["running"] == false {
            return status;
        }
        assert!(
            started.elapsed() < deadline,
            "run {runs} did not end: {status}\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Moves every bucket of the client's ledger one day back, as if a day had
/// passed: the budget period rolls over. The daemon opens the state only for a
/// run, so between runs it is free.
fn a_day_passes(config: &Path) {
    const LEDGER: redb::TableDefinition<(&str, i64), (u64, u64)> =
        redb::TableDefinition::new("ledger");
    let db = redb::Database::open(config.join("state/state.redb")).expect("the client's state");
    let txn = db.begin_write().expect("a transaction");
    {
        let mut table = txn.open_table(LEDGER).expect("the ledger");
        let mut buckets = Vec::new();
        for item in redb::ReadableTable::iter(&table).expect("the buckets") {
            let (key, value) = item.expect("a bucket");
            let (network, start) = key.value();
            buckets.push((network.to_string(), start, value.value()));
        }
        for (network, start, _) in &buckets {
            table.remove((network.as_str(), *start)).expect("removed");
        }
        for (network, start, tally) in &buckets {
            table
                .insert((network.as_str(), start - 86_400), tally)
                .expect("moved");
        }
    }
    txn.commit().expect("committed");
}

#[test]
fn the_daemon_stops_at_the_cap_and_the_rest_goes_when_the_period_rolls_over() {
    if !homing_e2e::lab::available() {
        return;
    }
    let lab = Lab::up("hmroll", "8mbit");
    let rig = rig(
        &lab,
        "[match]\ninterface = \"nlc0\"\n\n[budget]\nbytes = \"1 MB\"\nperiod = \"day\"\n",
    );
    let src = rig.home.path().join("src");
    std::fs::create_dir(&src).expect("a directory");
    let data = noise(3_000_000, 11);
    std::fs::write(src.join("three-megabytes.bin"), &data).expect("data");
    let mut config = std::fs::read_to_string(rig.config.join("config.toml")).expect("config");
    config.push_str(&format!(
        "\n[[set]]\nname = \"home\"\npaths = [\"{}\"]\n",
        src.display()
    ));
    std::fs::write(rig.config.join("config.toml"), config).expect("config");
    let log = rig.home.path().join("daemon.log");
    let (mut tx, mut rx) = lab.client_counters();
    let mut daemon = lab
        .homing(&rig.config)
        .args(["daemon"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("a log"))
        .spawn()
        .expect("the daemon starts");
    // Day after day: each run stops at the cap and the rest stays queued; a
    // day later the next run (asked for at once here) goes on from there.
    let mut days = Vec::new();
    let done = loop {
        let status = after_run(&lab, &rig.config, days.len() as u64 + 1, &log);
        let (tx_now, rx_now) = lab.client_counters();
        let day = (tx_now - tx) + (rx_now - rx);
        (tx, rx) = (tx_now, rx_now);
        days.push(day);
        assert!(
            day <= 1_000_000,
            "day {}: the kernel counted {day} bytes under a 1 MB cap",
            days.len()
        );
        let result = &status["sets"][0]["result"];
        if result.get("done").is_some() {
            break status;
        }
        let why = result["queued"]["why"].as_str().unwrap_or_default();
        assert!(why.contains("budget"), "{status}");
        assert!(days.len() < 6, "the queue does not drain: {days:?}");
        a_day_passes(&rig.config);
        let now = run(lab.homing(&rig.config).arg("backup-now"));
        assert!(now.status.success(), "{}", stderr(&now));
    };
    let _ = daemon.kill();
    let _ = daemon.wait();
    eprintln!("bytes the kernel counted per day under a 1 MB cap: {days:?}");
    // 3 MB of incompressible data and a 1 MB cap: four days at least, every
    // one but the last used well.
    assert!(days.len() >= 4, "{days:?}");
    for day in &days[..days.len() - 1] {
        assert!(*day > 700_000, "a day's budget was hardly used: {days:?}");
    }
    assert!(
        done["sets"][0]["result"]["done"]["snapshot"].is_string(),
        "{done}"
    );
    let target = rig.home.path().join("restored");
    let restore = run(lab
        .homing(&rig.config)
        .args(["restore", "latest", "--target"])
        .arg(&target));
    assert!(restore.status.success(), "{}", stderr(&restore));
    let back = std::fs::read(
        target
            .join(src.strip_prefix("/").expect("absolute"))
            .join("three-megabytes.bin"),
    )
    .expect("restored");
    assert!(back == data, "the restored file differs");
}

#[test]
fn a_wifi_network_manager_calls_metered_gets_the_policy_written_for_it() {
    if !homing_e2e::lab::available() {
        return;
    }
    let Some(bus) = homing_e2e::dbus::Bus::start() else {
        return;
    };
    let lab = Lab::up("hmnm", "8mbit");
    let rig = rig(&lab, "[match]\ninterface = \"nlc0\"\n");
    std::fs::write(
        rig.config.join("policies/cafe.toml"),
        "[match]\nssid = \"Café Wi-Fi\"\nmetered = true\n\n[budget]\nbytes = \"50 MB\"\nperiod = \"day\"\n",
    )
    .expect("a policy");
    let explain = || -> serde_json::Value {
        let out = run(lab
            .homing(&rig.config)
            .args(["policy", "explain", "--json"])
            .env("DBUS_SYSTEM_BUS_ADDRESS", bus.address()));
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice(&out.stdout).expect("JSON")
    };
    // No NetworkManager on the bus: only the interface is known.
    let before = explain();
    assert_eq!(before["network"], "lab", "{before}");
    // NetworkManager says the interface is Wi-Fi on the cafe's network, metered.
    let _network_manager = homing_e2e::dbus::network_manager(
        bus.address(),
        vec![homing_e2e::dbus::Device::wifi(
            "nlc0",
            1,
            Some(("Café Wi-Fi", "AA:BB:CC:00:11:22")),
        )],
    );
    let after = explain();
    assert_eq!(after["network"], "cafe", "{after}");
    let text = after.to_string();
    assert!(text.contains("Café Wi-Fi"), "{after}");
    // Another network: a phone's hotspot, whose DHCP lease carries Android's
    // mark (NetworkManager shows option 43 in hex).
    drop(_network_manager);
    std::fs::write(
        rig.config.join("policies/phone.toml"),
        "[match]\ninterface = \"nlc0\"\nhotspot = true\n\n[budget]\nbytes = \"2 GB\"\nperiod = \"month\"\n",
    )
    .expect("a policy");
    let _network_manager = homing_e2e::dbus::network_manager(
        bus.address(),
        vec![
            homing_e2e::dbus::Device::wifi("nlc0", 0, Some(("Pixel", "02:11:22:33:44:55")))
                .with_dhcp_vendor("41:4e:44:52:4f:49:44:5f:4d:45:54:45:52:45:44"),
        ],
    );
    let phone = explain();
    assert_eq!(phone["network"], "phone", "{phone}");
}

#[test]
fn a_store_reached_over_ipv6_knows_its_network_by_the_gateways_mac() {
    if !homing_e2e::lab::available() {
        return;
    }
    let lab = Lab::up("hmv6gw", "8mbit");
    let rig = rig(&lab, "[match]\ninterface = \"nlc0\"\n");
    // The store at an IPv6 address behind a router on the link, whose MAC only
    // the kernel's neighbour table holds (there is no file of it, as
    // /proc/net/arp is for IPv4).
    let router = "02:00:00:00:99:01";
    // The lab keeps IPv6 off to keep its counters quiet: on for this interface.
    let out = run(lab
        .exec("CLIENT_NS", Path::new("sysctl"))
        .args(["-qw", "net.ipv6.conf.nlc0.disable_ipv6=0"]));
    assert!(out.status.success(), "sysctl: {}", stderr(&out));
    for args in [
        vec![
            "-6",
            "route",
            "add",
            "2001:db8:99::/64",
            "via",
            "fe80::99",
            "dev",
            "nlc0",
        ],
        vec![
            "-6",
            "neigh",
            "replace",
            "fe80::99",
            "lladdr",
            router,
            "dev",
            "nlc0",
            "nud",
            "permanent",
        ],
    ] {
        let out = run(lab.exec("CLIENT_NS", Path::new("ip")).args(&args));
        assert!(out.status.success(), "ip {args:?}: {}", stderr(&out));
    }
    let path = rig.config.join("config.toml");
    let config = std::fs::read_to_string(&path).expect("config");
    let address = config
        .lines()
        .find(|line| line.starts_with("address = "))
        .expect("the store's address")
        .to_string();
    std::fs::write(
        &path,
        config.replace(&address, "address = \"[2001:db8:99::1]:7473\""),
    )
    .expect("config");
    std::fs::write(
        rig.config.join("policies/router.toml"),
        format!(
            "[match]\ngateway_mac = \"{router}\"\n\n[budget]\nbytes = \"1 GB\"\nperiod = \"day\"\n"
        ),
    )
    .expect("a policy");
    let out = run(lab
        .homing(&rig.config)
        .args(["policy", "explain", "--json"]));
    assert!(out.status.success(), "{}", stderr(&out));
    let explain: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(explain["network"], "router", "{explain}");
    assert!(explain.to_string().contains(router), "{explain}");
}
