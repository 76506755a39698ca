//! The commands that talk to the store: backup, snapshots, ls, restore, verify.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};

use crate::backup::{self, Run, Summary};
use crate::cli::{BackupArgs, LsArgs, RestoreArgs, SnapshotsArgs, Unlock, VerifyArgs};
use crate::config::{BackupSet, Config, Priority, check_set_name};
use crate::key;
use crate::ledger::LedgerMeter;
use crate::paths::Paths;
use crate::policy;
use crate::remote::{Remote, StoreUnreachable};
use crate::restore;
use crate::state;
use homing_transfer::stream::Rate;

/// Everything a command that talks to the store needs.
struct Session {
    keys: homing_crypto::KeyRing,
    db: redb::Database,
    remote: Remote,
}

fn session(paths: &Paths, unlock: &Unlock) -> anyhow::Result<Session> {
    let config = Config::load(&paths.config)?;
    let master = key::load(&paths.key_file(), unlock.passphrase_file.as_deref())?;
    let keys = master.key_ring();
    drop(master);
    let db = state::open(&paths.state)?;
    let remote = Remote::connect(&config.store)?;
    Ok(Session { keys, db, remote })
}

/// A session and the snapshot `spec` names in it.
fn session_at(
    paths: &Paths,
    unlock: &Unlock,
    spec: &str,
) -> anyhow::Result<(Session, homing_crypto::ObjectId, crate::tree::Manifest)> {
    let mut session = session(paths, unlock)?;
    let (id, manifest) = restore::resolve(&mut session.remote, &session.keys, &session.db, spec)?;
    Ok((session, id, manifest))
}

/// Exit code of a run that finished but left something out (unreadable files,
/// failed restores, verification problems).
pub const EXIT_INCOMPLETE: u8 = 3;

/// `homing backup`
///
/// # Errors
/// See [`backup::backup`].
pub fn backup(paths: &Paths, args: &BackupArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&paths.config)?;
    let master = key::load(&paths.key_file(), args.unlock.passphrase_file.as_deref())?;
    let keys = master.key_ring();
    drop(master);
    let db = std::sync::Arc::new(state::open(&paths.state)?);
    let sets: Vec<BackupSet> = if args.paths.is_empty() {
        let sets: Vec<BackupSet> = config
            .sets
            .iter()
            .filter(|s| args.set.as_deref().is_none_or(|n| n == s.name))
            .cloned()
            .collect();
        if sets.is_empty() {
            match &args.set {
                Some(name) => bail!("no backup set `{name}` in the configuration"),
                None => bail!(
                    "no backup sets configured: name paths (`homing backup PATH ...`) or add \
                     a [[set]] to {}",
                    paths.config.join(crate::config::FILE_NAME).display()
                ),
            }
        }
        sets
    } else {
        let name = args.set.clone().unwrap_or_else(|| "default".into());
        check_set_name(&name)?;
        let configured = config.sets.iter().find(|s| s.name == name);
        let mut absolute = Vec::new();
        for path in &args.paths {
            absolute.push(
                std::path::absolute(path)
                    .with_context(|| format!("cannot resolve {}", path.display()))?,
            );
        }
        vec![BackupSet {
            name,
            paths: absolute,
            exclude: configured.map(|s| s.exclude.clone()).unwrap_or_default(),
            priority: configured.map_or(Priority::Normal, |s| s.priority),
            one_file_system: configured.is_some_and(|s| s.one_file_system),
            exclude_caches: configured.is_none_or(|s| s.exclude_caches),
        }]
    };
    let progress = !args.json && std::io::stderr().is_terminal();
    let plan = policy::plan(paths, &config.store.address)?;
    let client = Client {
        paths,
        config: &config,
        keys: &keys,
        db: &db,
    };
    let outcomes = backup_sets(&client, &plan, &sets, progress, None)?;
    let mut summaries: Vec<&Summary> = Vec::new();
    let (mut failed, mut waiting) = (0, 0);
    for outcome in &outcomes {
        match &outcome.result {
            SetResult::Done(summary) => {
                if !args.json {
                    print!("{}", summary.to_text());
                }
                summaries.push(summary);
            }
            SetResult::Queued { why, summary } => {
                eprintln!("homing: set `{}` is not uploaded now: {why}", outcome.set);
                waiting += 1;
                if let Some(summary) = summary {
                    if !args.json {
                        print!("{}", summary.to_text());
                    }
                    summaries.push(summary);
                }
            }
            SetResult::Failed(error) => {
                eprintln!(
                    "homing: error: backup of set `{}` failed: {error}",
                    outcome.set
                );
                failed += 1;
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summaries)?);
    }
    if failed > 0 {
        bail!("{failed} of {} backup sets failed (see above)", sets.len());
    }
    let incomplete = waiting > 0 || summaries.iter().any(|s| s.unreadable > 0 || s.queued);
    Ok(if incomplete {
        ExitCode::from(EXIT_INCOMPLETE)
    } else {
        ExitCode::SUCCESS
    })
}

