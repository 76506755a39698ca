//! A shaped link between two network namespaces (`tests/netlab.sh`, root only),
//! and a store server in one of them with a client set up for it in the other:
//! what the link tests and the daemon bench run on.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use crate::{binary, homing_store};

fn netlab() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("netlab.sh")
}

/// Whether namespaces can be made here (root with iproute2). Without, says so on
/// stderr and returns `false`, unless `HOMING_REQUIRE_NETLAB` is set (as CI
/// sets it): then it panics, so that the link tests cannot skip there.
///
/// # Panics
/// As said, when `HOMING_REQUIRE_NETLAB` is set and this is not root with `ip`.
pub fn available() -> bool {
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

/// Two namespaces joined by a veth pair, the client's side shaped; torn down
/// when dropped.
#[derive(Debug)]
pub struct Lab {
    name: String,
    env: Vec<(String, String)>,
}

impl Lab {
    /// A lab named `name` whose link is shaped to `rate` (`tc` syntax: `8mbit`).
    ///
    /// # Panics
    /// If netlab cannot set it up.
    pub fn up(name: &str, rate: &str) -> Self {
        Self::up_queue(name, rate, 2000)
    }

    /// A lab whose shaper queues at most `queue_ms` of traffic.
    ///
    /// # Panics
    /// If netlab cannot set it up.
    pub fn up_queue(name: &str, rate: &str, queue_ms: u32) -> Self {
        let _ = Command::new("bash")
            .arg(netlab())
            .args(["down", name])
            .output();
        let out = Command::new("bash")
            .arg(netlab())
            .args(["up", name, rate, "0", "0"])
            .env("NETLAB_QUEUE_MS", queue_ms.to_string())
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

    /// A setting netlab reports (`CLIENT_NS`, `SERVER_NS`, `SERVER_IP`, ...).
    ///
    /// # Panics
    /// For a key netlab does not report.
    pub fn get(&self, key: &str) -> &str {
        &self
            .env
            .iter()
            .find(|(k, _)| k == key)
            .expect("a netlab setting")
            .1
    }

    /// (tx_bytes, rx_bytes) of the client's interface.
    ///
    /// # Panics
    /// If netlab cannot say.
    pub fn client_counters(&self) -> (u64, u64) {
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

    /// `program` to run in the namespace `side` names (`CLIENT_NS`, `SERVER_NS`).
    pub fn exec(&self, side: &str, program: &Path) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", self.get(side)]).arg(program);
        command
    }

    /// `homing --config CONFIG` in the client's namespace (arguments to add).
    pub fn homing(&self, config: &Path) -> Command {
        let mut command = self.exec("CLIENT_NS", &binary("homing"));
        command.arg("--config").arg(config);
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

/// Runs a command to its end.
///
/// # Panics
/// If it cannot start.
pub fn run(command: &mut Command) -> Output {
    command.output().expect("the command runs")
}

/// A store server in the lab's server namespace and a client set up for it in
/// the client's.
#[derive(Debug)]
pub struct Rig {
    /// The directory everything lives in.
    pub home: tempfile::TempDir,
    /// The client's configuration directory.
    pub config: PathBuf,
    server: Child,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// A store with one account, served in the server's namespace, and a client
/// set up for it with `policy` as its only network policy (`policies/lab.toml`).
///
/// # Panics
/// If any step fails.
pub fn rig(lab: &Lab, policy: &str) -> Rig {
    let home = tempfile::tempdir().expect("the lab set-up");
    let store = home.path().join("store");
    let s = store.to_str().expect("the lab set-up");
    let server_ip = lab.get("SERVER_IP").to_string();
    homing_store(&["init", s, "--ip", &server_ip]);
    homing_store(&["account", "add", "laptop", "--store", s]);
    let prefix = home.path().join("laptop");
    let p = prefix.to_str().expect("the lab set-up");
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
        std::io::BufReader::new(server.stdout.take().expect("the lab set-up"))
            .read_line(&mut line)
            .expect("the lab set-up");
        assert!(line.starts_with("listening on"), "{line}");
    }
    let config = home.path().join("client");
    let init = run(lab.homing(&config).args(crate::init_args(
        &format!("{server_ip}:7473"),
        &server_ip,
        p,
    )));
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    std::fs::create_dir(config.join("policies")).expect("the lab set-up");
    std::fs::write(config.join("policies/lab.toml"), policy).expect("the lab set-up");
    Rig {
        home,
        config,
        server,
    }
}
