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
    /// Set up this client: store address and certificates, a new master key.
    Init(InitArgs),
    /// Finish an air-gapped set-up: install the certificate the store's CA signed.
    Enroll(EnrollArgs),
    /// Try Homing on this machine: a store server on loopback, a client, a first
    /// backup of PATH.
    Quickstart(QuickstartArgs),
    /// Back up the configured sets (or one set, or the paths given).
    Backup(BackupArgs),
    /// List the store's snapshots.
    Snapshots(SnapshotsArgs),
    /// List the files of a snapshot.
    Ls(LsArgs),
    /// Restore a snapshot, or a path of it, under a target directory.
    Restore(RestoreArgs),
    /// Check that a snapshot is complete in the store; --read-data fetches and
    /// authenticates every object.
    Verify(VerifyArgs),
    /// Stop carrying a backup set in new snapshots (after it was removed from the
    /// configuration); retention then frees its data.
    ForgetSet {
        /// The set.
        name: String,
    },
    /// Run in the background: back up every set on a schedule and when the link
    /// changes, as each network's policy allows.
    Daemon {
        /// Minutes between scheduled runs.
        #[arg(long, default_value_t = 60)]
        interval_minutes: u64,
        /// Unlocking the key (the daemon cannot ask).
        #[command(flatten)]
        unlock: Unlock,
    },
    /// What the daemon is doing.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ask the daemon to stop uploading until `homing resume`.
    Pause,
    /// Ask the daemon to go on (and run now).
    Resume,
    /// Ask the daemon to run now.
    BackupNow,
    /// Cap reports: per network, the cap, what was spent, what is queued and
    /// when it drains, and the last days' traffic.
    Report {
        /// Days of history.
        #[arg(long, default_value_t = 14)]
        days: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Network policies: check files, explain which applies now.
    #[command(subcommand)]
    Policy(PolicyCommand),
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

/// How to unlock an existing key file.
#[derive(Debug, Clone, Args)]
pub struct Unlock {
    /// File holding the key file's passphrase (first line).
    #[arg(long, value_name = "FILE", env = "HOMING_PASSPHRASE_FILE")]
    pub passphrase_file: Option<PathBuf>,
}

/// `homing init`
#[derive(Debug, Args)]
pub struct InitArgs {
    /// The store server, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub store: String,
    /// The name in the store's certificate (default: HOST).
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,
    /// The store's CA certificate (from `homing-store ca issue`: PREFIX-ca.crt).
    #[arg(long, value_name = "FILE", required_unless_present = "csr")]
    pub ca: Option<PathBuf>,
    /// This client's certificate (PREFIX.crt).
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "csr",
        conflicts_with = "csr"
    )]
    pub cert: Option<PathBuf>,
    /// This client's private key (PREFIX.key).
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "csr",
        conflicts_with = "csr"
    )]
    pub key: Option<PathBuf>,
    /// Air-gapped set-up: make this client's key here and write a certificate
    /// request to OUT for the store's CA to sign (`homing-store ca sign`); the key
    /// never leaves this machine. Finish with `homing enroll`.
    #[arg(long, value_name = "OUT")]
    pub csr: Option<PathBuf>,
    /// Create a backup set `default` with these paths.
    #[arg(long = "backup", value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// How the new key file is protected.
    #[command(flatten)]
    pub passphrase: NewPassphrase,
}

/// `homing quickstart`
#[derive(Debug, Args)]
pub struct QuickstartArgs {
    /// What to back up.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// The store directory (default: the XDG data directory's homing/quickstart-store).
    #[arg(long, value_name = "DIR")]
    pub store_dir: Option<PathBuf>,
    /// The loopback port of the store server.
    #[arg(long, default_value_t = 7473)]
    pub port: u16,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `homing backup`
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// Only this set (with PATHs: the name of the set they form, default `default`).
    #[arg(long, value_name = "NAME")]
    pub set: Option<String>,
    /// Back up these paths instead of the configured sets.
    #[arg(value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Unlocking the key.
    #[command(flatten)]
    pub unlock: Unlock,
}

/// `homing snapshots`
#[derive(Debug, Args)]
pub struct SnapshotsArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Unlocking the key.
    #[command(flatten)]
    pub unlock: Unlock,
}

/// `homing ls`
#[derive(Debug, Args)]
pub struct LsArgs {
    /// The snapshot: its id, a unique prefix of it, or `latest`.
    pub snapshot: String,
    /// Only below this path (absolute, as backed up).
    pub path: Option<PathBuf>,
    /// The backup set to read (default: the one the snapshot was made of; a
    /// snapshot also holds the other sets as last backed up).
    #[arg(long, value_name = "NAME")]
    pub set: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Unlocking the key.
    #[command(flatten)]
    pub unlock: Unlock,
}

/// `homing restore`
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The snapshot: its id, a unique prefix of it, or `latest`.
    pub snapshot: String,
    /// Only this path (absolute, as backed up).
    pub path: Option<PathBuf>,
    /// Where to restore; paths keep their layout below it.
    #[arg(long, value_name = "DIR")]
    pub target: PathBuf,
    /// The backup set to read (default: the one the snapshot was made of; a
    /// snapshot also holds the other sets as last backed up).
    #[arg(long, value_name = "NAME")]
    pub set: Option<String>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Unlocking the key.
    #[command(flatten)]
    pub unlock: Unlock,
}

/// `homing verify`
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The snapshot (default: latest).
    #[arg(default_value = "latest")]
    pub snapshot: String,
    /// Fetch and authenticate every object, not only check that it is stored.
    #[arg(long)]
    pub read_data: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Unlocking the key.
    #[command(flatten)]
    pub unlock: Unlock,
}

/// `homing enroll`
#[derive(Debug, Args)]
pub struct EnrollArgs {
    /// The certificate the store's CA signed (PREFIX.crt from `homing-store ca sign`).
    #[arg(long, value_name = "FILE")]
    pub cert: PathBuf,
    /// The store's CA certificate (PREFIX-ca.crt), unless `init` was given it.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

/// `homing policy ...`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Print a line whenever the link to the store or its policy changes (until
    /// interrupted): what the daemon sees.
    Watch,
    /// Say which policy applies to the link to the store now, why, and what it
    /// allows each priority class.
    Explain {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check policy files (all of them together, as the daemon loads them); exits
    /// non-zero naming every bad one with its line and column.
    Check {
        /// Policy files.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}