/// How one set's backup ended.
#[derive(Debug, serde::Serialize)]
pub struct SetOutcome {
    /// The set.
    pub set: String,
    /// What happened.
    pub result: SetResult,
}

/// What happened to a set.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SetResult {
    /// Backed up and committed.
    Done(Summary),
    /// Sealed into the spool (all or part of it) and not committed: the link's
    /// policy or budget, or the store's absence, stopped the upload.
    Queued {
        /// Why.
        why: String,
        /// The scan's figures, when the scan ran to the end.
        summary: Option<Summary>,
    },
    /// Failed (the others went on).
    Failed(String),
}

/// What a backup run works with: where things are, the configuration, the keys
/// and the state.
#[derive(Clone, Copy)]
pub struct Client<'a> {
    /// Configuration and state directories.
    pub paths: &'a Paths,
    /// The configuration.
    pub config: &'a Config,
    /// The owner's keys.
    pub keys: &'a homing_crypto::KeyRing,
    /// The state database.
    pub db: &'a std::sync::Arc<redb::Database>,
}

/// Backs up `sets` as the link's policy allows: the engine of `homing backup` and
/// of the daemon's runs.
///
/// # Errors
/// Bad policy files and database errors; a set's own failure is its outcome.
pub fn backup_sets(
    client: &Client<'_>,
    plan: &policy::Plan,
    sets: &[BackupSet],
    progress: bool,
    stop: Option<&std::sync::Arc<std::sync::atomic::AtomicBool>>,
) -> anyhow::Result<Vec<SetOutcome>> {
    let Client {
        paths,
        config,
        keys,
        db,
    } = *client;
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    // The link's policy (`plan`): which sets may upload now, at which rate,
    // charged to which network's ledger.
    let now = jiff::Timestamp::now();
    let battery = policy::on_battery();
    let decisions: Vec<homing_policy::Decision> = sets
        .iter()
        .map(|set| decide_for(plan, db, set.priority, now, battery))
        .collect::<anyhow::Result<_>>()?;
    let mut remote = None;
    let mut unreachable = None;
    // Ends the rate follower when the sets are done.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _done = SetOnDrop(std::sync::Arc::clone(&done));
    if decisions.iter().any(|d| d.send) {
        let rate = decisions
            .iter()
            .filter(|d| d.send)
            .find_map(|d| d.rate)
            .and_then(|r| std::num::NonZeroU32::new(u32::try_from(r).unwrap_or(u32::MAX)))
            .map_or_else(Rate::unlimited, Rate::limited);
        if let Some(policy) = &plan.policy {
            follow_rate(policy.clone(), rate.clone(), std::sync::Arc::clone(&done));
        }
        let meter: std::sync::Arc<dyn homing_transfer::stream::Meter> = match &plan.policy {
            Some(policy) => std::sync::Arc::new(LedgerMeter::new(
                std::sync::Arc::clone(db),
                &plan.network,
                policy.clone(),
            )?),
            None => std::sync::Arc::new(homing_transfer::stream::Unmetered),
        };
        // The daemon stops an upload at its next write when the link changes.
        let meter: std::sync::Arc<dyn homing_transfer::stream::Meter> = match stop {
            Some(stop) => std::sync::Arc::new(Stoppable {
                inner: meter,
                stop: std::sync::Arc::clone(stop),
            }),
            None => meter,
        };
        // Under a cap, the kernel may hold only a little of what was charged.
        let send_buffer = plan
            .policy
            .as_ref()
            .and_then(|p| p.budget.as_ref())
            .map(|_| SEND_BUFFER_UNDER_CAP);
        match Remote::connect_metered(&config.store, meter, rate, send_buffer) {
            Ok(connected) => remote = Some(connected),
            // A roaming laptop away from any way home: seal now, send later.
            Err(error) if error.downcast_ref::<StoreUnreachable>().is_some() => {
                unreachable = Some(error.to_string());
            }
            Err(error) => return Err(error),
        }
    }
    let spool_limit = config.spool.limit_mib.saturating_mul(1 << 20);
    let sealing_threads = config.seal.threads();
    let mut spool = crate::spool::Spool::open(db, &paths.state)?;
    // What the link carries may leave the spool, whichever set sealed it.
    let upload_classes: Vec<u8> = match &plan.policy {
        Some(policy) => policy.link.classes.iter().map(|c| c.index()).collect(),
        None => Priority::ALL.iter().map(|c| c.index()).collect(),
    };
    let mut outcomes = Vec::new();
    for (set, decision) in sets.iter().zip(&decisions) {
        let held_back = (!decision.send || unreachable.is_some()).then(|| {
            unreachable
                .clone()
                .unwrap_or_else(|| decision.reasons.join("; "))
        });
        let upload = decision.send && remote.is_some();
        let mut attempt = || {
            backup::backup(
                Run {
                    keys,
                    db,
                    spool: &mut spool,
                    remote: if upload { remote.as_mut() } else { None },
                    spool_limit,
                    sealing_threads,
                    skip: vec![paths.state.clone(), paths.config.clone()],
                    progress,
                    host: host.clone(),
                    class: set.priority.index(),
                    upload_classes: upload_classes.clone(),
                },
                set,
            )
        };
        let result = match attempt() {
            // Once: the caches were wrong and are gone; a second run rebuilds them.
            Err(error) if error.downcast_ref::<backup::CachesReset>().is_some() => {
                tracing::warn!("{error}; running the backup again");
                attempt()
            }
            other => other,
        };
        // A set that fails does not keep the others from their backup.
        let result = match (result, held_back) {
            (Ok(summary), Some(why)) => SetResult::Queued {
                why,
                summary: Some(summary),
            },
            (Ok(summary), None) => SetResult::Done(summary),
            (Err(error), _) if error.downcast_ref::<backup::BudgetSpent>().is_some() => {
                // The budget (or the link) is gone for the sets after this one
                // too: they seal only (their connection would refuse every byte).
                if let Some(remote) = remote.take() {
                    drop(remote);
                }
                let why = if stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst)) {
                    "the upload was stopped (the link changed, the daemon was paused or is stopping): \
                     what is sealed waits in the spool, and the next run goes as the link's \
                     policy then allows"
                        .to_string()
                } else {
                    error.to_string()
                };
                unreachable = Some(
                    if stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst)) {
                        why.clone()
                    } else {
                        "the data budget of this network ran out during an earlier set's upload; \
                     this set waits in the spool"
                            .to_string()
                    },
                );
                SetResult::Queued { why, summary: None }
            }
            (Err(error), _) => SetResult::Failed(format!("{error:#}")),
        };
        outcomes.push(SetOutcome {
            set: set.name.clone(),
            result,
        });
    }
    if let Some(remote) = remote {
        remote.close();
    }
    // Between runs: what is safe stays safe if this fails.
    match crate::state::prune_known(db, crate::state::PRUNE_KNOWN_FROM) {
        Ok(Some((before, after))) => tracing::info!(
            before,
            after,
            "the local record of ids the store holds now keeps only those the sets' trees need"
        ),
        Ok(None) => {}
        Err(error) => tracing::warn!(
            "cannot prune the local record of ids the store holds (the next run tries again): \
             {error:#}"
        ),
    }
    Ok(outcomes)
}

