//! `homing policy check FILE...`: the policy files as the daemon would load them.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use homing_policy::PolicySet;

use crate::cli::PolicyCommand;

/// Runs a `homing policy` command.
///
/// # Errors
/// Unreadable files (bad policies are reported and make the exit code non-zero).
pub fn run(paths: &crate::paths::Paths, command: &PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Explain { json } => explain(paths, *json),
        PolicyCommand::Watch => watch(paths),
        PolicyCommand::Check { files, json } => {
            let mut texts = Vec::with_capacity(files.len());
            for file in files {
                texts.push(
                    std::fs::read_to_string(file)
                        .with_context(|| format!("cannot read {}", file.display()))?,
                );
            }
            let loaded = PolicySet::load(
                files
                    .iter()
                    .map(PathBuf::as_path)
                    .zip(texts.iter().map(String::as_str)),
            );
            match loaded {
                Ok(set) => {
                    let names: Vec<&str> = set.policies().map(|p| p.name.as_str()).collect();
                    if *json {
                        println!("{}", serde_json::json!({ "ok": true, "policies": names }));
                    } else {
                        println!("{} policies, all good: {}", names.len(), names.join(", "));
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(errors) => {
                    if *json {
                        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
                        println!("{}", serde_json::json!({ "ok": false, "errors": errors }));
                    } else {
                        for error in &errors {
                            eprintln!("homing: {error}");
                        }
                    }
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}

fn watch(paths: &crate::paths::Paths) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    let config = crate::config::Config::load(&paths.config)?;
    let (events, wakes) = std::sync::mpsc::channel();
    if let Err(error) = crate::network::watch(move || {
        let _ = events.send(());
    }) {
        eprintln!("homing: no link events ({error}): looking every five seconds");
    }
    let mut last = None;
    loop {
        let seen = crate::network::observe(&config.store.address).map(|l| l.observation);
        if seen != last {
            let plan = plan(paths, &config.store.address)?;
            let interface = seen.as_ref().map_or("-", |s| s.interface.as_str());
            println!(
                "{} {interface} → {}: {}",
                jiff::Timestamp::now(),
                plan.network,
                plan.why
            );
            std::io::stdout().flush()?;
            last = seen;
        }
        match wakes.recv_timeout(std::time::Duration::from_secs(5)) {
            Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(std::time::Duration::from_secs(5));
            }
        }
    }
}

fn explain(paths: &crate::paths::Paths, json: bool) -> anyhow::Result<ExitCode> {
    let config = crate::config::Config::load(&paths.config)?;
    let plan = plan(paths, &config.store.address)?;
    let now = jiff::Timestamp::now();
    let battery = on_battery();
    let state = crate::state::open(&paths.state)?;
    let ledger = crate::ledger::load(&state, &plan.network)?;
    let mut classes = Vec::new();
    for class in homing_policy::Class::ALL {
        let decision = match &plan.policy {
            Some(policy) => {
                let queue = homing_policy::Queue::only(class);
                Some(homing_policy::decide(policy, &ledger, &queue, now, battery))
            }
            None => None,
        };
        classes.push((class, decision));
    }
    if json {
        let budget = plan.policy.as_ref().and_then(|p| p.budget.as_ref());
        let out = serde_json::json!({
            "network": plan.network,
            "cap": budget.map(|b| b.bytes),
            "allowance": budget.map(homing_policy::Budget::allowance),
            "spent": budget.map(|b| ledger.spent(b, now)),
            "policy": plan.policy.as_ref().map(|p| p.name.clone()),
            "why": plan.why,
            "on_battery": battery,
            "classes": classes.iter().map(|(class, d)| serde_json::json!({
                "class": format!("{class:?}").to_lowercase(),
                "send": d.as_ref().is_none_or(|d| d.send),
                "max_bytes": d.as_ref().map(|d| d.max_bytes),
                "rate": d.as_ref().and_then(|d| d.rate),
                "reasons": d.as_ref().map(|d| d.reasons.clone()).unwrap_or_default(),
                "recheck_at": d.as_ref().and_then(|d| d.recheck_at).map(|t| t.to_string()),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "network: {}
{}",
        plan.network, plan.why
    );
    for (class, decision) in classes {
        let name = format!("{class:?}").to_lowercase();
        match decision {
            None => println!("  {name}: may upload, no cap"),
            Some(d) if d.send => println!(
                "  {name}: may upload{}{}; {}",
                if d.max_bytes == u64::MAX {
                    String::new()
                } else {
                    format!(" {} more bytes", d.max_bytes)
                },
                d.rate.map(|r| format!(" at {r} B/s")).unwrap_or_default(),
                d.reasons.join("; ")
            ),
            Some(d) => println!(
                "  {name}: waits: {}{}",
                d.reasons.join("; "),
                d.recheck_at
                    .map(|t| format!(" (next look: {t})"))
                    .unwrap_or_default()
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The policies of the configuration's policy directory, checked together;
/// `None` when there is no such directory.
///
/// # Errors
/// Unreadable files, and every error of the files, each with its file and line.
pub fn load_set(paths: &crate::paths::Paths) -> anyhow::Result<Option<PolicySet>> {
    let dir = directory(paths);
    if !dir.is_dir() {
        return Ok(None);
    }
    let mut files = Vec::new();
    for entry in
        std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?
    {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            files.push((path, text));
        }
    }
    files.sort();
    PolicySet::load(files.iter().map(|(p, t)| (p.as_path(), t.as_str())))
        .map(Some)
        .map_err(|errors| {
            anyhow::anyhow!(
                "the network policies do not load:\n{}",
                errors
                    .iter()
                    .map(|e| format!("  {e}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })
}

/// Which policy governs uploads from here now.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The network's name in the ledger and in reports.
    pub network: String,
    /// Its policy; `None` when none applies (no policy directory, or the store
    /// is on this machine).
    pub policy: Option<homing_policy::Policy>,
    /// Why, in words.
    pub why: String,
}

/// The policy directory of a configuration.
pub fn directory(paths: &crate::paths::Paths) -> PathBuf {
    paths.config.join("policies")
}

/// Finds the policy of the link to `store` (`host:port`) from the policy
/// directory, as the daemon will at every link event.
///
/// # Errors
/// Unreadable or bad policy files (every error, each with its file and line).
pub fn plan(paths: &crate::paths::Paths, store: &str) -> anyhow::Result<Plan> {
    plan_with(load_set(paths)?.as_ref(), paths, store)
}

/// [`plan`] with policies already loaded (`None`: no policy directory): the
/// daemon keeps the last set that loaded and plans with it while the files
/// on disk do not load.
///
/// # Errors
/// Two equally specific policies for the link.
pub fn plan_with(
    set: Option<&PolicySet>,
    paths: &crate::paths::Paths,
    store: &str,
) -> anyhow::Result<Plan> {
    let Some(set) = set else {
        return Ok(Plan {
            network: "any".into(),
            policy: None,
            why: format!(
                "no policy directory ({}): no caps apply",
                directory(paths).display()
            ),
        });
    };
    plan_on(set, store, crate::network::observe(store).as_ref())
}

/// The plan `set` makes for `link` (as [`crate::network::observe`] saw it; `None`
/// when the store's address does not resolve).
///
/// # Errors
/// Policies that match the link equally well.
pub fn plan_on(
    set: &PolicySet,
    store: &str,
    link: Option<&crate::network::Link>,
) -> anyhow::Result<Plan> {
    let Some(link) = link else {
        let policy = set
            .select(&homing_policy::Observation::default())?
            .policy
            .clone();
        return Ok(Plan {
            network: policy.name.clone(),
            why: format!(
                "the store's address {store} does not resolve: the default policy applies"
            ),
            policy: Some(policy),
        });
    };
    let seen = &link.observation;
    let named_loopback = set
        .policies()
        .any(|p| p.matching.interface.as_deref() == Some(seen.interface.as_str()));
    if link.loopback && !named_loopback {
        return Ok(Plan {
            network: "loopback".into(),
            policy: None,
            why: "the store is on this machine: no link is used, no caps apply".into(),
        });
    }
    let selection = set.select(seen)?;
    Ok(Plan {
        network: selection.policy.name.clone(),
        policy: Some(selection.policy.clone()),
        why: selection.reason,
    })
}

/// Whether the machine runs on battery (Linux: a battery and no mains supply
/// online in /sys/class/power_supply; elsewhere: not known, so no).
pub fn on_battery() -> bool {
    if !cfg!(target_os = "linux") {
        return false;
    }
    let Ok(entries) = std::fs::read_dir("/sys/class/power_supply") else {
        return false;
    };
    let (mut battery, mut mains) = (false, false);
    for entry in entries.flatten() {
        let path = entry.path();
        let kind = std::fs::read_to_string(path.join("type")).unwrap_or_default();
        let online = std::fs::read_to_string(path.join("online")).unwrap_or_default();
        match kind.trim() {
            "Battery" => battery = true,
            "Mains" | "USB" if online.trim() == "1" => mains = true,
            _ => {}
        }
    }
    battery && !mains
}
