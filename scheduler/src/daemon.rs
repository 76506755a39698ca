//! `homing daemon`: backs up every configured set on a schedule and whenever the
//! link to the store changes while something waits in the spool, as each link's
//! policy allows; and the control socket that `homing status`, `pause`,
//! `resume` and `backup-now` talk to.
//!
//! The schedule runs on the wall clock. The daemon sleeps until the next run is
//! due or the link is to be looked at (at most a minute), so an idle daemon
//! wakes once a minute; after a suspend it runs once on wake (within that
//! minute), not once per missed interval. Each run
//! is a `homing backup` of every set (a rescan reads no unchanged file), so a
//! run after a link change uploads what earlier runs sealed and commits.
//!
//! On Linux a netlink socket wakes the daemon on every link, address, route or
//! neighbour event, and the link is looked at again at once; elsewhere (and as
//! a fallback) it is looked at once a minute.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use jiff::{Timestamp, ToSpan};
use serde::Serialize;

use crate::commands::{SetResult, backup_sets};
use crate::config::Config;
use crate::paths::Paths;

/// The longest the daemon sleeps: the link is looked at this often where no
/// events come, and the wall clock is checked this often, so that a run due
/// during a suspend starts within this much of the wake (the monotonic clock
/// of the wait does not count the suspend).
const LOOK_EVERY: Duration = Duration::from_secs(60);

/// How soon the daemon looks again when another command holds the state.
const RETRY: Duration = Duration::from_secs(5);

/// The control socket of a state directory.
pub fn socket_path(paths: &Paths) -> PathBuf {
    paths.state.join("control.sock")
}

/// What the daemon is doing, as `homing status` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    /// Uploads and scheduled runs are paused.
    pub paused: bool,
    /// A run is in progress.
    pub running: bool,
    /// Runs since the daemon started.
    pub runs: u64,
    /// When the last run ended.
    pub last_run: Option<String>,
    /// When the next scheduled run is due.
    pub next_run: Option<String>,
    /// The network of the last run and why its policy applied.
    pub network: Option<String>,
    /// The last run's outcome per set.
    pub sets: Vec<serde_json::Value>,
    /// The last run's error, if it could not run at all (bad configuration, or
    /// policies that never loaded: the daemon keeps going and tries again).
    pub error: Option<String>,
    /// Why the last run went on the last policies that loaded (the files on disk
    /// do not): it ran, but the files need fixing.
    pub warning: Option<String>,
}

/// What the watcher needs to stop a run whose network went away.
#[derive(Default)]
struct RunWatch {
    /// The network of the run in progress, and the policies that chose it.
    during_run: Mutex<Option<RunNetwork>>,
    /// Set when the run must stop uploading (another network, `pause`, a signal):
    /// the run's meter grants nothing more. Cleared when a run starts.
    changed: Arc<AtomicBool>,
    /// Set by SIGTERM or SIGINT, never cleared: no run starts after it.
    shutdown: AtomicBool,
}

/// The network a run goes over, as its policies named it.
struct RunNetwork {
    network: String,
    policies: Option<homing_policy::PolicySet>,
}

impl RunWatch {
    /// Whether the run in progress would now go over another network: the link
    /// changed in a way its policies tell apart (another policy matches, or the
    /// store cannot be reached). A change they cannot tell apart (another access
    /// point of the same Wi-Fi, a new IPv6 address, a renewed lease) lets the
    /// upload go on.
    fn network_changed(&self, store: &str) -> bool {
        // Copied out, so that the lock is not held across the look at the link
        // (a name lookup may take a while).
        let (network, policies) = {
            let during = lock_network(&self.during_run);
            match during.as_ref() {
                // With no policies, nothing is capped and every link is one network.
                Some(RunNetwork {
                    network,
                    policies: Some(policies),
                }) => (network.clone(), policies.clone()),
                _ => return false,
            }
        };
        let link = crate::network::observe(store);
        match crate::policy::plan_on(&policies, store, link.as_ref()) {
            Ok(plan) => plan.network != network,
            Err(error) => {
                tracing::warn!("{error:#}; the upload stops");
                true
            }
        }
    }

