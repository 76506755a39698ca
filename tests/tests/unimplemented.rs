//! Commands of later releases are refused plainly, never faked.

use std::process::Command;

use homing_e2e::binary;

use super::{homing, stderr};

#[test]
fn unknown_commands_exit_2_and_say_so() {
    let home = tempfile::tempdir().unwrap();
    let unknown = homing(home.path(), &["frobnicate"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(stderr(&unknown).contains("unknown command"));
}

#[test]
fn the_store_server_answers_version_and_refuses_unknown_commands() {
    let version = Command::new(binary("homing-store"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(version.status.success());
    let unknown = Command::new(binary("homing-store"))
        .arg("frobnicate")
        .output()
        .unwrap();
    assert_eq!(unknown.status.code(), Some(2));
}
