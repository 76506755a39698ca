//! `homing policy check`: the shipped examples pass; a bad file is named with its
//! line and column, and the exit code says so.

use std::path::Path;

use super::{homing, stderr, stdout};

#[test]
fn the_examples_pass_and_a_bad_file_is_named_where_it_is_wrong() {
    let home = tempfile::tempdir().unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/examples");
    let mut files: Vec<String> = std::fs::read_dir(&examples)
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .collect();
    files.sort();
    let mut args = vec!["policy", "check"];
    args.extend(files.iter().map(String::as_str));
    let good = homing(home.path(), &args);
    assert!(good.status.success(), "{}", stderr(&good));
    assert!(stdout(&good).contains("6 policies"), "{}", stdout(&good));

    let bad = home.path().join("cafe.toml");
    std::fs::write(
        &bad,
        "[match]\nssid = \"Cafe\"\n\n[budget]\nbytes = \"1 GB\"\nperiod = \"daily\"\n",
    )
    .unwrap();
    let out = homing(home.path(), &["policy", "check", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let message = stderr(&out);
    assert!(message.contains("cafe.toml:6:"), "{message}");
    assert!(message.contains("daily"), "{message}");
}
