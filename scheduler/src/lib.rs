//! Homing's client: the `homing` command and, in a later issue, the daemon.
//!
//! # Layout
//!
//! - [`cli`]: the command line (clap);
//! - [`paths`]: where configuration and state live (XDG directories, `--config`);
//! - [`config`]: `config.toml`: the store, the spool, the backup sets;
//! - [`key`]: `homing key ...`, the master key's life: generate, export to paper,
//!   import from paper, fingerprint;
//! - [`setup`]: `homing init` and `homing quickstart`;
//! - [`state`]: the local redb database: index, spool, known ids, newest head;
//! - [`tree`]: trees, chunk lists and manifests (the plaintext of snapshots);
//! - [`backup`]: scan, seal into the spool, upload, commit;
//! - [`restore`]: snapshots, ls, restore, verify;
//! - [`report`]: `homing report`, cap reports per network;
//! - [`remote`]: the connection to the store and the rollback checks;
//! - [`daemon`]: `homing daemon` and its control socket (`status`, `pause`,
//!   `resume`, `backup-now`);
//! - [`commands`]: the commands that talk to the store, as the CLI runs them;
//! - [`policy`]: `homing policy check`, network policies through `homing-policy`;
//! - [`logging`]: tracing set-up for the binary.
//!
//! Unknown commands are refused with a clear message and exit code 2, so that a
//! script never mistakes them for having worked.

/// Whether the set-up's messages (`init`, a new key's paper form, `quickstart`'s
/// steps) go to stderr instead of stdout: under `quickstart --json`, whose stdout
/// is the backup's JSON.
pub(crate) static MESSAGES_TO_STDERR: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// `println!` for the set-up's messages, which go to stderr where
/// [`MESSAGES_TO_STDERR`] says so.
macro_rules! say {
    ($($arg:tt)*) => {
        if $crate::MESSAGES_TO_STDERR.load(std::sync::atomic::Ordering::Relaxed) {
            eprintln!($($arg)*)
        } else {
            println!($($arg)*)
        }
    };
}

pub mod backup;
pub mod cli;
pub mod commands;
pub mod config;
pub mod daemon;
pub mod key;
pub mod ledger;
pub mod logging;
pub mod network;
pub mod paths;
pub mod policy;
pub mod remote;
pub mod report;
pub mod restore;
pub mod setup;
pub mod spool;
pub mod state;
pub mod tree;

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
        Command::Init(args) => setup::init(&paths, args),
        Command::Enroll(args) => setup::enroll(&paths, &args),
        Command::Quickstart(args) => setup::quickstart(&paths, &args),
        Command::Backup(args) => commands::backup(&paths, &args),
        Command::Snapshots(args) => commands::snapshots(&paths, &args),
        Command::Ls(args) => commands::ls(&paths, &args),
        Command::Restore(args) => commands::restore(&paths, &args),
        Command::Verify(args) => commands::verify(&paths, &args),
        Command::Key(command) => key::run(&paths, command).map(|()| ExitCode::SUCCESS),
        Command::Policy(command) => policy::run(&paths, &command),
        Command::ForgetSet { name } => setup::forget_set(&paths, &name),
        Command::Report { days, json } => report::run(&paths, days, json),
        Command::Daemon {
            interval_minutes,
            unlock,
        } => daemon::run(
            &paths,
            std::time::Duration::from_secs(interval_minutes.max(1) * 60),
            unlock.passphrase_file.as_deref(),
        ),
        Command::Status { json } => daemon::control(&paths, "status", json),
        Command::Pause => daemon::control(&paths, "pause", false),
        Command::Resume => daemon::control(&paths, "resume", false),
        Command::BackupNow => daemon::control(&paths, "backup-now", false),
        Command::Other(words) => Ok(unavailable(&words)),
    }
}

fn unavailable(words: &[std::ffi::OsString]) -> ExitCode {
    let name = words
        .first()
        .map(|w| w.to_string_lossy().into_owned())
        .unwrap_or_default();
    eprintln!("homing: unknown command `{name}`; see `homing --help`");
    ExitCode::from(EXIT_UNAVAILABLE)
}
