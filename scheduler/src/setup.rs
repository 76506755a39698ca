//! `homing init` and `homing quickstart`: setting a client up.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::cli::{
    BackupArgs, EnrollArgs, InitArgs, KeyCommand, NewPassphrase, QuickstartArgs, Unlock,
};
use crate::config::{BackupSet, Config, FILE_NAME, Priority, SealConfig, SpoolConfig, StoreConfig};
use crate::paths::Paths;
use crate::{commands, key};

/// `homing init`: copies the store's CA certificate and this client's certificate
/// and key into the configuration directory, writes `config.toml`, and creates
/// the master key (printing its paper form).
///
/// # Errors
/// An existing configuration or key, unreadable credentials, bad arguments.
pub fn init(paths: &Paths, args: InitArgs) -> anyhow::Result<ExitCode> {
    let config_file = paths.config.join(FILE_NAME);
    if config_file.exists() {
        bail!(
            "{} exists already: this client is set up (remove it to start over; the \
             master key stays)",
            config_file.display()
        );
    }
    let server_name = match args.server_name {
        Some(name) => name,
        None => host_of(&args.store)?,
    };
    create_private_dir(&paths.config)?;
    let request = match (&args.csr, &args.cert, &args.key, &args.ca) {
        (Some(out), _, _, ca) => {
            if let Some(ca) = ca {
                copy_credential(ca, &paths.config, "store-ca.crt", 0o644)?;
            }
            Some(make_request(&paths.config, out)?)
        }
        (None, Some(cert), Some(key), Some(ca)) => {
            let ca = copy_credential(ca, &paths.config, "store-ca.crt", 0o644)?;
            let certificate = copy_credential(cert, &paths.config, "client.crt", 0o644)?;
            let key_file = copy_credential(key, &paths.config, "client.key", 0o600)?;
            // The credentials must make a TLS configuration before anything else.
            homing_transfer::client::tls_config(&ca, &certificate, &key_file)?;
            None
        }
        _ => bail!("give --ca, --cert and --key, or --csr OUT for an air-gapped set-up"),
    };
    let mut sets = Vec::new();
    if !args.paths.is_empty() {
        let mut absolute = Vec::new();
        for path in &args.paths {
            absolute.push(std::path::absolute(path)?);
        }
        sets.push(BackupSet {
            name: "default".into(),
            paths: absolute,
            exclude: Vec::new(),
            priority: Priority::Normal,
            one_file_system: false,
            exclude_caches: true,
        });
    }
    let config = Config {
        store: StoreConfig {
            address: args.store.clone(),
            server_name,
            ca: "store-ca.crt".into(),
            certificate: "client.crt".into(),
            key: "client.key".into(),
        },
        spool: SpoolConfig::default(),
        seal: SealConfig::default(),
        sets,
    };
    if !paths.key_file().exists() {
        key::run(
            paths,
            KeyCommand::Generate {
                passphrase: args.passphrase,
                kdf_memory_mib: 64,
                kdf_passes: 3,
            },
        )?;
    } else {
        say!(
            "Keeping the existing master key {}.",
            paths.key_file().display()
        );
    }
    config.save(&paths.config)?;
    match request {
        Some(out) => say!(
            "\nWrote {}. Store: {}.\nThis client's key stays in {}. Take the request {} to \
             the store and sign it there:\n  homing-store ca sign {} --account NAME --store DIR \
             --out PREFIX\nthen bring back PREFIX.crt and PREFIX-ca.crt and run:\n  homing \
             enroll --cert PREFIX.crt --ca PREFIX-ca.crt",
            config_file.display(),
            args.store,
            paths.config.join("client.key").display(),
            out.display(),
            out.file_name().map_or_else(
                || out.display().to_string(),
                |n| n.to_string_lossy().into_owned()
            ),
        ),
        None => say!(
            "\nWrote {}. Store: {}.\nNext: `homing backup PATH` (or add [[set]] sections to \
             the configuration and run `homing backup`).",
            config_file.display(),
            args.store
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// Makes this client's key (in the configuration directory, mode 0600) and writes
/// a certificate request for it to `out`.
fn make_request(dir: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    // A key made by an earlier, interrupted `init --csr` is used again: a request
    // for it may be on its way to the CA already.
    let key_path = dir.join("client.key");
    let existing = match std::fs::read_to_string(&key_path) {
        Ok(pem) => Some(
            rcgen::KeyPair::from_pem(&pem)
                .with_context(|| format!("{} is not a private key", key_path.display()))?,
        ),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => {
            return Err(error).with_context(|| format!("cannot read {}", key_path.display()));
        }
    };
    let made = existing.is_none();
    let key = match existing {
        Some(key) => key,
        None => rcgen::KeyPair::generate().context("cannot make a key")?,
    };
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .context("cannot make a certificate request")?;
    // The CA ignores the subject (the account is the operator's word); this only
    // helps a person tell requests apart.
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("homing client on {host}"),
    );
    let request = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .context("cannot make a certificate request")?;
    if made {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_path)
            .with_context(|| format!("cannot create {}", key_path.display()))?;
        file.write_all(key.serialize_pem().as_bytes())
            .with_context(|| format!("cannot write {}", key_path.display()))?;
    }
    std::fs::write(out, request).with_context(|| format!("cannot write {}", out.display()))?;
    Ok(out.to_path_buf())
}

/// `homing enroll`: installs the certificate the CA signed for this client's key
/// (and the CA's certificate), after checking that they belong together.
///
/// # Errors
/// No configuration, a certificate for another key, unreadable files.
pub fn enroll(paths: &Paths, args: &EnrollArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&paths.config)?;
    let key_pem = std::fs::read_to_string(&config.store.key).with_context(|| {
        format!(
            "cannot read this client's key {}: was `homing init --csr` run here?",
            config.store.key.display()
        )
    })?;
    let key = rcgen::KeyPair::from_pem(&key_pem)
        .with_context(|| format!("{} is not a private key", config.store.key.display()))?;
    let cert_pem = std::fs::read_to_string(&args.cert)
        .with_context(|| format!("cannot read {}", args.cert.display()))?;
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("{}: not a PEM certificate: {e}", args.cert.display()))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| anyhow::anyhow!("{}: not a certificate: {e}", args.cert.display()))?;
    if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
        bail!(
            "{} is not for this client's key ({}): was the request signed from another \
             machine's `homing init --csr`? Nothing was changed.",
            args.cert.display(),
            config.store.key.display()
        );
    }
    let ca = args.ca.as_ref().unwrap_or(&config.store.ca);
    if !ca.exists() {
        bail!(
            "the store's CA certificate is missing ({}): pass --ca PREFIX-ca.crt",
            ca.display()
        );
    }
    signed_by(&der, ca).with_context(|| {
        format!(
            "{} was not issued by the store's CA ({}): was the request signed by another \
             store's `homing-store ca sign`, or is the CA file another store's? Nothing was \
             changed.",
            args.cert.display(),
            ca.display()
        )
    })?;
    if let Some(ca) = &args.ca {
        copy_credential(ca, &paths.config, "store-ca.crt", 0o644)?;
    }
    let certificate = copy_credential(&args.cert, &paths.config, "client.crt", 0o644)?;
    homing_transfer::client::tls_config(&config.store.ca, &certificate, &config.store.key)?;
    println!(
        "Enrolled: {} holds this client's certificate. Next: `homing backup PATH`.",
        certificate.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// Checks that `certificate` is a client certificate issued by the CA in
/// `ca_file`, valid now: what the store checks at every handshake, asked before
/// anything is written.
fn signed_by(certificate: &CertificateDer<'_>, ca_file: &Path) -> anyhow::Result<()> {
    let pem =
        std::fs::read(ca_file).with_context(|| format!("cannot read {}", ca_file.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&pem) {
        let ca =
            ca.map_err(|e| anyhow::anyhow!("{}: not a PEM certificate: {e}", ca_file.display()))?;
        roots
            .add(ca)
            .map_err(|e| anyhow::anyhow!("{}: not a CA certificate: {e}", ca_file.display()))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
    )
    .build()?;
    verifier.verify_client_cert(certificate, &[], rustls::pki_types::UnixTime::now())?;
    Ok(())
}

fn host_of(address: &str) -> anyhow::Result<String> {
    let host = match address.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => bail!("--store {address}: expected HOST:PORT"),
    };
    Ok(host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string())
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

fn copy_credential(from: &Path, dir: &Path, name: &str, mode: u32) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let bytes = std::fs::read(from).with_context(|| format!("cannot read {}", from.display()))?;
    let to = dir.join(name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&to)
        .with_context(|| format!("cannot write {}", to.display()))?;
    std::io::Write::write_all(&mut file, &bytes)
        .with_context(|| format!("cannot write {}", to.display()))?;
    Ok(to)
}

/// `homing quickstart PATH`: a store directory with its CA (made once), a store
/// server on loopback (started in the background unless one answers already), a
/// client set up against it with an unprotected key, and a backup of PATH.
///
/// # Errors
/// A missing `homing-store` binary, a store that does not start, a failed backup.
pub fn quickstart(paths: &Paths, args: &QuickstartArgs) -> anyhow::Result<ExitCode> {
    // With --json, stdout is the backup's JSON alone; the steps (and a new key's
    // paper form) are still shown, on stderr.
    crate::MESSAGES_TO_STDERR.store(args.json, std::sync::atomic::Ordering::Relaxed);
    let store_binary = find_store_binary()?;
    let store_dir = match &args.store_dir {
        Some(dir) => std::path::absolute(dir)?,
        None => dirs::data_local_dir()
            .context("no data directory (is HOME set?); pass --store-dir DIR")?
            .join("homing")
            .join("quickstart-store"),
    };
    let address = format!("127.0.0.1:{}", args.port);
    let config_file = paths.config.join(FILE_NAME);
    let account = "quickstart";
    let credentials = store_dir.join("client").join(account);
    if config_file.exists() {
        let config = Config::load(&paths.config)?;
        if config.store.address != address {
            bail!(
                "{} is set up for the store at {}; quickstart leaves it alone (pass \
                 --config DIR for a separate client)",
                config_file.display(),
                config.store.address
            );
        }
    }
    if !store_dir.join("ca").exists() {
        let d = store_dir.to_string_lossy().into_owned();
        say!("Creating a store in {d} ...");
        run_store(&store_binary, &["init", &d])?;
        run_store(&store_binary, &["account", "add", account, "--store", &d])?;
        std::fs::create_dir_all(store_dir.join("client"))?;
        run_store(
            &store_binary,
            &[
                "ca",
                "issue",
                account,
                "--store",
                &d,
                "--out",
                &credentials.to_string_lossy(),
            ],
        )?;
    }
    let pid = ensure_server(&store_binary, &store_dir, &address)?;
    if !config_file.exists() {
        let with = |suffix: &str| {
            let mut name = credentials.as_os_str().to_owned();
            name.push(suffix);
            PathBuf::from(name)
        };
        init(
            paths,
            InitArgs {
                store: address.clone(),
                server_name: Some("localhost".into()),
                ca: Some(with("-ca.crt")),
                cert: Some(with(".crt")),
                key: Some(with(".key")),
                csr: None,
                paths: Vec::new(),
                passphrase: NewPassphrase {
                    passphrase_file: None,
                    no_passphrase: true,
                },
            },
        )?;
    }
    // The set `quickstart` backs up the paths given (the store's own directory is
    // left out, should it lie below them).
    let mut config = Config::load(&paths.config)?;
    let mut absolute = Vec::new();
    for path in &args.paths {
        let path = std::path::absolute(path)?;
        if !path.exists() {
            bail!("{} does not exist", path.display());
        }
        absolute.push(path);
    }
    let mut exclude = Vec::new();
    exclude.push(format!("{}/", store_dir.display()));
    let shown = display_paths(&absolute);
    config.sets.retain(|s| s.name != "quickstart");
    config.sets.push(BackupSet {
        name: "quickstart".into(),
        paths: absolute,
        exclude,
        priority: Priority::Normal,
        one_file_system: false,
        exclude_caches: true,
    });
    config.save(&paths.config)?;
    say!("\nBacking up {shown} ...");
    let code = commands::backup(
        paths,
        &BackupArgs {
            set: Some("quickstart".into()),
            paths: Vec::new(),
            json: args.json,
            unlock: Unlock {
                passphrase_file: None,
            },
        },
    )?;
    let config_flag = match std::env::var_os("HOMING_CONFIG") {
        Some(_) => String::new(),
        None if paths.config != default_config() => {
            format!(" --config {}", paths.config.display())
        }
        None => String::new(),
    };
    if !args.json {
        println!(
            "\nThe store server runs in the background (pid {pid}, {address}, store {}).\n\
             Next:\n  \
             homing{config_flag} snapshots\n  \
             homing{config_flag} ls latest\n  \
             homing{config_flag} restore latest --target /tmp/homing-restore\n  \
             homing{config_flag} verify --read-data\n  \
             homing{config_flag} backup --set quickstart     # again: only changes travel\n\
             Stop the server with `kill {pid}`; `homing quickstart` starts it again.",
            store_dir.display()
        );
    }
    Ok(code)
}

fn default_config() -> PathBuf {
    dirs::config_dir().unwrap_or_default().join("homing")
}

fn display_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `homing-store` beside this binary (as cargo builds them), else on PATH.
fn find_store_binary() -> anyhow::Result<PathBuf> {
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        let beside = dir.join("homing-store");
        if beside.is_file() {
            return Ok(beside);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("homing-store");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!(
        "the store server `homing-store` is neither beside this binary nor on PATH: build it \
         with `cargo build --release -p homing-store`"
    )
}

fn run_store(binary: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(binary)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {}", binary.display()))?;
    if !out.status.success() {
        bail!(
            "homing-store {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Starts `homing-store serve` in the background unless the pid file names a
/// server that still answers; returns its pid.
fn ensure_server(binary: &Path, store_dir: &Path, address: &str) -> anyhow::Result<u32> {
    let pid_file = store_dir.join("serve.pid");
    if let Ok(text) = std::fs::read_to_string(&pid_file)
        && let Ok(pid) = text.trim().parse::<u32>()
        && TcpStream::connect_timeout(&address.parse()?, Duration::from_secs(1)).is_ok()
        && Path::new(&format!("/proc/{pid}")).exists()
    {
        return Ok(pid);
    }
    if TcpStream::connect_timeout(&address.parse()?, Duration::from_secs(1)).is_ok() {
        bail!("something else listens on {address}; pass --port with a free port");
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(store_dir.join("serve.log"))?;
    let mut command = Command::new(binary);
    command
        .args(["serve", "--store"])
        .arg(store_dir)
        .args(["--listen", address])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    // Its own process group: a Ctrl-C in this terminal does not stop it.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .context("the store server did not start")?;
    if !line.starts_with("listening on ") {
        let _ = child.kill();
        bail!(
            "the store server did not start; see {}",
            store_dir.join("serve.log").display()
        );
    }
    let pid = child.id();
    std::fs::write(&pid_file, format!("{pid}\n"))?;
    say!("Started the store server on {address} (pid {pid}).");
    Ok(pid)
}

/// `homing forget-set NAME`: new snapshots stop carrying the set. Its reference
/// tables and index go, and the next commit sends a whole list (without the set's
/// ids), so that the store's spans of them close and retention can free them.
///
/// # Errors
/// A set this client never committed; database errors.
pub fn forget_set(paths: &Paths, name: &str) -> anyhow::Result<ExitCode> {
    let db = crate::state::open(&paths.state)?;
    // Sets committed, and sets scanned whose data waits in the spool, never
    // committed.
    let mut known: std::collections::BTreeSet<String> =
        crate::state::set_heads(&db)?.into_keys().collect();
    known.extend(crate::state::scanned_sets(&db)?);
    if !known.contains(name) {
        let known: Vec<&str> = known.iter().map(String::as_str).collect();
        bail!(
            "no set `{name}` was ever backed up by this client (it has: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
    }
    let mut spool = crate::spool::Spool::open(&db, &paths.state)?;
    let txn = db.begin_write()?;
    txn.open_table(crate::state::SETS)?.remove(name)?;
    for table in [0, 1] {
        let table_name = crate::state::refs_table_name(name, table);
        txn.delete_table(crate::state::refs_table(&table_name))?;
    }
    let index = crate::state::index_name(name);
    txn.delete_table(crate::state::index_table(&index))?;
    crate::state::set_refs_head(&txn, None)?;
    // What the set sealed and never uploaded would otherwise still go, over
    // whatever link, for nothing. (The spool was opened before this transaction:
    // opening it may write.)
    let unneeded = crate::spool::referenced_by_no_set(&txn)?;
    let (dropped, emptied) = spool.release(&txn, &unneeded)?;
    txn.commit()?;
    spool.delete_emptied(&emptied)?;
    println!(
        "Set `{name}` is forgotten: the next snapshot no longer carries it, and once \
         retention drops the snapshots that do, the store frees its data."
    );
    if !unneeded.is_empty() {
        println!(
            "{} objects ({}) that only it had left in the spool were dropped: they will not \
             be uploaded.",
            unneeded.len(),
            crate::commands::human_bytes(dropped)
        );
    }
    if Config::load(&paths.config).is_ok_and(|c| c.sets.iter().any(|s| s.name == name)) {
        println!(
            "It is still in {}: remove it there, or the next backup makes it again.",
            paths.config.join(FILE_NAME).display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
