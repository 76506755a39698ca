//! Homing's client: the `homing` command and, in later issues, the daemon.
//!
//! # Layout
//!
//! - [`cli`]: the command line (clap);
//! - [`paths`]: where configuration and state live (XDG directories, `--config`);
//! - [`key`]: `homing key ...`, the master key's life: generate, export to paper,
//!   import from paper, fingerprint;
//! - [`logging`]: tracing set-up for the binary.
//!
//! Commands that later issues bring (`init`, `backup`, `restore`, `daemon`, ...)
//! are recognised and refused with a clear message and exit code 2, so that a
//! script never mistakes them for having worked.

pub mod cli;
pub mod key;
pub mod logging;
pub mod paths;

use std::process::ExitCode;

use cli::{Cli, Command};

/// Exit code for a command this build does not implement yet (and usage errors).
pub const EXIT_UNAVAILABLE: u8 = 2;

/// Runs a parsed command line.
///
/// # Errors
/// Whatever the command fails with, with context for the user.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let paths = paths::Paths::resolve(cli.config.as_deref())?;
    match cli.command {
        Command::Key(command) => key::run(&paths, command).map(|()| ExitCode::SUCCESS),
        Command::Other(words) => Ok(unavailable(&words)),
    }
}

/// Commands that later issues implement.
const PLANNED: &[(&str, &str)] = &[
    (
        "init",
        "set up a client (config, master key, store certificates)",
    ),
    (
        "enroll",
        "finish an air-gapped set-up with a signed certificate",
    ),
    ("backup", "back up the configured sets"),
    ("snapshots", "list snapshots"),
    ("ls", "list the files of a snapshot"),
    ("restore", "restore files from a snapshot"),
    ("verify", "verify snapshots against the store"),
    (
        "daemon",
        "run the scheduler, network watcher and release loop",
    ),
    ("status", "show what the daemon is doing"),
    ("pause", "pause uploads"),
    ("resume", "resume uploads"),
    ("backup-now", "ask the daemon for a backup now"),
    ("policy", "check and explain network policies"),
    ("report", "cap reports per network"),
];

fn unavailable(words: &[std::ffi::OsString]) -> ExitCode {
    let name = words
        .first()
        .map(|w| w.to_string_lossy().into_owned())
        .unwrap_or_default();
    match PLANNED.iter().find(|(planned, _)| *planned == name) {
        Some((_, what)) => eprintln!(
            "homing: `homing {name}` ({what}) is not implemented in this build yet; nothing was done"
        ),
        None => eprintln!("homing: unknown command `{name}`; see `homing --help`"),
    }
    ExitCode::from(EXIT_UNAVAILABLE)
}
