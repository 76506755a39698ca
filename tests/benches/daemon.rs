//! The daemon, idle and on a link event, in a network namespace with a store
//! at the other end of a shaped link (root only; without, it says so and ends).
//!
//! - Idle: after its first run, the daemon's CPU time (user + system, every
//!   thread, from /proc) and its wake-ups (context switches of each thread,
//!   listed per thread) over `HOMING_BENCH_IDLE_SECS` seconds (default 600,
//!   the 10 minutes). Its own timer looks at the link once a minute.
//! - Event to decision: an address is added to or removed from the client's
//!   interface 20 times; the time from just before `ip` runs to the daemon's
//!   "decided on the new link" line on stderr (the line is timestamped as it
//!   arrives; the `ip` process's own run time is part of it and is reported
//!   on its own).
//!
//! `cargo bench -p homing-e2e --bench daemon`; prints figures and a JSON line.

use std::io::BufRead;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use tokio::time::Instant;

use homing_e2e::lab::{self, Lab};

/// Context switches per thread of `pid`: (thread id, name) → switches.
fn switches_by_thread(pid: u32) -> std::collections::BTreeMap<(String, String), u64> {
    let mut threads = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("threads") {
        let path = task.expect("a thread").path();
        let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
        let name = status
            .lines()
            .find_map(|l| l.strip_prefix("Name:"))
            .unwrap_or("?")
            .trim()
            .to_string();
        let count: u64 = status
            .lines()
            .filter_map(|line| {
                line.strip_prefix("voluntary_ctxt_switches:")
                    .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            })
            .filter_map(|rest| rest.trim().parse::<u64>().ok())
            .sum();
        let id = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        threads.insert((id, name), count);
    }
    threads
}

/// CPU seconds (user + system) of every thread of `pid`, ended ones included.
fn usage(pid: u32) -> f64 {
    let ticks_per_second = 100.0; // USER_HZ on Linux
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the daemon runs");
    // Fields after the command name (which may hold spaces) in parentheses.
    let after = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields[11].parse().expect("utime");
    let stime: f64 = fields[12].parse().expect("stime");
    (utime + stime) / ticks_per_second
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let at = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[at]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !lab::available() {
        eprintln!("the daemon bench needs root and iproute2 (network namespaces): skipped");
        return;
    }
    let idle_secs: u64 = std::env::var("HOMING_BENCH_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let lab = Lab::up("hmdaemon", "8mbit");
    let rig = lab::rig(&lab, "[match]\ninterface = \"nlc0\"\n");
    let src = rig.home.path().join("src");
    std::fs::create_dir(&src).expect("a source directory");
    std::fs::write(src.join("notes.txt"), "a line of notes\n".repeat(1000)).expect("a file");
    let file = rig.config.join("config.toml");
    let mut config = std::fs::read_to_string(&file).expect("the configuration");
    config.push_str(&format!(
        "\n[[set]]\nname = \"home\"\npaths = [\"{}\"]\n",
        src.display()
    ));
    std::fs::write(&file, config).expect("the configuration");

    let mut daemon = lab
        .homing(&rig.config)
        .arg("daemon")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the daemon starts");
    let pid = daemon.id();
    let (lines, seen) = mpsc::channel();
    let stderr = daemon.stderr.take().expect("piped");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if lines.send((Instant::now(), line)).is_err() {
                return;
            }
        }
    });
    let wait_for = |what: &str, limit: Duration| -> Instant {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (at, line) = seen
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no `{what}` from the daemon"));
            if line.contains(what) {
                return at;
            }
        }
    };
    wait_for("backed up", Duration::from_secs(60));
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), "homing", "`ip netns exec` execs the daemon");
    // Let the run's threads end.
    std::thread::sleep(Duration::from_secs(2));

    // Idle.
    let cpu0 = usage(pid);
    let threads0 = switches_by_thread(pid);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(idle_secs));
    let cpu1 = usage(pid);
    let threads1 = switches_by_thread(pid);
    // Per thread (a thread that ended meanwhile takes its count with it, so
    // the process's total cannot be a difference of two sums).
    let mut wakeups = 0;
    for ((id, name), count) in &threads1 {
        let before = threads0
            .get(&(id.clone(), name.clone()))
            .copied()
            .unwrap_or(0);
        let woke = count.saturating_sub(before);
        wakeups += woke;
        if woke > 0 {
            println!("  thread {id} ({name}): {woke} context switches");
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let idle_cpu = cpu1 - cpu0;
    let per_minute = wakeups as f64 * 60.0 / elapsed;
    println!(
        "idle daemon over {elapsed:.0} s: {idle_cpu:.3} CPU-s ({:.4} % of a core), \
         {wakeups} context switches ({per_minute:.1} a minute; its own timer: 1 a minute)",
        idle_cpu / elapsed * 100.0
    );

    // Event to decision.
    let mut delays = Vec::new();
    let mut ip_times = Vec::new();
    for n in 0..20 {
        let action = if n % 2 == 0 { "add" } else { "del" };
        let before = Instant::now();
        let status = lab
            .exec("CLIENT_NS", std::path::Path::new("ip"))
            .args(["addr", action, "10.99.0.1/24", "dev", "nlc0"])
            .status()
            .expect("ip runs");
        let ip_done = Instant::now();
        assert!(status.success());
        let decided = wait_for("decided on the new link", Duration::from_secs(10));
        delays.push(decided.duration_since(before).as_secs_f64() * 1000.0);
        ip_times.push(ip_done.duration_since(before).as_secs_f64() * 1000.0);
        // Apart, so that each change is its own event.
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    delays.sort_by(f64::total_cmp);
    ip_times.sort_by(f64::total_cmp);
    println!(
        "netlink event to decision (20 address changes): median {:.1} ms, p95 {:.1} ms, \
         max {:.1} ms; of which `ip addr` itself: median {:.1} ms",
        percentile(&delays, 0.5),
        percentile(&delays, 0.95),
        delays[delays.len() - 1],
        percentile(&ip_times, 0.5),
    );
    println!(
        "{}",
        serde_json::json!({
            "idle_seconds": elapsed,
            "idle_cpu_seconds": idle_cpu,
            "idle_context_switches": wakeups,
            "idle_wakeups_per_minute": per_minute,
            "event_to_decision_ms_median": percentile(&delays, 0.5),
            "event_to_decision_ms_p95": percentile(&delays, 0.95),
            "event_to_decision_ms_max": delays[delays.len() - 1],
            "ip_command_ms_median": percentile(&ip_times, 0.5),
        })
    );
}