    /// Makes the run about to start stoppable, and says whether it may start: not
    /// after a signal, nor once paused. The flag is cleared first and the reasons
    /// to stop are read after, so that a signal or a `pause` that comes meanwhile
    /// is never lost.
    fn arm(&self, status: &Mutex<Status>) -> bool {
        self.changed.store(false, Ordering::SeqCst);
        !self.shutdown.load(Ordering::SeqCst) && !lock(status).paused
    }
}

fn lock_network(
    network: &Mutex<Option<RunNetwork>>,
) -> std::sync::MutexGuard<'_, Option<RunNetwork>> {
    network.lock().unwrap_or_else(|p| p.into_inner())
}

enum Wake {
    Now,
    Link,
    Stop,
    Reload,
}

/// Runs the daemon until SIGTERM or SIGINT.
///
/// # Errors
/// A control socket that cannot be made, a key that cannot be unlocked.
pub fn run(
    paths: &Paths,
    interval: Duration,
    passphrase_file: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let master = crate::key::load(&paths.key_file(), passphrase_file)?;
    let keys = master.key_ring();
    drop(master);
    // The state is checked once here (a damaged or locked database says so at
    // start) and then opened by each run only.
    drop(crate::state::open(&paths.state)?);
    let status = Arc::new(Mutex::new(Status::default()));
    let (wake, wakes) = std::sync::mpsc::channel();
    let socket = socket_path(paths);
    let listener = bind(&socket)?;
    let watch = Arc::new(RunWatch::default());
    {
        let (status, wake) = (Arc::clone(&status), wake.clone());
        let stop = Arc::clone(&watch.changed);
        std::thread::spawn(move || serve_control(&listener, &status, &wake, &stop));
    }
    {
        let wake = wake.clone();
        let watch = Arc::clone(&watch);
        std::thread::spawn(move || watch_signals(&wake, &watch));
    }
    {
        let wake = wake.clone();
        let watch = Arc::clone(&watch);
        let store = Config::load(&paths.config).map(|c| c.store.address).ok();
        if let Err(error) = crate::network::watch(move || {
            // During a run: does the run now go over another network? Then its
            // upload stops at its next write.
            if let Some(store) = &store
                && watch.network_changed(store)
            {
                watch.changed.store(true, Ordering::SeqCst);
            }
            let _ = wake.send(Wake::Link);
        }) {
            tracing::warn!(%error, "no link events: the link is looked at once a minute");
        }
    }
    tracing::info!(socket = %socket.display(), "homing daemon started");
    // The first run is at once, not after the first look at the clock.
    let _ = wake.send(Wake::Now);
    let result = main_loop(paths, &keys, interval, &status, &wakes, &watch);
    let _ = std::fs::remove_file(&socket);
    tracing::info!("homing daemon stopped");
    result.map(|()| ExitCode::SUCCESS)
}

