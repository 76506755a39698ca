//! End-to-end tests: the real binaries, started as a user would start them.
//!
//! One test binary with one module per area (as ripgrep and rustic do), so that
//! the workspace links one executable for all of them.

mod backup;
mod key;
mod link;
mod policy;
mod serve;
mod service;
mod store;
mod unimplemented;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use homing_e2e::{binary, homing_store};

/// Runs `homing` with `--config DIR` and the arguments, with no terminal on stdin.
fn homing<S: AsRef<std::ffi::OsStr>>(config: &Path, args: &[S]) -> Output {
    homing_with_stdin(config, args, "")
}

fn homing_with_stdin<S: AsRef<std::ffi::OsStr>>(config: &Path, args: &[S], stdin: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(binary("homing"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("HOMING_CONFIG")
        .env_remove("HOMING_STATE")
        .env_remove("HOMING_PASSPHRASE_FILE")
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("homing starts");
    let written = child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(stdin.as_bytes());
    // A command that refuses early exits without reading its input: not an error here.
    if let Err(error) = written {
        assert_eq!(error.kind(), std::io::ErrorKind::BrokenPipe, "{error}");
    }
    child.wait_with_output().expect("homing runs to the end")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Asserts success and returns stdout, showing stderr if it failed.
fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}\n{}",
        output.status,
        stderr(&output)
    );
    stdout(&output)
}

/// Starts `homing-store serve` on a free loopback port with the log level given,
/// its log going to `log` (or the test's stderr); returns it and its address.
fn serve(
    store: &Path,
    log_level: &str,
    log: Option<std::fs::File>,
) -> (std::process::Child, std::net::SocketAddr) {
    use std::io::{BufRead, BufReader};
    let mut command = Command::new(binary("homing-store"));
    command
        .args(["serve", "--store"])
        .arg(store)
        .args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", log_level)
        .stdout(Stdio::piped());
    if let Some(log) = log {
        command.stderr(log);
    }
    let mut child = command.spawn().expect("homing-store serve starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout is piped"))
        .read_line(&mut line)
        .expect("the server says where it listens");
    let address = line
        .trim()
        .strip_prefix("listening on ")
        .expect("listening on ADDR")
        .parse()
        .expect("an address");
    (child, address)
}
