//! The command line of `homing`.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Homing backs up roaming laptops to a store server at home, over whatever link
/// the laptop has, within each network's budget.
#[derive(Debug, Parser)]
#[command(name = "homing", version, about, long_about = None)]
pub struct Cli {
    /// Configuration directory (default: $XDG_CONFIG_HOME/homing, ~/.config/homing).
    #[arg(long, global = true, value_name = "DIR", env = "HOMING_CONFIG")]
    pub config: Option<PathBuf>,
    /// More log output (-v: debug, -vv: trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage the master key: generate, export to paper, import, fingerprint.
    #[command(subcommand)]
    Key(KeyCommand),
    /// A command of a later release (init, backup, restore, ...): refused with exit code 2.
    #[command(external_subcommand)]
    Other(Vec<OsString>),
}

/// `homing key ...`
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a new master key in the configuration directory and print its paper form.
    Generate {
        /// How the key file is protected.
        #[command(flatten)]
        passphrase: NewPassphrase,
        /// Argon2id memory in MiB for the passphrase; lower it only on small machines.
        #[arg(long, value_name = "MIB", default_value_t = 64)]
        kdf_memory_mib: u32,
        /// Argon2id passes for the passphrase.
        #[arg(long, value_name = "N", default_value_t = 3)]
        kdf_passes: u32,
    },
    /// Print the paper form of the master key, to write down and keep safe.
    Export {
        /// File holding the key file's passphrase (first line).
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Recreate the key file from its paper form (read from standard input or --from).
    Import {
        /// Read the paper form from this file instead of standard input.
        #[arg(long, value_name = "FILE")]
        from: Option<PathBuf>,
        /// How the new key file is protected.
        #[command(flatten)]
        passphrase: NewPassphrase,
    },
    /// Print the master key's public fingerprint.
    Fingerprint {
        /// File holding the key file's passphrase (first line).
        #[arg(long, value_name = "FILE")]
        passphrase_file: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// How a new key file is protected. Without either flag, an interactive run asks.
#[derive(Debug, Args)]
#[group(multiple = false)]
pub struct NewPassphrase {
    /// Wrap the key with the passphrase in this file (first line).
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// Write the key unwrapped, protected by file mode 0600 only.
    #[arg(long)]
    pub no_passphrase: bool,
}
