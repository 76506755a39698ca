//! The `homing-store` binary: the store server's command line. It parses, runs a
//! command of the library and turns errors into messages and exit codes.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use homing_store::backend::LocalBackend;
use homing_store::ca::{Ca, ClientCredentials};
use homing_store::objects::{Account, ObjectStore};
use homing_store::retention::Policy;

/// Homing's store server: keeps every account's sealed backups, which it cannot read.
#[derive(Debug, Parser)]
#[command(name = "homing-store", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a store: directories, the CA, the server certificate.
    Init {
        /// The store directory (created).
        dir: PathBuf,
        /// A name laptops reach the store by (repeatable; localhost is always in).
        #[arg(long = "hostname", value_name = "NAME")]
        hostnames: Vec<String>,
        /// An address laptops reach the store by (repeatable; 127.0.0.1 is always in).
        #[arg(long = "ip", value_name = "ADDR")]
        ips: Vec<IpAddr>,
    },
    /// The certificate authority: issue, sign, revoke, list.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Accounts and quotas.
    #[command(subcommand)]
    Account(AccountCommand),
    /// Verify every object against the checksum taken when it was stored.
    Check {
        #[command(flatten)]
        store: StoreArg,
        /// Move damaged objects to quarantine, so that clients upload them again.
        #[arg(long)]
        repair: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve clients over TLS until SIGTERM or SIGINT.
    Serve {
        #[command(flatten)]
        store: StoreArg,
        /// Address to listen on; port 0 picks a free port (printed on start).
        #[arg(long, default_value = "0.0.0.0:7473")]
        listen: std::net::SocketAddr,
        /// Hours an object no kept snapshot needs waits before the hourly garbage
        /// collection deletes it: longer than the slowest laptop's upload takes.
        #[arg(long, default_value_t = 168)]
        gc_grace_hours: u64,
    },
    /// Retention policies: which snapshots an account keeps.
    #[command(subcommand)]
    Retention(RetentionCommand),
    /// Apply retention and delete what no kept snapshot needs (the server also
    /// does this by itself every hour).
    Gc {
        #[command(flatten)]
        store: StoreArg,
        /// Delete an unneeded object only when it was found unneeded this many
        /// hours before (an upload whose commit is on its way stays); 0 at once.
        #[arg(long, default_value_t = 168)]
        grace_hours: u64,
        /// Say what would be deleted; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum RetentionCommand {
    /// Keep the newest snapshot of each of the last N hours, days and weeks (0 for
    /// all three: keep everything). The head is always kept.
    Set {
        /// The account.
        account: String,
        #[command(flatten)]
        store: StoreArg,
        /// Hours to keep a snapshot of.
        #[arg(long, default_value_t = 0)]
        keep_hourly: u32,
        /// Days to keep a snapshot of.
        #[arg(long, default_value_t = 0)]
        keep_daily: u32,
        /// Weeks to keep a snapshot of.
        #[arg(long, default_value_t = 0)]
        keep_weekly: u32,
    },
    /// Show an account's policy.
    Show {
        /// The account.
        account: String,
        #[command(flatten)]
        store: StoreArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
struct StoreArg {
    /// The store directory.
    #[arg(long = "store", value_name = "DIR", env = "HOMING_STORE")]
    dir: PathBuf,
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Issue a key and certificate for an account (writes PREFIX.key, PREFIX.crt, PREFIX-ca.crt).
    Issue {
        /// The account (the certificate's common name).
        account: String,
        #[command(flatten)]
        store: StoreArg,
        /// Where to write the files: PREFIX.key, PREFIX.crt, PREFIX-ca.crt.
        #[arg(long, value_name = "PREFIX")]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 730)]
        days: u32,
    },
    /// Sign a laptop's certificate request (the key never leaves the laptop).
    Sign {
        /// The request (PEM).
        csr: PathBuf,
        /// The account the certificate is for (the request's own subject is ignored).
        #[arg(long)]
        account: String,
        #[command(flatten)]
        store: StoreArg,
        /// Where to write PREFIX.crt and PREFIX-ca.crt.
        #[arg(long, value_name = "PREFIX")]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 730)]
        days: u32,
    },
    /// Revoke every certificate of an account, or one by serial.
    Revoke {
        /// An account name or a serial number (hex).
        target: String,
        #[command(flatten)]
        store: StoreArg,
    },
    /// List issued certificates.
    List {
        #[command(flatten)]
        store: StoreArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AccountCommand {
    /// Create an account.
    Add {
        /// The account name (1-64 of lower-case letters, digits, '.', '_', '-'; not
        /// starting with '.').
        name: String,
        #[command(flatten)]
        store: StoreArg,
        /// Soft quota (warning), e.g. 400G; 0 for none.
        #[arg(long, default_value = "0", value_parser = parse_size)]
        soft: u64,
        /// Hard quota (refusal), e.g. 500G; 0 for none.
        #[arg(long, default_value = "0", value_parser = parse_size)]
        hard: u64,
    },
    /// List accounts with usage and quotas.
    List {
        #[command(flatten)]
        store: StoreArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one account.
    Info {
        /// The account.
        name: String,
        #[command(flatten)]
        store: StoreArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change an account's quotas.
    SetQuota {
        /// The account.
        name: String,
        #[command(flatten)]
        store: StoreArg,
        /// Soft quota, e.g. 400G; 0 for none.
        #[arg(long, value_parser = parse_size)]
        soft: Option<u64>,
        /// Hard quota, e.g. 500G; 0 for none.
        #[arg(long, value_parser = parse_size)]
        hard: Option<u64>,
    },
    /// Refuse new uploads for an account (its data stays).
    Disable {
        /// The account.
        name: String,
        #[command(flatten)]
        store: StoreArg,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    match run(cli.command) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("homing-store: error: {error}");
            for cause in error.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Init {
            dir,
            hostnames,
            ips,
        } => {
            if dir.join("index.redb").exists() || dir.join("ca").exists() {
                bail!(
                    "{} already holds a store; Homing never replaces one",
                    dir.display()
                );
            }
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            Ca::create(&dir, &hostnames, &ips)?;
            open_store(&dir)?;
            println!("Created a store in {}.", dir.display());
            println!(
                "Next: `homing-store account add NAME --store {}`",
                dir.display()
            );
            println!(
                "then: `homing-store ca issue NAME --store {} --out NAME`",
                dir.display()
            );
        }
        Command::Ca(command) => run_ca(command)?,
        Command::Account(command) => run_account(command)?,
        Command::Check {
            store,
            repair,
            json,
        } => {
            let report = open_store(&store.dir)?.check(repair)?;
            if json {
                let damaged: Vec<_> = report
                    .damaged
                    .iter()
                    .map(|d| serde_json::json!({"account": d.account, "id": d.id.to_string(), "problem": d.problem}))
                    .collect();
                let out = serde_json::json!({
                    "objects": report.objects,
                    "bytes": report.bytes,
                    "damaged": damaged,
                    "lost": report.lost.iter().map(|l| serde_json::json!({
                        "account": l.account,
                        "id": l.id.to_string(),
                        "snapshots": l.snapshots,
                    })).collect::<Vec<_>>(),
                    "unreferenced_bytes": report.unreferenced_bytes,
                    "repaired": report.repaired,
                });
                println!("{out}");
            } else {
                println!("checked {} objects, {} bytes", report.objects, report.bytes);
                for damage in &report.damaged {
                    println!(
                        "DAMAGED account {} object {}: {}",
                        damage.account, damage.id, damage.problem
                    );
                }
                for lost in &report.lost {
                    println!(
                        "LOST account {} object {}: needed by snapshots {:?}",
                        lost.account, lost.id, lost.snapshots
                    );
                }
                if report.unreferenced_bytes > 0 {
                    println!(
                        "{} bytes in segments belong to no object (interrupted writes, and objects garbage collection deleted from segments that compaction has not yet emptied)",
                        report.unreferenced_bytes
                    );
                }
                if report.repaired {
                    println!(
                        "moved {} damaged objects to quarantine; clients upload them again on their next backup",
                        report.damaged.len()
                    );
                }
            }
            if (!report.damaged.is_empty() && !report.repaired) || !report.lost.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Serve {
            store,
            listen,
            gc_grace_hours,
        } => serve(&store.dir, listen, gc_grace_hours.saturating_mul(3600))?,
        Command::Retention(RetentionCommand::Set {
            account,
            store,
            keep_hourly,
            keep_daily,
            keep_weekly,
        }) => {
            let policy = Policy {
                hourly: keep_hourly,
                daily: keep_daily,
                weekly: keep_weekly,
            };
            open_store(&store.dir)?.set_retention(&account, policy)?;
            if policy.keeps_all() {
                println!("Account {account} keeps every snapshot.");
            } else {
                println!(
                    "Account {account} keeps the newest snapshot of the last {keep_hourly} hours, \
                     {keep_daily} days and {keep_weekly} weeks (and always the newest). The server \
                     applies it within the hour; `homing-store gc` applies it now."
                );
            }
        }
        Command::Retention(RetentionCommand::Show {
            account,
            store,
            json,
        }) => {
            let policy = open_store(&store.dir)?.retention(&account)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "account": account,
                        "keep_hourly": policy.hourly,
                        "keep_daily": policy.daily,
                        "keep_weekly": policy.weekly,
                    })
                );
            } else if policy.keeps_all() {
                println!("{account}: keeps every snapshot");
            } else {
                println!(
                    "{account}: keep hourly {}, daily {}, weekly {}",
                    policy.hourly, policy.daily, policy.weekly
                );
            }
        }
        Command::Gc {
            store,
            grace_hours,
            dry_run,
            json,
        } => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            // Compaction appends to segments, which only the one process holding
            // serve.lock may do: a running server compacts by itself within the
            // hour. The lock is taken before the store is opened (where the store
            // learns the end of the newest segment) and held to the end.
            let lock = if dry_run {
                None
            } else {
                // None when held: a server runs (or another gc compacts).
                serve_lock(&store.dir)?
            };
            let objects = open_store(&store.dir)?;
            let report = objects.collect_garbage(now, grace_hours.saturating_mul(3600), dry_run)?;
            let compacted = match &lock {
                Some(_) => Some(objects.compact()?),
                None => None,
            };
            drop(lock);
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "dry_run": dry_run,
                        "snapshots_forgotten": report.snapshots_forgotten.iter()
                            .map(|(a, s)| serde_json::json!({"account": a, "sequence": s}))
                            .collect::<Vec<_>>(),
                        "objects_deleted": report.objects_deleted,
                        "bytes_freed": report.bytes_freed,
                        "objects_waiting": report.objects_waiting,
                        "segments_deleted": report.segments_deleted,
                        "segment_bytes_freed": report.segment_bytes_freed,
                        "compaction": compacted.as_ref().map(|c| serde_json::json!({
                            "segments_compacted": c.segments_compacted,
                            "objects_moved": c.objects_moved,
                            "bytes_moved": c.bytes_moved,
                            "segment_bytes_freed": c.segment_bytes_freed,
                            "damaged_left": c.damaged_left,
                        })),
                    })
                );
            } else {
                let verb = if dry_run { "would forget" } else { "forgot" };
                println!(
                    "{verb} {} snapshots; {} {} objects ({} bytes); {} unneeded objects wait \
                     for their grace period; {} segment files deleted ({} bytes on disk)",
                    report.snapshots_forgotten.len(),
                    if dry_run { "would delete" } else { "deleted" },
                    report.objects_deleted,
                    report.bytes_freed,
                    report.objects_waiting,
                    report.segments_deleted,
                    report.segment_bytes_freed,
                );
                match compacted {
                    Some(c) => {
                        println!(
                            "compacted {} segment files: moved {} live objects ({} bytes), \
                             {} bytes on disk given back",
                            c.segments_compacted,
                            c.objects_moved,
                            c.bytes_moved,
                            c.segment_bytes_freed
                        );
                        if c.damaged_left > 0 {
                            println!(
                                "{} damaged objects were left in place; run `homing-store \
                                 check --store {}` to see which",
                                c.damaged_left,
                                store.dir.display()
                            );
                        }
                    }
                    None if !dry_run => println!(
                        "a server runs on this store: it compacts segment files by itself \
                         within the hour"
                    ),
                    None => {}
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Takes `<store>/serve.lock` (created if missing, never removed) without waiting:
/// whoever holds it is the one process that appends to segments. The inner error
/// says another process holds it.
fn serve_lock(dir: &Path) -> anyhow::Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    let lock_path = dir.join("serve.lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    match nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => bail!("cannot lock {}: {errno}", lock_path.display()),
    }
}

fn serve(dir: &Path, listen: std::net::SocketAddr, gc_grace: u64) -> anyhow::Result<()> {
    let store = open_store(dir)?;
    // One server per store: two would append to the same segment, each believing
    // it knows where the segment ends. The lock goes when the process does.
    let _lock = serve_lock(dir)?.ok_or_else(|| {
        anyhow::anyhow!(
            "another process holds {}: another `homing-store serve` on this store (stop it \
             first), or a `homing-store gc` compacting it (wait for it to end)",
            dir.join("serve.lock").display()
        )
    })?;
    let server =
        std::sync::Arc::new(homing_store::server::Server::new(dir, store)?.with_gc_grace(gc_grace));
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let address = listener.local_addr()?;
        // Scripts and tests read this line to learn the port.
        println!("listening on {address}");
        use std::io::Write;
        std::io::stdout().flush()?;
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing a SIGTERM handler cannot fail at start-up");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        };
        server.serve(listener, shutdown).await?;
        anyhow::Ok(())
    })
}

fn run_ca(command: CaCommand) -> anyhow::Result<()> {
    match command {
        CaCommand::Issue {
            account,
            store,
            out,
            days,
        } => {
            let credentials = Ca::open(&store.dir)?.issue(&account, days)?;
            write_credentials(&out, &credentials)?;
            println!(
                "Issued certificate {} for account {account}.",
                credentials.serial
            );
        }
        CaCommand::Sign {
            csr,
            account,
            store,
            out,
            days,
        } => {
            let request = std::fs::read_to_string(&csr)
                .with_context(|| format!("cannot read {}", csr.display()))?;
            let credentials = Ca::open(&store.dir)?.sign_request(&request, &account, days)?;
            write_credentials(&out, &credentials)?;
            println!(
                "Signed certificate {} for account {account}.",
                credentials.serial
            );
        }
        CaCommand::Revoke { target, store } => {
            let revoked = Ca::open(&store.dir)?.revoke(&target)?;
            if revoked.is_empty() {
                println!("Nothing to do: every certificate of {target} was revoked already.");
            }
            for serial in revoked {
                println!("Revoked certificate {serial}.");
            }
        }
        CaCommand::List { store, json } => {
            let issued = Ca::open(&store.dir)?.issued()?;
            if json {
                let rows: Vec<_> = issued
                    .iter()
                    .map(|i| serde_json::json!({"serial": i.serial, "account": i.account, "not_after": i.not_after, "revoked": i.revoked}))
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
            } else {
                println!(
                    "{:<34} {:<20} {:>12} revoked",
                    "serial", "account", "not after"
                );
                for i in issued {
                    println!(
                        "{:<34} {:<20} {:>12} {}",
                        i.serial,
                        i.account,
                        i.not_after,
                        if i.revoked { "yes" } else { "no" }
                    );
                }
            }
        }
    }
    Ok(())
}

fn run_account(command: AccountCommand) -> anyhow::Result<()> {
    match command {
        AccountCommand::Add {
            name,
            store,
            soft,
            hard,
        } => {
            open_store(&store.dir)?.add_account(&name, soft, hard)?;
            println!("Created account {name}.");
        }
        AccountCommand::List { store, json } => {
            let accounts = open_store(&store.dir)?.accounts()?;
            if json {
                let rows: Vec<_> = accounts.iter().map(|(n, a)| account_json(n, a)).collect();
                println!("{}", serde_json::Value::Array(rows));
            } else {
                println!(
                    "{:<20} {:>14} {:>10} {:>14} {:>14} state",
                    "account", "used", "objects", "soft", "hard"
                );
                for (name, a) in accounts {
                    println!(
                        "{:<20} {:>14} {:>10} {:>14} {:>14} {}",
                        name,
                        a.used,
                        a.objects,
                        a.soft_limit,
                        a.hard_limit,
                        if a.disabled { "disabled" } else { "active" }
                    );
                }
            }
        }
        AccountCommand::Info { name, store, json } => {
            let objects = open_store(&store.dir)?;
            let account = objects.account(&name)?;
            let snapshots = objects.snapshot_count(&name)?;
            let head = objects.head(&name)?;
            if json {
                let mut value = account_json(&name, &account);
                value["snapshots"] = snapshots.into();
                value["head"] = head.map(|h| h.to_string()).into();
                println!("{value}");
            } else {
                println!(
                    "account:  {name}{}",
                    if account.disabled { " (disabled)" } else { "" }
                );
                println!(
                    "used:     {} bytes in {} objects",
                    account.used, account.objects
                );
                println!(
                    "snapshots: {snapshots}, head {}",
                    head.map_or_else(|| "none".to_string(), |h| h.to_string())
                );
                println!("soft:     {}", limit(account.soft_limit));
                println!("hard:     {}", limit(account.hard_limit));
                if account.soft_limit > 0 && account.used > account.soft_limit {
                    println!("warning:  over the soft quota");
                }
            }
        }
        AccountCommand::SetQuota {
            name,
            store,
            soft,
            hard,
        } => {
            let account = open_store(&store.dir)?.update_account(&name, |a| {
                a.soft_limit = soft.unwrap_or(a.soft_limit);
                a.hard_limit = hard.unwrap_or(a.hard_limit);
            })?;
            println!(
                "Account {name}: soft {}, hard {}.",
                limit(account.soft_limit),
                limit(account.hard_limit)
            );
        }
        AccountCommand::Disable { name, store } => {
            open_store(&store.dir)?.update_account(&name, |a| a.disabled = true)?;
            println!("Account {name} is disabled: new uploads are refused; its data stays.");
        }
    }
    Ok(())
}

fn open_store(dir: &Path) -> anyhow::Result<ObjectStore<LocalBackend>> {
    if !dir.join("ca").exists() {
        bail!(
            "{} is not a store (no ca/ in it); create one with `homing-store init DIR`",
            dir.display()
        );
    }
    let backend = LocalBackend::open(&dir.join("segments"))
        .with_context(|| format!("cannot open the segments of {}", dir.display()))?;
    Ok(ObjectStore::open(dir, backend)?)
}

fn write_credentials(prefix: &Path, credentials: &ClientCredentials) -> anyhow::Result<()> {
    let with = |suffix: &str| {
        let mut name = prefix.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };
    if let Some(key) = &credentials.key_pem {
        write_new(&with(".key"), key, 0o600)?;
    }
    write_new(&with(".crt"), &credentials.cert_pem, 0o644)?;
    write_new(&with("-ca.crt"), &credentials.ca_pem, 0o644)?;
    Ok(())
}

fn write_new(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot create {} (it must not exist yet)", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn account_json(name: &str, a: &Account) -> serde_json::Value {
    serde_json::json!({
        "account": name,
        "used": a.used,
        "objects": a.objects,
        "soft_limit": a.soft_limit,
        "hard_limit": a.hard_limit,
        "disabled": a.disabled,
    })
}

fn limit(bytes: u64) -> String {
    if bytes == 0 {
        "none".to_string()
    } else {
        format!("{bytes} bytes")
    }
}

/// Sizes: a number with an optional K, M, G or T (powers of 1024).
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 500G"))?;
    let factor: u64 = match unit.to_ascii_uppercase().trim_end_matches(['B', 'I']) {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use K, M, G or T)"
            ));
        }
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))
}
