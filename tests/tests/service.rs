//! The service files in `contrib/`: each starts a command that exists, with
//! flags the binary takes, and each is well-formed for its system. (The files
//! cannot be installed here: this checks what can rot when a flag changes.)

use std::path::{Path, PathBuf};
use std::process::Command;

use homing_e2e::binary;

fn contrib(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../contrib")
        .join(path)
}

/// Runs `words` (a command line of a service file, its binary replaced by the
/// one built here) with `--help` appended: clap refuses an unknown subcommand or
/// flag before it prints the help.
fn parses(words: &[String]) {
    let name = Path::new(&words[0])
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a binary name");
    let out = Command::new(binary(name))
        .args(&words[1..])
        .arg("--help")
        .output()
        .expect("the binary runs");
    assert!(
        out.status.success(),
        "{words:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A systemd unit: sections and `Key=Value` lines only; its `ExecStart`.
fn unit(path: &str) -> Vec<String> {
    let text = std::fs::read_to_string(contrib(path)).expect("the unit");
    let mut sections = Vec::new();
    let mut exec = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') {
            assert!(line.ends_with(']'), "{path}:{}: {line}", n + 1);
            sections.push(line.to_string());
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{path}:{}: not Key=Value: {line}", n + 1));
        assert!(
            !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric()),
            "{path}:{}: {key}",
            n + 1
        );
        if key == "ExecStart" {
            exec = Some(value.split_whitespace().map(String::from).collect());
        }
    }
    assert_eq!(sections, ["[Unit]", "[Service]", "[Install]"], "{path}");
    exec.unwrap_or_else(|| panic!("{path}: no ExecStart"))
}

/// An OpenBSD rc.d script: valid shell; `daemon` and `daemon_flags`.
fn rc_script(path: &str) -> Vec<String> {
    let file = contrib(path);
    let syntax = Command::new("sh")
        .arg("-n")
        .arg(&file)
        .status()
        .expect("sh runs");
    assert!(syntax.success(), "{path}: not valid shell");
    let text = std::fs::read_to_string(&file).expect("the script");
    assert!(
        text.contains(". /etc/rc.d/rc.subr") && text.contains("rc_cmd $1"),
        "{path}"
    );
    let value = |key: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{path}: no {key}"))
            .trim_matches('"')
            .to_string()
    };
    let mut words = vec![value("daemon")];
    words.extend(value("daemon_flags").split_whitespace().map(String::from));
    words
}

#[test]
fn the_service_files_start_commands_the_binaries_take() {
    for path in ["systemd/homing-store.service", "systemd/homing.service"] {
        parses(&unit(path));
    }
    for path in ["openbsd/homing_store", "openbsd/homing"] {
        parses(&rc_script(path));
    }
}