fn main_loop(
    paths: &Paths,
    keys: &homing_crypto::KeyRing,
    interval: Duration,
    status: &Arc<Mutex<Status>>,
    wakes: &Receiver<Wake>,
    watch: &RunWatch,
) -> anyhow::Result<()> {
    let interval_span = i64::try_from(interval.as_secs())
        .unwrap_or(i64::MAX)
        .seconds();
    // The first run is at once.
    let mut next = Timestamp::now();
    let mut link = None;
    let mut looked = Timestamp::UNIX_EPOCH;
    let mut pending_link = false;
    let mut sleep = Duration::ZERO;
    let mut last_good: LastGood = None;
    // A requested run that found the state held by another command: it is tried
    // again, as a due one is.
    let mut retry_forced = false;
    loop {
        let (forced, event) = match wakes.recv_timeout(sleep) {
            Ok(Wake::Stop) | Err(RecvTimeoutError::Disconnected) => return Ok(()),
            Ok(Wake::Reload) => {
                tracing::info!("reload: the configuration and policies are read at the next run");
                (false, true)
            }
            Ok(Wake::Now) => (true, false),
            Ok(Wake::Link) => (false, true),
            Err(RecvTimeoutError::Timeout) => (false, false),
        };
        let forced = forced || std::mem::take(&mut retry_forced);
        let paused = lock(status).paused;
        let now = Timestamp::now();
        let due = now >= next;
        // The link is looked at on the kernel's events, and otherwise once a
        // minute (where there are no events): an idle daemon reads no files and
        // asks no name server every few seconds.
        let stale = now.as_second() - looked.as_second() >= LOOK_EVERY.as_secs() as i64;
        let mut link_changed = false;
        let looked_now = event || stale || forced || due;
        if looked_now {
            looked = now;
            let seen = Config::load(&paths.config)
                .ok()
                .and_then(|c| crate::network::observe(&c.store.address));
            link_changed = seen != link;
            if link_changed {
                tracing::info!(
                    link = seen
                        .as_ref()
                        .map_or_else(|| "none".to_string(), |l| l.observation.interface.clone()),
                    "the link to the store changed"
                );
            }
            link = seen;
        }
        // A new link with something waiting: its policy may let it go now. The
        // state is opened only to look, so that other commands can use it
        // between runs.
        // If another command holds the state just then, look again at the next
        // tick rather than miss the change.
        if link_changed {
            pending_link = true;
        }
        let mut waiting = false;
        if pending_link {
            match crate::state::open(&paths.state).and_then(|db| crate::state::spool_size(&db)) {
                Ok((bytes, _)) => {
                    waiting = bytes > 0;
                    pending_link = false;
                }
                Err(error) => tracing::debug!(%error, "the state is busy; looking again soon"),
            }
        }
        // Asleep until the next run is due or the link is to be looked at,
        // whichever comes first; events and commands wake it before.
        let until_due = u64::try_from(next.as_second() - now.as_second()).unwrap_or(0);
        let until_look =
            u64::try_from(looked.as_second() + LOOK_EVERY.as_secs() as i64 - now.as_second())
                .unwrap_or(0);
        // (While paused, only the link: `resume` wakes it.)
        let until = if paused {
            until_look
        } else {
            until_due.min(until_look)
        };
        sleep = Duration::from_secs(until.max(1)).min(LOOK_EVERY);
        if pending_link {
            sleep = sleep.min(RETRY);
        }
        if link_changed {
            tracing::info!(
                run = !paused && waiting,
                paused,
                waiting,
                "decided on the new link"
            );
        }
        if paused || !(forced || due || waiting) {
            continue;
        }
        if !watch.arm(status) {
            if watch.shutdown.load(Ordering::SeqCst) {
                return Ok(());
            }
            continue;
        }
        lock(status).running = true;
        // A run right after a look plans on what it saw: one look (routes,
        // NetworkManager, a name lookup) serves both.
        let outcome = run_once(
            paths,
            keys,
            watch,
            &mut last_good,
            looked_now.then_some(&link),
        );
        *lock_network(&watch.during_run) = None;
        if let Err(error) = &outcome
            && crate::state::is_busy(error)
        {
            // Another command (a `homing backup` by hand, say) holds the state:
            // not a run, and not a reason to wait a whole interval. The run stays
            // due (or requested) and is tried again in a few seconds.
            tracing::info!(
                "another homing command holds the state; trying again in {} s",
                RETRY.as_secs()
            );
            lock(status).running = false;
            retry_forced = forced;
            sleep = RETRY;
            continue;
        }
        let finished = Timestamp::now();
        if due {
            next = finished.checked_add(interval_span).unwrap_or(finished);
        }
        let mut shown = lock(status);
        shown.running = false;
        shown.runs += 1;
        shown.last_run = Some(finished.to_string());
        shown.next_run = Some(next.to_string());
        match outcome {
            Ok((network, sets, warning)) => {
                shown.network = Some(network);
                shown.sets = sets;
                shown.error = None;
                shown.warning = warning;
            }
            Err(error) => {
                tracing::error!("the run failed: {error:#}");
                shown.error = Some(format!("{error:#}"));
                shown.warning = None;
            }
        }
    }
}

