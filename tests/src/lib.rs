//! End-to-end tests for Homing: they start the real `homing` and `homing-store`
//! binaries, as a user would, and check what comes out. The tests are in
//! `tests/tests/e2e.rs` (one binary, one module per area); this library finds the
//! binaries and sets up the network lab ([`lab`]) that the link tests and the
//! daemon bench share, and a private D-Bus with a fake NetworkManager ([`dbus`]).
//!
//! `cargo test` does not build the executables of other packages, so the first
//! call of [`binary`] runs `cargo build` for them, in the profile the tests run in.
//! When they are up to date that takes a fraction of a second.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

pub mod dbus;
pub mod lab;

/// The binaries the end-to-end tests start, and their packages.
const PACKAGES: &[&str] = &["homing", "homing-store"];

/// The path of a binary of the workspace, built (once per test run) if need be.
///
/// # Panics
/// If the build fails: the tests cannot run without the binaries.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(build);
    dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
}

fn build() -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    // target/<profile>/deps/<test binary> → target/<profile>
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binaries live in target/<profile>/deps")
        .to_path_buf();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .arg("build")
        .arg("--locked")
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if dir.file_name().is_some_and(|n| n == "release") {
        command.arg("--release");
    }
    for package in PACKAGES {
        command.args(["-p", package]);
    }
    let status = command.status().expect("cargo runs");
    assert!(
        status.success(),
        "building {PACKAGES:?} for the end-to-end tests failed"
    );
    dir
}

/// The arguments of `homing init` for a client of the store at `address` (whose
/// certificate names `server_name`) with the files `homing-store ca issue ...
/// --out PREFIX` wrote, and a key without a passphrase.
pub fn init_args(address: &str, server_name: &str, prefix: &str) -> Vec<String> {
    [
        "init",
        "--store",
        address,
        "--server-name",
        server_name,
        "--ca",
        &format!("{prefix}-ca.crt"),
        "--cert",
        &format!("{prefix}.crt"),
        "--key",
        &format!("{prefix}.key"),
        "--no-passphrase",
    ]
    .map(String::from)
    .to_vec()
}

/// Runs `homing-store` with the arguments; requires success and returns stdout.
///
/// # Panics
/// If it cannot start or fails (with its stderr).
pub fn homing_store(args: &[&str]) -> String {
    let out = Command::new(binary("homing-store"))
        .args(args)
        .env_remove("HOMING_STORE")
        .output()
        .expect("homing-store runs");
    assert!(
        out.status.success(),
        "homing-store {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