/// Keeps a run's rate on the policy's rate for the time of day: at each edge of a
/// rate window the new rate applies to the next write (the metered stream takes
/// rate changes live). Stops when `done` is set.
fn follow_rate(
    policy: homing_policy::Policy,
    rate: Rate,
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    if policy.rate.windows.is_empty() {
        return;
    }
    std::thread::spawn(move || {
        while !done.load(Ordering::SeqCst) {
            let now = jiff::Timestamp::now();
            let Some(edge) = policy.next_rate_change(now) else {
                return;
            };
            // In steps of a second, to notice the end of the run.
            while !done.load(Ordering::SeqCst) && jiff::Timestamp::now() < edge {
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            let bytes = policy
                .rate_at(jiff::Timestamp::now())
                .and_then(|r| std::num::NonZeroU32::new(u32::try_from(r).unwrap_or(u32::MAX)));
            tracing::info!(rate = ?bytes, "a rate window of the link's policy opened or closed");
            rate.set(bytes);
        }
    });
}

/// Sets its flag when dropped (however the function holding it ends).
struct SetOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A meter that grants nothing once `stop` is set (the link changed): the write
/// in progress ends with `BudgetExhausted`, the upload stops at the next frame,
/// and what was cut resumes later.
struct Stoppable {
    inner: std::sync::Arc<dyn homing_transfer::stream::Meter>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl homing_transfer::stream::Meter for Stoppable {
    fn reserve(&self, want: usize) -> usize {
        if self.stop.load(std::sync::atomic::Ordering::SeqCst) {
            return 0;
        }
        self.inner.reserve(want)
    }
    fn settle(&self, reserved: usize, sent: usize) {
        self.inner.settle(reserved, sent);
    }
    fn received(&self, bytes: usize) {
        self.inner.received(bytes);
    }
}

/// The socket send buffer on a capped link (the kernel doubles it).
const SEND_BUFFER_UNDER_CAP: u32 = 16 * 1024;

/// What the link's policy says about a set of `priority` now.
fn decide_for(
    plan: &policy::Plan,
    db: &redb::Database,
    priority: Priority,
    now: jiff::Timestamp,
    battery: bool,
) -> anyhow::Result<homing_policy::Decision> {
    let Some(policy) = &plan.policy else {
        return Ok(homing_policy::Decision {
            send: true,
            classes: homing_policy::Class::ALL.to_vec(),
            max_bytes: u64::MAX,
            rate: None,
            reasons: vec![plan.why.clone()],
            recheck_at: None,
        });
    };
    let ledger = crate::ledger::load(db, &plan.network)?;
    let queue = homing_policy::Queue::only(priority);
    Ok(homing_policy::decide(policy, &ledger, &queue, now, battery))
}

/// `homing snapshots`
///
/// # Errors
/// Connection errors, rollback.
pub fn snapshots(paths: &Paths, args: &SnapshotsArgs) -> anyhow::Result<ExitCode> {
    let mut session = session(paths, &args.unlock)?;
    let list = restore::snapshots(&mut session.remote, &session.keys, &session.db)?;
    session.remote.close();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    if list.is_empty() {
        println!("no snapshots yet");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<12}  {:>4}  {:<19}  {:<12}  {:<12}  {:>8}  {:>10}",
        "id", "no.", "time", "set", "host", "files", "size"
    );
    for info in &list {
        let m = &info.manifest;
        println!(
            "{:<12}  {:>4}  {:<19}  {:<12}  {:<12}  {:>8}  {:>10}",
            &info.id[..12],
            m.sequence,
            local_time(m.time),
            m.set,
            m.host,
            m.summary.files,
            human_bytes(m.summary.bytes),
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `homing ls`
///
/// # Errors
/// Connection errors, a snapshot that does not resolve, damaged trees.
pub fn ls(paths: &Paths, args: &LsArgs) -> anyhow::Result<ExitCode> {
    let (mut session, _, manifest) = session_at(paths, &args.unlock, &args.snapshot)?;
    let mut listed = Vec::new();
    let json = args.json;
    let root = manifest
        .root_of(args.set.as_deref())
        .map_err(anyhow::Error::msg)?;
    restore::ls(
        &mut session.remote,
        &session.keys,
        root,
        args.path.as_deref(),
        &mut |entry| {
            if json {
                listed.push(entry);
            } else {
                let mode = format!("{:o}", entry.mode);
                let target = entry
                    .target
                    .as_ref()
                    .map(|t| format!(" -> {t}"))
                    .unwrap_or_default();
                println!(
                    "{:<7} {:>5} {:>10}  {}  {}{target}",
                    entry.kind,
                    mode,
                    entry.size,
                    local_time(entry.mtime),
                    entry.path
                );
            }
            Ok(())
        },
    )?;
    session.remote.close();
    if json {
        println!("{}", serde_json::to_string_pretty(&listed)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// `homing restore`
///
/// # Errors
/// Connection errors, a snapshot that does not resolve, an unwritable target.
pub fn restore(paths: &Paths, args: &RestoreArgs) -> anyhow::Result<ExitCode> {
    let (mut session, id, manifest) = session_at(paths, &args.unlock, &args.snapshot)?;
    let target: PathBuf = std::path::absolute(&args.target)?;
    let root = manifest
        .root_of(args.set.as_deref())
        .map_err(anyhow::Error::msg)?;
    let summary = restore::restore(
        &mut session.remote,
        &session.keys,
        root,
        args.path.as_deref(),
        &target,
    )?;
    session.remote.close();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "restored snapshot {id} into {}: {} files written ({}), {} already in place, \
             {} directories, {} links and other entries; received {}",
            target.display(),
            summary.files_restored,
            human_bytes(summary.bytes_written),
            summary.files_in_place,
            summary.dirs,
            summary.others,
            human_bytes(summary.bytes_received),
        );
        for failure in &summary.failures {
            println!("  FAILED: {failure}");
        }
    }
    Ok(if summary.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "homing: {} files could not be restored (nothing wrong was written)",
            summary.failures.len()
        );
        ExitCode::from(EXIT_INCOMPLETE)
    })
}

/// `homing verify`
///
/// # Errors
/// Connection errors and a snapshot that does not resolve.
pub fn verify(paths: &Paths, args: &VerifyArgs) -> anyhow::Result<ExitCode> {
    let (mut session, id, manifest) = session_at(paths, &args.unlock, &args.snapshot)?;
    let summary = restore::verify(
        &mut session.remote,
        &session.keys,
        id,
        &manifest,
        args.read_data,
    )?;
    session.remote.close();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        let how = if args.read_data {
            "fetched and authenticated"
        } else {
            "present in the store"
        };
        println!(
            "snapshot {id}: {} trees, {} files, {} objects {how}; {} problems",
            summary.trees,
            summary.files,
            summary.objects,
            summary.problems.len()
        );
        for problem in &summary.problems {
            println!("  PROBLEM: {problem}");
        }
    }
    Ok(if summary.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_INCOMPLETE)
    })
}

fn local_time(seconds: i64) -> String {
    jiff::Timestamp::from_second(seconds).map_or_else(
        |_| seconds.to_string(),
        |t| {
            t.to_zoned(jiff::tz::TimeZone::system())
                .strftime("%Y-%m-%d %H:%M:%S")
                .to_string()
        },
    )
}

/// Bytes for people: 1.2 MB.
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b < 1e3 {
        format!("{bytes} B")
    } else if b < 1e6 {
        format!("{:.1} kB", b / 1e3)
    } else if b < 1e9 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.2} GB", b / 1e9)
    }
}
