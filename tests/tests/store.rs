//! `homing-store`: init, the CA, accounts and check, through the real binary.
//! Certificates are checked with `openssl verify`, an independent implementation.

use std::path::Path;
use std::process::{Command, Output};

use homing_e2e::binary;

fn store(args: &[&str]) -> Output {
    Command::new(binary("homing-store"))
        .args(args)
        .env_remove("HOMING_STORE")
        .output()
        .expect("homing-store runs")
}

fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn openssl(args: &[&str]) -> Output {
    Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed (CI installs it)")
}

fn init(dir: &Path) -> String {
    let dir = dir.to_str().expect("temporary paths are UTF-8");
    ok(store(&[
        "init",
        dir,
        "--hostname",
        "nas.home",
        "--ip",
        "10.0.0.2",
    ]));
    dir.to_string()
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .expect("the file exists")
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn init_makes_a_ca_and_a_server_certificate_for_the_names_given() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("store");
    let d = init(&dir);
    #[cfg(unix)]
    {
        assert_eq!(mode(&dir.join("ca/ca.key")), 0o600);
        assert_eq!(mode(&dir.join("server.key")), 0o600);
    }
    let ca = format!("{d}/ca/ca.crt");
    let verified = openssl(&["verify", "-CAfile", &ca, &format!("{d}/server.crt")]);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stdout)
    );
    let names = String::from_utf8_lossy(
        &openssl(&[
            "x509",
            "-in",
            &format!("{d}/server.crt"),
            "-noout",
            "-ext",
            "subjectAltName",
        ])
        .stdout,
    )
    .into_owned();
    for name in [
        "DNS:nas.home",
        "DNS:localhost",
        "IP Address:10.0.0.2",
        "IP Address:127.0.0.1",
    ] {
        assert!(names.contains(name), "{name} missing from {names}");
    }
    let again = store(&["init", &d]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("never replaces"));
}

#[test]
fn issued_certificates_chain_to_the_ca_and_revocation_reaches_the_crl() {
    let home = tempfile::tempdir().unwrap();
    let d = init(&home.path().join("store"));
    let prefix = home.path().join("alice");
    let p = prefix.to_str().unwrap();
    ok(store(&[
        "account", "add", "alice", "--store", &d, "--hard", "1G",
    ]));
    let issued = ok(store(&["ca", "issue", "alice", "--store", &d, "--out", p]));
    #[cfg(unix)]
    assert_eq!(mode(&home.path().join("alice.key")), 0o600);
    let ca = format!("{p}-ca.crt");
    let cert = format!("{p}.crt");
    assert!(openssl(&["verify", "-CAfile", &ca, &cert]).status.success());
    let subject =
        String::from_utf8_lossy(&openssl(&["x509", "-in", &cert, "-noout", "-subject"]).stdout)
            .into_owned();
    assert!(
        subject.contains("CN = alice") || subject.contains("CN=alice"),
        "{subject}"
    );

    let revoked = ok(store(&["ca", "revoke", "alice", "--store", &d]));
    let serial = issued.split_whitespace().nth(2).unwrap();
    assert!(revoked.contains(serial), "{revoked}");
    let crl = format!("{d}/ca/crl.pem");
    let check = openssl(&[
        "verify",
        "-crl_check",
        "-CRLfile",
        &crl,
        "-CAfile",
        &ca,
        &cert,
    ]);
    assert!(
        !check.status.success(),
        "a revoked certificate must not verify"
    );
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("revoked")
            || String::from_utf8_lossy(&check.stderr).contains("revoked")
    );
    let list: serde_json::Value =
        serde_json::from_str(&ok(store(&["ca", "list", "--store", &d, "--json"]))).unwrap();
    assert_eq!(list[0]["revoked"], true);
    let unknown = store(&["ca", "revoke", "nobody", "--store", &d]);
    assert_eq!(unknown.status.code(), Some(1));
}

#[test]
fn a_laptops_own_request_is_signed_for_the_account_the_operator_names() {
    let home = tempfile::tempdir().unwrap();
    let d = init(&home.path().join("store"));
    let key = home.path().join("laptop.key");
    let csr = home.path().join("laptop.csr");
    let made = openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        csr.to_str().unwrap(),
        "-subj",
        "/CN=admin",
    ]);
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let prefix = home.path().join("bob");
    ok(store(&[
        "ca",
        "sign",
        csr.to_str().unwrap(),
        "--account",
        "bob",
        "--store",
        &d,
        "--out",
        prefix.to_str().unwrap(),
    ]));
    assert!(
        !home.path().join("bob.key").exists(),
        "the key never leaves the laptop"
    );
    let cert = format!("{}.crt", prefix.display());
    assert!(
        openssl(&["verify", "-CAfile", &format!("{d}/ca/ca.crt"), &cert])
            .status
            .success()
    );
    let subject =
        String::from_utf8_lossy(&openssl(&["x509", "-in", &cert, "-noout", "-subject"]).stdout)
            .into_owned();
    assert!(
        subject.contains("bob") && !subject.contains("admin"),
        "{subject}"
    );
    // The certificate carries the laptop's public key.
    let from_cert = openssl(&["x509", "-in", &cert, "-noout", "-pubkey"]).stdout;
    let from_key = openssl(&["pkey", "-in", key.to_str().unwrap(), "-pubout"]).stdout;
    assert_eq!(from_cert, from_key);
}

#[test]
fn accounts_and_quotas_from_the_command_line() {
    let home = tempfile::tempdir().unwrap();
    let d = init(&home.path().join("store"));
    ok(store(&[
        "account", "add", "alice", "--store", &d, "--soft", "400M", "--hard", "500M",
    ]));
    let info: serde_json::Value = serde_json::from_str(&ok(store(&[
        "account", "info", "alice", "--store", &d, "--json",
    ])))
    .unwrap();
    assert_eq!(info["hard_limit"], 500 * 1024 * 1024);
    assert_eq!(info["used"], 0);
    ok(store(&[
        "account",
        "set-quota",
        "alice",
        "--store",
        &d,
        "--hard",
        "2G",
    ]));
    ok(store(&["account", "disable", "alice", "--store", &d]));
    let list: serde_json::Value =
        serde_json::from_str(&ok(store(&["account", "list", "--store", &d, "--json"]))).unwrap();
    assert_eq!(list[0]["hard_limit"], 2_u64 << 30);
    assert_eq!(list[0]["disabled"], true);
    for (args, needle) in [
        (
            vec!["account", "add", "../evil", "--store", &d],
            "invalid account name",
        ),
        (
            vec!["account", "info", "carol", "--store", &d],
            "no account named",
        ),
        (
            vec!["account", "add", "x", "--store", &d, "--hard", "5Q"],
            "unknown unit",
        ),
        (vec!["check", "--store", "/nonexistent"], "not a store"),
    ] {
        let out = store(&args);
        assert!(!out.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(text.contains(needle), "{args:?}: {text}");
    }
    let check: serde_json::Value =
        serde_json::from_str(&ok(store(&["check", "--store", &d, "--json"]))).unwrap();
    assert_eq!(check["damaged"], serde_json::json!([]));
}
