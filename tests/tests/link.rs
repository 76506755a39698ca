//! Over a real, shaped link between two network namespaces (`tests/netlab.sh`,
//! root only): a backup under a 1 MB daily cap with 3 MB to send stops at the
//! cap, and the kernel's own counters of the laptop's interface, both
//! directions, stay inside it; the ledger agrees with them within a few percent.
//!
//! Without root (or without `ip`), the test says so and passes, unless
//! `HOMING_REQUIRE_NETLAB` is set, as CI sets it: there it must run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use homing_e2e::binary;

use super::{homing_store, stderr};

fn netlab() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("netlab.sh")
}

fn can_run() -> bool {
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid() == 0
    });
    let ip = Command::new("ip").arg("-V").output().is_ok();
    if !(root && ip) {
        assert!(
            std::env::var_os("HOMING_REQUIRE_NETLAB").is_none(),
            "HOMING_REQUIRE_NETLAB is set but this is not root with iproute2"
        );
        eprintln!("link tests need root and iproute2: skipped");
        return false;
    }
    true
}

struct Lab {
    name: String,
    env: Vec<(String, String)>,
}

impl Lab {
    fn up(name: &str, rate: &str) -> Self {
        let _ = Command::new("bash")
            .arg(netlab())
            .args(["down", name])
            .output();
        let out = Command::new("bash")
            .arg(netlab())
            .args(["up", name, rate, "0", "0"])
            .output()
            .expect("netlab runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let env = Command::new("bash")
            .arg(netlab())
            .args(["env", name])
            .output()
            .expect("netlab runs");
        let env = String::from_utf8_lossy(&env.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self {
            name: name.to_string(),
            env,
        }
    }

    fn get(&self, key: &str) -> &str {
        &self
            .env
            .iter()
            .find(|(k, _)| k == key)
            .expect("a netlab setting")
            .1
    }

    /// (tx_bytes, rx_bytes) of the client's interface.
    fn client_counters(&self) -> (u64, u64) {
        let out = Command::new("bash")
            .arg(netlab())
            .args(["stats", &self.name])
            .output()
            .expect("netlab runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text
            .lines()
            .find(|l| l.starts_with("client"))
            .expect("client counters");
        let field = |name: &str| -> u64 {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(&format!("{name}=")))
                .expect("a counter")
                .parse()
                .expect("a number")
        };
        (field("tx_bytes"), field("rx_bytes"))
    }

    fn exec(&self, side: &str, program: &Path) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", self.get(side)]).arg(program);
        command
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(netlab())
            .args(["down", &self.name])
            .output();
    }
}

fn run(mut command: Command) -> Output {
    command.output().expect("the command runs")
}

#[test]
fn a_capped_link_stops_at_the_cap_by_the_kernels_own_count() {
    if !can_run() {
        return;
    }
    let lab = Lab::up("hmcap", "8mbit");
    let home = tempfile::tempdir().unwrap();
    let store = home.path().join("store");
    let s = store.to_str().unwrap();
    let server_ip = lab.get("SERVER_IP").to_string();
    homing_store(&["init", s, "--ip", &server_ip]);
    homing_store(&["account", "add", "laptop", "--store", s]);
    let prefix = home.path().join("laptop");
    let p = prefix.to_str().unwrap();
    homing_store(&["ca", "issue", "laptop", "--store", s, "--out", p]);
    let mut server: Child = lab
        .exec("SERVER_NS", &binary("homing-store"))
        .args([
            "serve",
            "--store",
            s,
            "--listen",
            &format!("{server_ip}:7473"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the server starts");
    {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(server.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("listening on"), "{line}");
    }
    let config = home.path().join("client");
    let c = config.to_str().unwrap();
    let init = run({
        let mut command = lab.exec("CLIENT_NS", &binary("homing"));
        command.args([
            "--config",
            c,
            "init",
            "--store",
            &format!("{server_ip}:7473"),
            "--server-name",
            &server_ip,
            "--ca",
            &format!("{p}-ca.crt"),
            "--cert",
            &format!("{p}.crt"),
            "--key",
            &format!("{p}.key"),
            "--no-passphrase",
        ]);
        command
    });
    assert!(init.status.success(), "{}", stderr(&init));
    std::fs::create_dir(config.join("policies")).unwrap();
    std::fs::write(
        config.join("policies/capped.toml"),
        "[match]\ninterface = \"nlc0\"\n\n[budget]\nbytes = \"1 MB\"\nperiod = \"day\"\n",
    )
    .unwrap();
    let src = home.path().join("src");
    std::fs::create_dir(&src).unwrap();
    // Incompressible: zstd must not shrink it under the cap.
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let data: Vec<u8> = (0..3_000_000)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect();
    std::fs::write(src.join("three-megabytes.bin"), data).unwrap();
    let (tx0, rx0) = lab.client_counters();
    let backup = run({
        let mut command = lab.exec("CLIENT_NS", &binary("homing"));
        command.args(["--config", c, "backup", "--json", src.to_str().unwrap()]);
        command
    });
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
    let explain = run({
        let mut command = lab.exec("CLIENT_NS", &binary("homing"));
        command.args(["--config", c, "policy", "explain", "--json"]);
        command
    });
    let explained: serde_json::Value = serde_json::from_slice(&explain.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", stderr(&explain)));
    assert_eq!(explained["network"], "capped");
    let spent = explained["spent"].as_u64().unwrap();
    let difference = (spent as f64 - kernel as f64).abs() / kernel as f64;
    eprintln!("1 MB cap: the kernel counted {kernel} bytes, the ledger {spent}");
    assert!(
        difference < 0.05,
        "the ledger says {spent}, the kernel {kernel}"
    );
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn a_link_change_is_seen_within_a_second() {
    if !can_run() {
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
        .exec("CLIENT_NS", &binary("homing"))
        .arg("--config")
        .arg(&config)
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