/// The policies the daemon last loaded without an error: while the files on
/// disk do not load (a half-written edit), runs go on with these, and the
/// status says why.
type LastGood = Option<Option<homing_policy::PolicySet>>;

/// One run: its network and why, each set's outcome as JSON, and a warning for
/// the status (the policies on disk did not load and the last good ones were
/// used).
fn run_once(
    paths: &Paths,
    keys: &homing_crypto::KeyRing,
    watch: &RunWatch,
    last_good: &mut LastGood,
    seen: Option<&Option<crate::network::Link>>,
) -> anyhow::Result<(String, Vec<serde_json::Value>, Option<String>)> {
    let config = Config::load(&paths.config)?;
    // Open for the run only: between runs other commands use the state.
    let db = &Arc::new(crate::state::open(&paths.state)?);
    if config.sets.is_empty() {
        bail!("no backup sets are configured: add [[set]] sections to config.toml");
    }
    let mut warning = None;
    match crate::policy::load_set(paths) {
        Ok(set) => *last_good = Some(set),
        Err(error) => match last_good {
            Some(_) => {
                tracing::error!("{error:#}; running on the last policies that loaded");
                warning = Some(format!(
                    "{error:#}\n(running on the last policies that loaded; fix the files, \
                     they are read again at the next run)"
                ));
            }
            None => return Err(error),
        },
    }
    let set = last_good.as_ref().and_then(Option::as_ref);
    let plan = match (set, seen) {
        (Some(set), Some(link)) => {
            crate::policy::plan_on(set, &config.store.address, link.as_ref())?
        }
        _ => crate::policy::plan_with(set, paths, &config.store.address)?,
    };
    // The network this run goes over: when the watcher sees the run would now go
    // over another, the upload stops at its next write.
    *lock_network(&watch.during_run) = Some(RunNetwork {
        network: plan.network.clone(),
        policies: set.cloned(),
    });
    let client = crate::commands::Client {
        paths,
        config: &config,
        keys,
        db,
    };
    let outcomes = backup_sets(&client, &plan, &config.sets, false, Some(&watch.changed))?;
    let mut sets = Vec::new();
    for outcome in &outcomes {
        match &outcome.result {
            SetResult::Done(summary) => tracing::info!(
                set = %outcome.set,
                snapshot = summary.snapshot.as_deref().unwrap_or("-"),
                sent = summary.bytes_sent,
                "backed up"
            ),
            SetResult::Queued { why, .. } => {
                tracing::info!(set = %outcome.set, %why, "queued");
            }
            SetResult::Failed(error) => tracing::error!(set = %outcome.set, %error, "failed"),
        }
        sets.push(serde_json::to_value(outcome)?);
    }
    Ok((format!("{}: {}", plan.network, plan.why), sets, warning))
}

fn lock(status: &Mutex<Status>) -> std::sync::MutexGuard<'_, Status> {
    status.lock().unwrap_or_else(|p| p.into_inner())
}

/// Binds the control socket, owner-only; a socket left by a daemon that died is
/// replaced, one that answers means a daemon runs already.
fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if UnixStream::connect(path).is_ok() {
        bail!(
            "a homing daemon runs already for this state ({})",
            path.display()
        );
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot create the control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(listener)
}

