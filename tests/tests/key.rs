//! `homing key ...`: generate, export, import, fingerprint, and their refusals.

use std::fs;

use super::{homing, homing_with_stdin, ok, stderr, stdout};

/// The nine groups of a paper form printed by `homing key generate` or `export`.
fn paper_form(output: &str) -> String {
    output
        .lines()
        .skip_while(|l| !l.starts_with("Homing master key"))
        .take(4)
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_generated_key_survives_export_and_import_into_another_config() {
    let home = tempfile::tempdir().unwrap();
    let laptop = home.path().join("laptop");
    let out = ok(homing(&laptop, &["key", "generate", "--no-passphrase"]));
    assert!(
        out.contains("If you lose the key (and this paper), you lose the backups."),
        "{out}"
    );
    let fingerprint = ok(homing(&laptop, &["key", "fingerprint"]))
        .trim()
        .to_string();
    assert_eq!(fingerprint.len(), 8);
    assert!(out.contains(&fingerprint));

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(laptop.join("master.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let exported = ok(homing(&laptop, &["key", "export"]));
    assert_eq!(paper_form(&exported), paper_form(&out));

    let new_laptop = home.path().join("new-laptop");
    let typed = paper_form(&exported).to_lowercase();
    let imported = ok(homing_with_stdin(
        &new_laptop,
        &["key", "import", "--no-passphrase"],
        &typed,
    ));
    assert!(imported.contains(&fingerprint), "{imported}");
    let again = ok(homing(&new_laptop, &["key", "fingerprint", "--json"]));
    let json: serde_json::Value = serde_json::from_str(&again).unwrap();
    assert_eq!(json["fingerprint"], fingerprint.as_str());
}

#[test]
fn a_passphrase_protected_key_needs_the_right_passphrase() {
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("config");
    let right = home.path().join("right");
    let wrong = home.path().join("wrong");
    fs::write(&right, "correct horse battery staple\n").unwrap();
    fs::write(&wrong, "incorrect horse\n").unwrap();
    let args = [
        "key",
        "generate",
        "--kdf-memory-mib",
        "8",
        "--kdf-passes",
        "1",
        "--passphrase-file",
    ];
    let mut args = args.to_vec();
    args.push(right.to_str().unwrap());
    ok(homing(&config, &args));

    let missing = homing(&config, &["key", "fingerprint"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("--passphrase-file"),
        "{}",
        stderr(&missing)
    );

    let refused = homing(
        &config,
        &[
            "key",
            "fingerprint",
            "--passphrase-file",
            wrong.to_str().unwrap(),
        ],
    );
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("wrong passphrase"),
        "{}",
        stderr(&refused)
    );

    ok(homing(
        &config,
        &[
            "key",
            "fingerprint",
            "--passphrase-file",
            right.to_str().unwrap(),
        ],
    ));
}

#[test]
fn an_existing_key_is_never_overwritten() {
    let home = tempfile::tempdir().unwrap();
    let before = ok(homing(home.path(), &["key", "generate", "--no-passphrase"]));
    let fingerprint = ok(homing(home.path(), &["key", "fingerprint"]));
    let second = homing(home.path(), &["key", "generate", "--no-passphrase"]);
    assert_eq!(second.status.code(), Some(1));
    assert!(
        stderr(&second).contains("never overwrites"),
        "{}",
        stderr(&second)
    );
    let import = homing_with_stdin(
        home.path(),
        &["key", "import", "--no-passphrase"],
        &paper_form(&before),
    );
    assert_eq!(import.status.code(), Some(1));
    assert_eq!(
        ok(homing(home.path(), &["key", "fingerprint"])),
        fingerprint
    );
}

#[test]
fn a_mistyped_paper_form_names_the_group_and_writes_nothing() {
    let home = tempfile::tempdir().unwrap();
    let source = home.path().join("source");
    let paper = paper_form(&ok(homing(
        &source,
        &["key", "generate", "--no-passphrase"],
    )));
    // Change one character of the fifth group (line 2, second group).
    let mut lines: Vec<String> = paper.lines().map(str::to_string).collect();
    let group: Vec<char> = lines[2].chars().collect();
    let position = lines[2].find(' ').unwrap() + 3;
    let replacement = if group[position] == 'Z' { 'Y' } else { 'Z' };
    lines[2].replace_range(position..position + 1, &replacement.to_string());
    let target = home.path().join("target");
    let result = homing_with_stdin(
        &target,
        &["key", "import", "--no-passphrase"],
        &lines.join("\n"),
    );
    assert_eq!(result.status.code(), Some(1));
    assert!(stderr(&result).contains("group 5"), "{}", stderr(&result));
    assert!(!target.join("master.key").exists());
}

#[cfg(unix)]
#[test]
fn a_key_file_others_can_read_is_refused_with_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let home = tempfile::tempdir().unwrap();
    ok(homing(home.path(), &["key", "generate", "--no-passphrase"]));
    let key = home.path().join("master.key");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
    let result = homing(home.path(), &["key", "export"]);
    assert_eq!(result.status.code(), Some(1));
    let message = stderr(&result);
    assert!(
        message.contains(&format!("chmod 600 {}", key.display())),
        "{message}"
    );
    assert!(stdout(&result).is_empty(), "nothing of the key is printed");
}
