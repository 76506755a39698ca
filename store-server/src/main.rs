//! The `homing-store` binary: the store server at home.
//!
//! The server (TLS, accounts, quotas, object storage, retention) arrives with the
//! store-server issue. Until then this binary only answers `--help` and `--version`
//! and refuses every command with exit code 2, so that no script or service manager
//! mistakes it for a running store.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;

/// Homing's store server: keeps every account's sealed backups, which it cannot read.
#[derive(Debug, Parser)]
#[command(name = "homing-store", version, about, long_about = None)]
struct Cli {
    /// The command (init, ca, account, serve, check, retention).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    command: Vec<OsString>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let name = cli
        .command
        .first()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default();
    eprintln!(
        "homing-store: `homing-store {name}` is not implemented in this build yet \
         (the store server arrives in a later release); nothing was done"
    );
    ExitCode::from(2)
}