fn serve_control(
    listener: &UnixListener,
    status: &Arc<Mutex<Status>>,
    wake: &Sender<Wake>,
    stop: &AtomicBool,
) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut line = String::new();
        if BufReader::new(&stream).read_line(&mut line).is_err() {
            continue;
        }
        let reply = match line.trim() {
            "status" => serde_json::to_value(&*lock(status)).unwrap_or_default(),
            "pause" => {
                lock(status).paused = true;
                // An upload in progress stops at its next write.
                stop.store(true, Ordering::SeqCst);
                serde_json::json!({ "ok": true, "message": "paused: nothing is uploaded until `homing resume`" })
            }
            "resume" => {
                lock(status).paused = false;
                let _ = wake.send(Wake::Now);
                serde_json::json!({ "ok": true, "message": "resumed: a run starts now" })
            }
            "backup-now" => {
                if lock(status).paused {
                    serde_json::json!({ "ok": false, "message": "paused: run `homing resume` first" })
                } else {
                    let _ = wake.send(Wake::Now);
                    serde_json::json!({ "ok": true, "message": "a run starts now" })
                }
            }
            other => {
                serde_json::json!({ "ok": false, "message": format!("unknown request `{other}`") })
            }
        };
        let _ = writeln!(stream, "{reply}");
    }
}

/// SIGTERM and SIGINT stop the daemon: a run in progress stops uploading at its
/// next write (its ledger settles as its meter goes), then the loop ends.
fn watch_signals(wake: &Sender<Wake>, watch: &RunWatch) {
    let stop = || {
        watch.shutdown.store(true, Ordering::SeqCst);
        watch.changed.store(true, Ordering::SeqCst);
        let _ = wake.send(Wake::Stop);
    };
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return;
    };
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => { stop(); return; }
                _ = int.recv() => { stop(); return; }
                _ = hup.recv() => { let _ = wake.send(Wake::Reload); }
            }
        }
    });
}

/// Sends a request to the daemon and returns its reply.
///
/// # Errors
/// No daemon running, or a reply that is not JSON.
pub fn request(paths: &Paths, what: &str) -> anyhow::Result<serde_json::Value> {
    let path = socket_path(paths);
    let mut stream = UnixStream::connect(&path).with_context(|| {
        format!(
            "no homing daemon answers at {} (start one with `homing daemon`)",
            path.display()
        )
    })?;
    writeln!(stream, "{what}")?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    serde_json::from_str(&line).context("the daemon's reply is not JSON")
}

/// `homing status|pause|resume|backup-now`
///
/// # Errors
/// As [`request`].
pub fn control(paths: &Paths, what: &str, json: bool) -> anyhow::Result<ExitCode> {
    let reply = request(paths, what)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
    } else if what == "status" {
        let flag = |key: &str| reply[key].as_bool().unwrap_or(false);
        println!(
            "{}{}, {} runs; last {}, next {}",
            if flag("paused") { "paused" } else { "active" },
            if flag("running") { ", running now" } else { "" },
            reply["runs"],
            reply["last_run"].as_str().unwrap_or("never"),
            reply["next_run"].as_str().unwrap_or("now"),
        );
        if let Some(network) = reply["network"].as_str() {
            println!("network: {network}");
        }
        if let Some(error) = reply["error"].as_str() {
            println!("last run failed: {error}");
        }
        if let Some(warning) = reply["warning"].as_str() {
            println!("warning: {warning}");
        }
        for set in reply["sets"].as_array().into_iter().flatten() {
            let name = set["set"].as_str().unwrap_or("?");
            let result = &set["result"];
            if let Some(done) = result.get("done") {
                println!(
                    "  {name}: snapshot {} ({} sent)",
                    done["snapshot"].as_str().unwrap_or("-"),
                    done["bytes_sent"]
                );
            } else if let Some(queued) = result.get("queued") {
                println!(
                    "  {name}: waiting: {}",
                    queued["why"].as_str().unwrap_or("")
                );
            } else if let Some(failed) = result.get("failed") {
                println!("  {name}: failed: {}", failed.as_str().unwrap_or(""));
            }
        }
    } else {
        println!("{}", reply["message"].as_str().unwrap_or(""));
    }
    Ok(if reply["ok"].as_bool() == Some(false) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
