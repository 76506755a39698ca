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
pub fn run(command: &PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
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
