//! `homing backup` and `homing restore` end to end: a real store server on
//! loopback, a client set up with `homing init`, real files.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, SystemTime};

use homing_e2e::{binary, init_args};

use super::{homing, homing_store as store_cmd, ok, stderr, stdout};

/// A store directory with one account, its server, and a client set up for it.
struct Rig {
    home: tempfile::TempDir,
    store: PathBuf,
    config: PathBuf,
    server: Option<Child>,
}

impl Rig {
    fn new(hard_quota: &str) -> Self {
        let home = tempfile::tempdir().expect("a temporary directory");
        let store = home.path().join("store");
        let config = home.path().join("client");
        let s = store.to_str().expect("UTF-8");
        store_cmd(&["init", s]);
        store_cmd(&[
            "account", "add", "laptop", "--store", s, "--hard", hard_quota,
        ]);
        let prefix = home.path().join("laptop");
        let p = prefix.to_str().expect("UTF-8");
        store_cmd(&["ca", "issue", "laptop", "--store", s, "--out", p]);
        let mut rig = Self {
            home,
            store,
            config,
            server: None,
        };
        let address = rig.start();
        ok(homing(&rig.config, &init_args(&address, "localhost", p)));
        rig
    }

    fn dir(&self, name: &str) -> PathBuf {
        let dir = self.home.path().join(name);
        fs::create_dir_all(&dir).expect("a directory");
        dir
    }

    /// Starts the server (on a new port) and points the client at it.
    fn start(&mut self) -> String {
        self.stop();
        let log = fs::File::create(self.home.path().join("serve.log")).expect("a log file");
        let (child, address) = super::serve(&self.store, "debug", Some(log));
        let address = address.to_string();
        self.server = Some(child);
        let config_file = self.config.join("config.toml");
        if let Ok(text) = fs::read_to_string(&config_file) {
            let text: String = text
                .lines()
                .map(|line| {
                    if line.starts_with("address = ") {
                        format!("address = \"{address}\"\n")
                    } else {
                        format!("{line}\n")
                    }
                })
                .collect();
            fs::write(&config_file, text).expect("the config is rewritten");
        }
        address
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Writes a network policy file `name` into the client's policy directory
    /// (made if missing); returns the directory.
    fn policy(&self, name: &str, text: &str) -> PathBuf {
        let policies = self.config.join("policies");
        fs::create_dir_all(&policies).expect("the policy directory");
        fs::write(policies.join(name), text).expect("a policy file");
        policies
    }

    /// `homing report --json`.
    fn report(&self) -> serde_json::Value {
        serde_json::from_str(&ok(self.homing(&["report", "--json"]))).expect("a JSON report")
    }

    /// Adds a backup set to the client's configuration.
    fn add_set(&self, name: &str, path: &Path, priority: &str) {
        let file = self.config.join("config.toml");
        let mut config = fs::read_to_string(&file).expect("the configuration");
        config.push_str(&format!(
            "\n[[set]]\nname = \"{name}\"\npaths = [\"{}\"]\npriority = \"{priority}\"\n",
            path.display()
        ));
        fs::write(file, config).expect("the configuration is written");
    }

    fn homing(&self, args: &[&str]) -> Output {
        homing(&self.config, args)
    }

    /// Backs up `paths` and returns the JSON summary.
    fn backup(&self, paths: &[&Path]) -> serde_json::Value {
        let out = self.backup_output(paths);
        assert!(
            out.status.success(),
            "backup failed: {}\n{}",
            out.status,
            stderr(&out)
        );
        summary(&out)
    }

    fn backup_output(&self, paths: &[&Path]) -> Output {
        let mut args = vec!["backup", "--json"];
        for path in paths {
            args.push(path.to_str().expect("UTF-8"));
        }
        self.homing(&args)
    }

    /// Starts `homing daemon` (hourly schedule) on this client.
    fn daemon(&self) -> Child {
        Command::new(binary("homing"))
            .arg("--config")
            .arg(&self.config)
            .args(["daemon", "--interval-minutes", "60"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the daemon starts")
    }

    /// `homing status --json` (null while no daemon answers).
    fn daemon_status(&self) -> serde_json::Value {
        let out = self.homing(&["status", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// Waits until the daemon has finished `runs` runs and is idle; its status.
    fn after_runs(&self, runs: u64) -> serde_json::Value {
        // Up to a minute: a busy machine can be slow, and this returns as soon as
        // the run is done.
        for _ in 0..600 {
            let now = self.daemon_status();
            if now["runs"].as_u64().is_some_and(|r| r >= runs) && now["running"] == false {
                return now;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "the daemon did not finish run {runs}: {}",
            self.daemon_status()
        );
    }

    /// Sets `[seal] threads` in the client's configuration (`None`: the default,
    /// every core but one, which on a machine of two cores is one).
    fn set_sealing_threads(&self, threads: Option<u32>) {
        let file = self.config.join("config.toml");
        let text = fs::read_to_string(&file).expect("the configuration");
        // The section is only ever added at the end, by this.
        let mut text = match text.find("\n[seal]\n") {
            Some(at) => text[..at].to_string(),
            None => text,
        };
        if let Some(threads) = threads {
            text.push_str(&format!("\n[seal]\nthreads = {threads}\n"));
        }
        fs::write(&file, text).expect("the configuration is written");
    }

    fn restore(&self, snapshot: &str, target: &Path) -> Output {
        self.homing(&[
            "restore",
            snapshot,
            "--target",
            target.to_str().expect("UTF-8"),
            "--json",
        ])
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop();
    }
}

fn summary(out: &Output) -> serde_json::Value {
    let all: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("JSON summary ({e}): {}", stdout(out)));
    all[0].clone()
}

fn snapshot_of(summary: &serde_json::Value) -> String {
    summary["snapshot"]
        .as_str()
        .expect("a snapshot id")
        .to_string()
}

/// A deterministic byte stream (xorshift), compressible when `text` is set.
fn bytes(seed: u64, len: usize, text: bool) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let words: [&[u8]; 6] = [b"backup ", b"home ", b"laptop ", b"store ", b"link ", b"\n"];
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        if text {
            out.extend_from_slice(words[(state % 6) as usize]);
        } else {
            out.extend_from_slice(&state.to_le_bytes());
        }
    }
    out.truncate(len);
    out
}

/// A test that needs what this process lacks (root, a mount) returns after
/// saying so, unless `HOMING_REQUIRE_MOUNTS` is set (as CI sets it, running as
/// root): there it must run, and fails instead.
fn skip(why: &str) {
    assert!(
        std::env::var_os("HOMING_REQUIRE_MOUNTS").is_none(),
        "{why}, and HOMING_REQUIRE_MOUNTS is set"
    );
    eprintln!("skipped: {why}");
}

fn is_root() -> bool {
    // The uid of this process, without a libc dependency: /proc/self is owned by it.
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// What a tree holds, as far as a restore must reproduce it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Item {
    kind: &'static str,
    mode: u32,
    mtime: Option<(i64, i64)>,
    owner: Option<(u32, u32)>,
    size: u64,
    hash: Option<[u8; 32]>,
    target: Option<Vec<u8>>,
    /// The first path (in walk order) sharing this file's inode.
    link: Option<Vec<u8>>,
}

fn describe(root: &Path) -> BTreeMap<Vec<u8>, Item> {
    let mut items = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), Vec<u8>> = BTreeMap::new();
    walk(root, b"", &mut items, &mut inodes);
    items
}

fn walk(
    path: &Path,
    rel: &[u8],
    items: &mut BTreeMap<Vec<u8>, Item>,
    inodes: &mut BTreeMap<(u64, u64), Vec<u8>>,
) {
    let meta = fs::symlink_metadata(path).expect("stat");
    let kind = meta.file_type();
    let owner = is_root().then(|| (meta.uid(), meta.gid()));
    let mut item = Item {
        kind: "",
        mode: meta.mode() & 0o7777,
        mtime: Some((meta.mtime(), meta.mtime_nsec())),
        owner,
        size: 0,
        hash: None,
        target: None,
        link: None,
    };
    if kind.is_dir() {
        item.kind = "dir";
        let mut names: Vec<_> = fs::read_dir(path)
            .expect("a readable directory")
            .map(|e| e.expect("an entry").file_name())
            .collect();
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            let mut child_rel = rel.to_vec();
            child_rel.push(b'/');
            child_rel.extend_from_slice(name.as_bytes());
            walk(&path.join(&name), &child_rel, items, inodes);
        }
    } else if kind.is_symlink() {
        item.kind = "symlink";
        item.mode = 0;
        item.target = Some(
            fs::read_link(path)
                .expect("a link")
                .as_os_str()
                .as_bytes()
                .to_vec(),
        );
    } else if kind.is_file() {
        item.kind = "file";
        item.size = meta.len();
        if meta.mode() & 0o444 != 0 || is_root() {
            item.hash = Some(*blake3::hash(&fs::read(path).expect("readable")).as_bytes());
        }
        if meta.nlink() > 1 {
            let first = inodes
                .entry((meta.dev(), meta.ino()))
                .or_insert_with(|| rel.to_vec());
            item.link = Some(first.clone());
        }
    } else {
        item.kind = "other";
        item.mtime = Some((meta.mtime(), meta.mtime_nsec()));
    }
    items.insert(rel.to_vec(), item);
}

/// Where a restore puts `source` below `target`.
fn restored(target: &Path, source: &Path) -> PathBuf {
    target.join(source.strip_prefix("/").expect("absolute"))
}

fn set_mtime(path: &Path, seconds_ago: u64) {
    let when = SystemTime::now() - Duration::from_secs(seconds_ago);
    let file = fs::File::open(path).expect("open for times");
    file.set_modified(when).expect("set the mtime");
}

/// The tree the issue names: empty files, a large file, a sparse file, odd names,
/// deep nesting, symlinks, hard links, a FIFO, modes, times (and owners as root).
fn build_tree(root: &Path, big: usize) {
    fs::create_dir_all(root).expect("the test tree is built");
    fs::write(root.join("empty"), b"").expect("the test tree is built");
    fs::write(root.join("big.bin"), {
        let mut data = bytes(1, big / 2, false);
        data.extend(bytes(2, big - big / 2, true));
        data
    })
    .expect("the test tree is built");
    let sparse = fs::File::create(root.join("sparse")).expect("the test tree is built");
    sparse.set_len(30 << 20).expect("the test tree is built");
    {
        use std::io::{Seek, SeekFrom};
        let mut sparse = sparse;
        sparse
            .seek(SeekFrom::Start(10 << 20))
            .expect("the test tree is built");
        sparse
            .write_all(b"an island in the hole")
            .expect("the test tree is built");
    }
    fs::write(root.join("ünïcødé ☃.txt"), "snow\n").expect("the test tree is built");
    fs::write(root.join("line\nbreak"), "newline in the name\n").expect("the test tree is built");
    fs::write(
        root.join(OsStr::from_bytes(b"bad-\xff\xfe-utf8")),
        "latin1\n",
    )
    .expect("the test tree is built");
    let mut deep = root.join("deep");
    for level in 0..40 {
        deep.push(format!("level{level}"));
    }
    fs::create_dir_all(&deep).expect("the test tree is built");
    fs::write(deep.join("leaf.txt"), "deep down\n").expect("the test tree is built");
    std::os::unix::fs::symlink("empty", root.join("link-to-empty"))
        .expect("the test tree is built");
    std::os::unix::fs::symlink("does/not/exist", root.join("dangling"))
        .expect("the test tree is built");
    std::os::unix::fs::symlink("deep", root.join("link-to-dir")).expect("the test tree is built");
    fs::write(root.join("hard1"), bytes(3, 5000, true)).expect("the test tree is built");
    fs::hard_link(root.join("hard1"), root.join("hard2")).expect("the test tree is built");
    let fifo = Command::new("mkfifo").arg(root.join("fifo")).status();
    assert!(fifo.expect("mkfifo runs").success());
    fs::write(root.join("script.sh"), "#!/bin/sh\necho hi\n").expect("the test tree is built");
    fs::set_permissions(root.join("script.sh"), fs::Permissions::from_mode(0o750))
        .expect("the test tree is built");
    fs::create_dir(root.join("private")).expect("the test tree is built");
    fs::write(root.join("private/secret"), "s3cret\n").expect("the test tree is built");
    set_mtime(&root.join("private/secret"), 86_400 * 400);
    fs::set_permissions(root.join("private"), fs::Permissions::from_mode(0o700))
        .expect("the test tree is built");
    if is_root() {
        std::os::unix::fs::chown(root.join("script.sh"), Some(1234), Some(5678))
            .expect("the test tree is built");
    }
    set_mtime(&root.join("big.bin"), 3600);
}

fn assert_same(expected: &BTreeMap<Vec<u8>, Item>, actual: &BTreeMap<Vec<u8>, Item>) {
    for (path, item) in expected {
        let name = String::from_utf8_lossy(path);
        let got = actual
            .get(path)
            .unwrap_or_else(|| panic!("{name} is missing after restore"));
        assert_eq!(got, item, "{name}");
    }
    for path in actual.keys() {
        assert!(
            expected.contains_key(path),
            "{} appeared from nowhere",
            String::from_utf8_lossy(path)
        );
    }
}

#[test]
fn two_snapshots_restore_identically_to_their_states() {
    let rig = Rig::new("0");
    // The first backup seals the 100 MB file in the parallel pipeline, which a
    // machine of two cores does not use by default (every core but one seals:
    // one); the second, with the default, on the walking thread. Both cut the
    // same chunks, so the second sends only what changed.
    rig.set_sealing_threads(Some(3));
    let src = rig.dir("src");
    build_tree(&src, 100 << 20);
    let unreadable = src.join("unreadable");
    fs::write(&unreadable, "no entry\n").unwrap();
    fs::set_permissions(&unreadable, fs::Permissions::from_mode(0o000)).unwrap();
    let mut first_state = describe(&src);
    let first = rig.backup_output(&[&src]);
    let first_summary = summary(&first);
    if is_root() {
        // Root reads everything: the file is backed up like any other.
        assert!(first.status.success(), "{}", stderr(&first));
    } else {
        // Everything else was backed up; the run says which file it could not read.
        assert_eq!(first.status.code(), Some(3), "{}", stderr(&first));
        assert_eq!(first_summary["unreadable"], 1);
        assert!(
            first_summary["problems"][0]
                .as_str()
                .unwrap()
                .contains("unreadable")
        );
        first_state.remove(b"/unreadable".as_slice());
    }
    let first_id = snapshot_of(&first_summary);
    assert!(first_summary["bytes_read"].as_u64().unwrap() >= 100 << 20);
    rig.set_sealing_threads(None);

    // The second state: edits, a deletion, a new file, a renamed directory, a mode
    // change, a change in the middle of the large file.
    fs::set_permissions(&unreadable, fs::Permissions::from_mode(0o644)).unwrap();
    fs::remove_file(&unreadable).unwrap();
    let mut log = fs::OpenOptions::new()
        .append(true)
        .open(src.join("ünïcødé ☃.txt"))
        .unwrap();
    log.write_all(b"more snow\n").unwrap();
    fs::remove_file(src.join("empty")).unwrap();
    fs::write(src.join("new.txt"), bytes(9, 100_000, true)).unwrap();
    fs::rename(src.join("private"), src.join("renamed")).unwrap();
    fs::set_permissions(src.join("script.sh"), fs::Permissions::from_mode(0o700)).unwrap();
    {
        use std::io::{Seek, SeekFrom};
        let mut big = fs::OpenOptions::new()
            .write(true)
            .open(src.join("big.bin"))
            .unwrap();
        big.seek(SeekFrom::Start(50 << 20)).unwrap();
        big.write_all(&[0xAA; 100]).unwrap();
    }
    set_mtime(&src.join("big.bin"), 60);
    let second_state = describe(&src);
    let second_summary = rig.backup(&[&src]);
    let second_id = snapshot_of(&second_summary);
    // Only what changed was read: the new file, the edited ones, not the rest.
    assert!(
        second_summary["files_unchanged"].as_u64().unwrap() >= 6,
        "{second_summary}"
    );
    let big_read = second_summary["bytes_read"].as_u64().unwrap();
    assert!(big_read < (100 << 20) + (1 << 20), "{second_summary}");
    // 100 bytes in the middle of a 100 MB file: a chunk or two travel, not the file.
    assert!(
        second_summary["bytes_uploaded"].as_u64().unwrap() < 2 << 20,
        "{second_summary}"
    );

    for (id, state) in [(&first_id, &first_state), (&second_id, &second_state)] {
        let target = rig.dir(&format!("restore-{}", &id[..8]));
        let out = rig.restore(id, &target);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_same(state, &describe(&restored(&target, &src)));
    }
    // The sparse file stays sparse.
    let target = rig.home.path().join(format!("restore-{}", &second_id[..8]));
    let sparse = fs::metadata(restored(&target, &src).join("sparse")).unwrap();
    assert!(
        sparse.blocks() * 512 < 1 << 20,
        "{} blocks",
        sparse.blocks()
    );

    // A prefix of the id and `latest` name snapshots; a path restores alone.
    let part = rig.dir("part");
    let leaf = src.join("renamed/secret");
    let out = rig.homing(&[
        "restore",
        &second_id[..10],
        leaf.to_str().unwrap(),
        "--target",
        part.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        fs::read(restored(&part, &leaf)).unwrap(),
        b"s3cret\n".to_vec()
    );

    // The listing has both snapshots; ls shows the odd names.
    let list: serde_json::Value =
        serde_json::from_str(&ok(rig.homing(&["snapshots", "--json"]))).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    let ls = ok(rig.homing(&["ls", "latest", src.to_str().unwrap()]));
    assert!(
        ls.contains("ünïcødé ☃.txt") && ls.contains("new.txt"),
        "{ls}"
    );
    let verify = ok(rig.homing(&["verify", "--read-data"]));
    assert!(verify.contains("0 problems"), "{verify}");
}

/// A small file system mounted for a test, unmounted when dropped.
struct Mounted(PathBuf);

impl Mounted {
    /// A tmpfs of `size` (as `mount` takes it) at `dir`; `None` where this process
    /// may not mount (not root, or a container without the capability).
    fn tmpfs(dir: &Path, size: &str) -> Option<Self> {
        if !is_root() {
            return None;
        }
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .ok()?;
        status.success().then(|| Self(dir.to_path_buf()))
    }

    fn resize(&self, size: &str) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .expect("mount runs");
        assert!(
            status.success(),
            "cannot resize the tmpfs at {}",
            self.0.display()
        );
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Busy: detach it, so that the test's directory can go.
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// The backup failed on its full spool, saying so (ENOSPC, whatever the locale
/// says of it), and did not take the full disk for files it could not read.
fn assert_stopped_by_a_full_spool(out: &Output) {
    let err = stderr(out);
    assert!(
        !out.status.success() && out.status.code() != Some(3),
        "{err}"
    );
    assert!(
        err.contains("spool file") && err.contains("os error 28"),
        "{err}"
    );
    assert!(!err.contains("cannot read"), "{err}");
}

#[test]
fn a_full_disk_under_the_spool_stops_the_backup_and_leaves_no_file_out() {
    let rig = Rig::new("0");
    let spool = rig.config.join("state/spool");
    fs::create_dir_all(&spool).unwrap();
    let Some(mounted) = Mounted::tmpfs(&spool, "4m") else {
        skip("mounting a small file system for the spool needs root");
        return;
    };
    // 12 MiB that does not compress, for a spool with room for 4: a large file
    // (sealed first, its name sorts first) and small ones.
    let src = rig.dir("src");
    fs::write(src.join("a-disk.img"), bytes(69, 9 << 20, false)).unwrap();
    for n in 0..3 {
        fs::write(
            src.join(format!("photo{n}.jpg")),
            bytes(70 + n, 1 << 20, false),
        )
        .unwrap();
    }
    let state = describe(&src);
    // The backup stops and says why; it does not take the full disk for files it
    // could not read, which would leave them out of a snapshot. Both ways a large
    // file is sealed: in the parallel pipeline, and on the walking thread.
    for threads in [Some(2), None] {
        rig.set_sealing_threads(threads);
        assert_stopped_by_a_full_spool(&rig.backup_output(&[&src]));
    }
    // With room again, the next run backs everything up.
    mounted.resize("64m");
    let summary = rig.backup(&[&src]);
    assert_eq!(summary["unreadable"], 0, "{summary}");
    let target = rig.dir("restored");
    let out = rig.restore(&snapshot_of(&summary), &target);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same(&state, &describe(&restored(&target, &src)));
}

#[test]
fn an_interrupted_restore_continues_without_fetching_again() {
    let rig = Rig::new("0");
    let src = rig.dir("src");
    for n in 0..20 {
        fs::write(src.join(format!("file{n}")), bytes(n, 300_000, false)).unwrap();
    }
    let state = describe(&src);
    rig.backup(&[&src]);
    let target = rig.dir("target");
    let first: serde_json::Value =
        serde_json::from_slice(&rig.restore("latest", &target).stdout).unwrap();
    assert_eq!(first["files_restored"], 20);
    // Half of it "lost" in an interruption; one file half-written.
    for n in 0..10 {
        fs::remove_file(restored(&target, &src).join(format!("file{n}"))).unwrap();
    }
    fs::write(restored(&target, &src).join("file10"), b"half").unwrap();
    let again: serde_json::Value =
        serde_json::from_slice(&rig.restore("latest", &target).stdout).unwrap();
    assert_eq!(again["files_restored"], 11, "{again}");
    assert_eq!(again["files_in_place"], 9, "{again}");
    assert!(
        again["bytes_received"].as_u64().unwrap() < 12 * 300_000,
        "{again}"
    );
    assert_same(&state, &describe(&restored(&target, &src)));
}

#[test]
fn a_full_store_keeps_what_was_sealed_and_the_next_run_completes() {
    let rig = Rig::new("2M");
    let src = rig.dir("src");
    fs::write(src.join("a"), bytes(1, 3 << 20, false)).unwrap();
    fs::write(src.join("b"), bytes(2, 1 << 20, false)).unwrap();
    let state = describe(&src);
    let out = rig.backup_output(&[&src]);
    assert!(!out.status.success());
    let error = stderr(&out);
    assert!(error.contains("the store is full"), "{error}");
    assert!(error.contains("stay in the spool"), "{error}");
    store_cmd(&[
        "account",
        "set-quota",
        "laptop",
        "--store",
        rig.store.to_str().unwrap(),
        "--hard",
        "0",
    ]);
    let done = rig.backup(&[&src]);
    // Nothing was read twice: what the first run sealed waited in the spool.
    assert_eq!(done["bytes_read"], 0, "{done}");
    let target = rig.dir("target");
    assert!(rig.restore("latest", &target).status.success());
    assert_same(&state, &describe(&restored(&target, &src)));
}

#[test]
fn a_store_rolled_back_to_an_old_copy_is_detected() {
    let mut rig = Rig::new("0");
    let src = rig.dir("src");
    fs::write(src.join("a"), "one\n").unwrap();
    rig.backup(&[&src]);
    rig.stop();
    let copy = rig.home.path().join("store-copy");
    let status = Command::new("cp")
        .arg("-a")
        .arg(&rig.store)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    rig.start();
    fs::write(src.join("a"), "two\n").unwrap();
    rig.backup(&[&src]);
    rig.stop();
    fs::remove_dir_all(&rig.store).unwrap();
    fs::rename(&copy, &rig.store).unwrap();
    rig.start();
    for args in [&["snapshots"][..], &["backup", src.to_str().unwrap()]] {
        let out = rig.homing(args);
        assert!(!out.status.success(), "{args:?} accepted an old store");
        assert!(stderr(&out).contains("rollback"), "{}", stderr(&out));
    }
    // Nothing was committed on top of the old head.
    let usage = store_cmd(&[
        "account",
        "info",
        "laptop",
        "--store",
        rig.store.to_str().unwrap(),
        "--json",
    ]);
    let info: serde_json::Value = serde_json::from_str(&usage).unwrap();
    assert_eq!(info["snapshots"], 1, "{info}");
}

#[test]
fn the_store_holds_no_names_contents_or_plain_hashes() {
    let mut rig = Rig::new("0");
    let src = rig.dir("src");
    let canary = "CANARY-7c1e5b0d-homing";
    let name = "zebra-orchid-canary-name.txt";
    let content = format!("{canary} {}\n", "the quick brown fox ".repeat(50));
    fs::write(src.join(name), &content).unwrap();
    fs::create_dir(src.join("quokka-canary-dir")).unwrap();
    let plain_file = bytes(5, 200_000, false);
    fs::write(src.join("quokka-canary-dir/data.bin"), &plain_file).unwrap();
    rig.backup(&[&src]);
    rig.stop();

    let mut needles: Vec<(String, Vec<u8>)> = vec![
        ("canary".into(), canary.as_bytes().to_vec()),
        ("file name".into(), name.as_bytes().to_vec()),
        ("dir name".into(), b"quokka-canary-dir".to_vec()),
        ("content".into(), plain_file[1000..1064].to_vec()),
    ];
    for (what, data) in [("text", content.as_bytes()), ("binary", &plain_file[..])] {
        let b3 = blake3::hash(data);
        needles.push((format!("BLAKE3 of {what}"), b3.as_bytes().to_vec()));
        needles.push((
            format!("BLAKE3 hex of {what}"),
            b3.to_hex().as_bytes().to_vec(),
        ));
        let mut sha = Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        sha.stdin.take().unwrap().write_all(data).unwrap();
        let hex = String::from_utf8(sha.wait_with_output().unwrap().stdout).unwrap();
        let hex = hex.split_whitespace().next().unwrap().to_string();
        let raw: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        needles.push((format!("SHA-256 of {what}"), raw));
        needles.push((format!("SHA-256 hex of {what}"), hex.into_bytes()));
    }
    let mut files = vec![rig.home.path().join("serve.log")];
    let mut stack = vec![rig.store.clone()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    assert!(files.len() > 3);
    for file in files {
        let data = fs::read(&file).unwrap();
        for (what, needle) in &needles {
            assert!(
                !data.windows(needle.len()).any(|w| w == needle.as_slice()),
                "{} contains the {what}",
                file.display()
            );
        }
    }
}

#[test]
fn tampered_objects_fail_restore_and_verify_and_write_no_wrong_bytes() {
    let mut rig = Rig::new("0");
    let src = rig.dir("src");
    for n in 0..6 {
        fs::write(src.join(format!("file{n}")), bytes(n, 400_000, false)).unwrap();
    }
    let state = describe(&src);
    rig.backup(&[&src]);
    rig.stop();
    // Flip one byte in the middle of every segment file.
    let segments = rig.store.join("segments");
    let mut flipped = 0;
    for entry in fs::read_dir(&segments).unwrap() {
        let path = entry.unwrap().path();
        let mut data = fs::read(&path).unwrap();
        if data.len() > 1000 {
            let middle = data.len() / 2;
            data[middle] ^= 0x01;
            fs::write(&path, data).unwrap();
            flipped += 1;
        }
    }
    assert!(flipped > 0);
    rig.start();
    let verify = rig.homing(&["verify", "--read-data"]);
    assert_eq!(verify.status.code(), Some(3), "{}", stderr(&verify));
    let report = stdout(&verify);
    // The store finds the flipped bit itself (it keeps a hash of what it wrote);
    // either way the object and its file are named.
    assert!(
        (report.contains("does not authenticate") || report.contains("damaged"))
            && report.contains("object ")
            && report.contains("/file"),
        "{report}"
    );
    let target = rig.dir("target");
    let out = rig.restore("latest", &target);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let failures = summary["failures"].as_array().unwrap();
    assert!(!failures.is_empty());
    let failure = failures[0].as_str().unwrap();
    assert!(
        failure.contains("/file") && failure.contains("object "),
        "{failure}"
    );
    // Whatever was written is right; what failed is absent, not wrong.
    let restored_state = describe(&restored(&target, &src));
    for (path, item) in &restored_state {
        if item.kind == "file" {
            assert_eq!(
                Some(item),
                state.get(path),
                "{}",
                String::from_utf8_lossy(path)
            );
        }
    }
    let leftovers: Vec<_> = fs::read_dir(restored(&target, &src))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains("homing-restore"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A small seeded generator for the kill test's choices.
struct Dice(u64);

impl Dice {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

#[test]
fn backups_killed_at_random_points_complete_and_every_snapshot_restores() {
    let rig = Rig::new("0");
    let src = rig.dir("src");
    let mut dice = Dice(0x2026_1127);
    let size = |n: u64| {
        if n < 2 {
            2 << 20
        } else {
            10_000 + (n * 6151) % 190_000
        }
    };
    for n in 0..30 {
        fs::write(
            src.join(format!("f{n:02}")),
            bytes(n, size(n) as usize, n % 3 == 0),
        )
        .unwrap();
    }
    let mut snapshots = vec![(snapshot_of(&rig.backup(&[&src])), describe(&src))];
    for round in 0..30_u64 {
        // Three files rewritten, sometimes one added.
        let mut touched = 0;
        for _ in 0..3 {
            let n = dice.next(30);
            let data = bytes(1000 + round * 10 + n, size(n) as usize, n.is_multiple_of(3));
            touched += data.len() as u64;
            fs::write(src.join(format!("f{n:02}")), data).unwrap();
        }
        if round.is_multiple_of(4) {
            let data = bytes(5000 + round, 50_000, true);
            touched += data.len() as u64;
            fs::write(src.join(format!("new{round:02}")), data).unwrap();
        }
        let state = describe(&src);
        let mut victim = Command::new(binary("homing"))
            .arg("--config")
            .arg(&rig.config)
            .args(["backup", "--json"])
            .arg(&src)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(dice.next(400)));
        let _ = victim.kill();
        let _ = victim.wait();
        let summary = rig.backup(&[&src]);
        let read = summary["bytes_read"].as_u64().unwrap();
        assert!(
            read <= touched,
            "round {round}: read {read} bytes, only {touched} changed: {summary}"
        );
        snapshots.push((snapshot_of(&summary), state));
    }
    for (id, state) in &snapshots {
        let target = rig.home.path().join(format!("r-{id}"));
        let out = rig.restore(id, &target);
        assert!(out.status.success(), "{id}: {}", stderr(&out));
        assert_same(state, &describe(&restored(&target, &src)));
        fs::remove_dir_all(&target).unwrap();
    }
}

#[test]
fn unreadable_files_are_named_and_skipped_and_the_rest_is_backed_up() {
    let rig = Rig::new("0");
    let src = rig.dir("src");
    fs::write(src.join("readable"), "fine\n").unwrap();
    fs::write(src.join("locked"), "secret\n").unwrap();
    fs::set_permissions(src.join("locked"), fs::Permissions::from_mode(0o000)).unwrap();
    fs::create_dir(src.join("closed")).unwrap();
    fs::write(src.join("closed/inner"), "inside\n").unwrap();
    fs::set_permissions(src.join("closed"), fs::Permissions::from_mode(0o000)).unwrap();
    let out = if is_root() {
        // Root reads everything: the client runs as nobody, who owns the client's
        // files and the tree, so that only the permissions say no.
        fs::set_permissions(rig.home.path(), fs::Permissions::from_mode(0o755)).unwrap();
        for path in [&rig.config, &src] {
            let status = Command::new("chown")
                .args(["-R", "65534:65534"])
                .arg(path)
                .status()
                .unwrap();
            assert!(status.success());
        }
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(binary("homing"))
            .arg("--config")
            .arg(&rig.config)
            .args(["backup", "--json"])
            .arg(&src)
            .env_remove("RUST_LOG")
            .output()
            .expect("setpriv runs")
    } else {
        rig.backup_output(&[&src])
    };
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let summary = summary(&out);
    assert_eq!(summary["unreadable"], 2, "{summary}");
    let problems = summary["problems"].to_string();
    assert!(
        problems.contains("/locked") && problems.contains("/closed"),
        "{problems}"
    );
    assert!(summary["snapshot"].is_string(), "{summary}");
    let target = rig.dir("target");
    let restored_out = rig.restore("latest", &target);
    assert!(restored_out.status.success(), "{}", stderr(&restored_out));
    let root = restored(&target, &src);
    assert_eq!(fs::read(root.join("readable")).unwrap(), b"fine\n");
    assert!(!root.join("locked").exists() && !root.join("closed").exists());
}

#[test]
fn one_new_file_in_a_thousand_costs_a_few_kilobytes_on_the_wire() {
    let rig = Rig::new("0");
    let src = rig.dir("src");
    for d in 0..50 {
        let dir = src.join(format!("dir{d:02}"));
        fs::create_dir(&dir).unwrap();
        for f in 0..20 {
            fs::write(
                dir.join(format!("file{f:02}")),
                bytes(d * 100 + f, 1000, false),
            )
            .unwrap();
        }
    }
    let first = rig.backup(&[&src]);
    // The first commit lists every id; the next ones only what changed.
    assert!(first["bytes_sent"].as_u64().unwrap() > 1000 * 32, "{first}");
    fs::write(src.join("dir07/new"), bytes(7777, 1000, false)).unwrap();
    let second = rig.backup(&[&src]);
    assert_eq!(second["files_changed"], 1, "{second}");
    // All the connection cost, its TLS handshake included.
    let sent = second["connection_sent"].as_u64().unwrap();
    // Handshake, query, the file's chunk, three trees, the manifest, a delta
    // commit: well under the 8 KiB the issue allows.
    assert!(sent < 8 * 1024, "{second}");
}

#[test]
fn retention_and_garbage_collection_free_what_no_kept_snapshot_needs() {
    let mut rig = Rig::new("0");
    let src = rig.dir("src");
    let store = rig.store.to_str().unwrap().to_string();
    let info = || -> serde_json::Value {
        serde_json::from_str(&store_cmd(&[
            "account", "info", "laptop", "--store", &store, "--json",
        ]))
        .unwrap()
    };
    fs::write(src.join("stable.txt"), "stays\n").unwrap();
    let mut states = Vec::new();
    for n in 0..5 {
        fs::write(src.join("changing.bin"), bytes(100 + n, 1 << 20, false)).unwrap();
        let summary = rig.backup(&[&src]);
        states.push((snapshot_of(&summary), describe(&src)));
    }
    let before = info();
    assert_eq!(before["snapshots"], 5);
    store_cmd(&[
        "retention",
        "set",
        "laptop",
        "--store",
        &store,
        "--keep-hourly",
        "1",
    ]);
    // All five fall in one hour: the newest stays. A dry run changes nothing.
    let gc = |dry: bool| -> serde_json::Value {
        let mut args = vec!["gc", "--store", &store, "--grace-hours", "0", "--json"];
        if dry {
            args.push("--dry-run");
        }
        serde_json::from_str(&store_cmd(&args)).unwrap()
    };
    let dry = gc(true);
    assert_eq!(
        dry["snapshots_forgotten"].as_array().unwrap().len(),
        4,
        "{dry}"
    );
    assert_eq!(info(), before);
    let done = gc(false);
    assert_eq!(
        done["snapshots_forgotten"].as_array().unwrap().len(),
        4,
        "{done}"
    );
    // The server holds the store: compaction is its job, not this command's.
    assert!(done["compaction"].is_null(), "{done}");
    // Four megabytes of chunks only the forgotten snapshots had, and their trees
    // and manifests.
    assert!(done["bytes_freed"].as_u64().unwrap() > 4 << 20, "{done}");
    let after = info();
    assert_eq!(after["snapshots"], 1, "{after}");
    assert!(
        after["used"].as_u64().unwrap() + (4 << 20) < before["used"].as_u64().unwrap(),
        "{before} → {after}"
    );
    // What is kept is whole: it restores, verifies, and check finds nothing lost.
    let target = rig.dir("target");
    let out = rig.restore("latest", &target);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same(&states[4].1, &describe(&restored(&target, &src)));
    assert!(ok(rig.homing(&["verify", "--read-data"])).contains("0 problems"));
    let check: serde_json::Value =
        serde_json::from_str(&store_cmd(&["check", "--store", &store, "--json"])).unwrap();
    assert_eq!(check["lost"], serde_json::json!([]), "{check}");
    assert_eq!(check["damaged"], serde_json::json!([]), "{check}");

    // The client still believes the store holds the first file's chunks: backing
    // that content up again finds out, resets its caches and sends them.
    fs::write(src.join("changing.bin"), bytes(100, 1 << 20, false)).unwrap();
    let state = describe(&src);
    let again = rig.backup(&[&src]);
    assert!(
        again["bytes_uploaded"].as_u64().unwrap() >= 1 << 20,
        "{again}"
    );
    let target = rig.dir("target-again");
    let out = rig.restore("latest", &target);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same(&state, &describe(&restored(&target, &src)));
    // With no server on the store, the command compacts (here: everything is in
    // the newest segment, which is never compacted), and the store stays whole.
    rig.stop();
    let alone = gc(false);
    assert_eq!(alone["compaction"]["segments_compacted"], 0, "{alone}");
    assert_eq!(alone["compaction"]["damaged_left"], 0, "{alone}");
    let check: serde_json::Value =
        serde_json::from_str(&store_cmd(&["check", "--store", &store, "--json"])).unwrap();
    assert_eq!(check["damaged"], serde_json::json!([]), "{check}");
}

#[test]
fn an_air_gapped_client_keeps_its_key_and_enrolls_with_a_signed_certificate() {
    let mut rig = Rig::new("0");
    let address = rig.start();
    let laptop = rig.home.path().join("laptop2");
    let request = rig.home.path().join("laptop2.csr");
    let init = homing(
        &laptop,
        &[
            "init",
            "--store",
            &address,
            "--server-name",
            "localhost",
            "--csr",
            request.to_str().unwrap(),
            "--no-passphrase",
        ],
    );
    let said = ok(init);
    assert!(said.contains("homing-store ca sign"), "{said}");
    let key = fs::read_to_string(laptop.join("client.key")).unwrap();
    assert!(key.contains("PRIVATE KEY"));
    assert_eq!(
        fs::metadata(laptop.join("client.key")).unwrap().mode() & 0o777,
        0o600
    );
    // A backup before enrolment says what is missing.
    let early = homing(&laptop, &["backup", rig.home.path().to_str().unwrap()]);
    assert!(!early.status.success());
    assert!(
        stderr(&early).contains("homing enroll"),
        "{}",
        stderr(&early)
    );

    let store = rig.store.to_str().unwrap();
    store_cmd(&["account", "add", "second", "--store", store]);
    let prefix = rig.home.path().join("signed");
    store_cmd(&[
        "ca",
        "sign",
        request.to_str().unwrap(),
        "--account",
        "second",
        "--store",
        store,
        "--out",
        prefix.to_str().unwrap(),
    ]);
    // The request's key is this laptop's; the other laptop's certificate is not.
    let foreign = homing(
        &laptop,
        &[
            "enroll",
            "--cert",
            rig.home.path().join("laptop.crt").to_str().unwrap(),
            "--ca",
            rig.home.path().join("laptop-ca.crt").to_str().unwrap(),
        ],
    );
    assert!(!foreign.status.success());
    assert!(
        stderr(&foreign).contains("not for this client's key"),
        "{}",
        stderr(&foreign)
    );
    // The same request signed by another store's CA: refused before anything
    // is written, naming the CA.
    let other = rig.home.path().join("other-store");
    store_cmd(&["init", other.to_str().unwrap()]);
    store_cmd(&[
        "account",
        "add",
        "second",
        "--store",
        other.to_str().unwrap(),
    ]);
    let stranger = rig.home.path().join("stranger");
    store_cmd(&[
        "ca",
        "sign",
        request.to_str().unwrap(),
        "--account",
        "second",
        "--store",
        other.to_str().unwrap(),
        "--out",
        stranger.to_str().unwrap(),
    ]);
    let wrong_ca = homing(
        &laptop,
        &[
            "enroll",
            "--cert",
            &format!("{}.crt", stranger.display()),
            "--ca",
            &format!("{}-ca.crt", prefix.display()),
        ],
    );
    assert!(!wrong_ca.status.success());
    assert!(
        stderr(&wrong_ca).contains("was not issued by the store's CA")
            && stderr(&wrong_ca).contains("Nothing was changed"),
        "{}",
        stderr(&wrong_ca)
    );
    assert!(!laptop.join("client.crt").exists());
    assert!(!laptop.join("store-ca.crt").exists());
    let enrolled = homing(
        &laptop,
        &[
            "enroll",
            "--cert",
            &format!("{}.crt", prefix.display()),
            "--ca",
            &format!("{}-ca.crt", prefix.display()),
        ],
    );
    ok(enrolled);
    // The key never left: what the CA returned holds no private key.
    assert!(
        !fs::read_to_string(format!("{}.crt", prefix.display()))
            .unwrap()
            .contains("PRIVATE KEY")
    );
    let src = rig.dir("src2");
    fs::write(src.join("a"), "air-gapped\n").unwrap();
    let out = homing(&laptop, &["backup", "--json", src.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let info: serde_json::Value = serde_json::from_str(&store_cmd(&[
        "account", "info", "second", "--store", store, "--json",
    ]))
    .unwrap();
    assert_eq!(info["snapshots"], 1, "{info}");
}

#[test]
fn every_snapshot_carries_every_set_so_retention_keeps_them_all() {
    let rig = Rig::new("0");
    let docs = rig.dir("docs");
    let music = rig.dir("music");
    fs::write(docs.join("letter.txt"), "dear store\n").unwrap();
    fs::write(music.join("song.ogg"), bytes(3, 500_000, false)).unwrap();
    let music_state = describe(&music);
    rig.add_set("docs", &docs, "normal");
    rig.add_set("music", &music, "bulk");
    let both = rig.homing(&["backup", "--json"]);
    assert!(both.status.success(), "{}", stderr(&both));
    let summaries: serde_json::Value = serde_json::from_slice(&both.stdout).unwrap();
    assert_eq!(summaries.as_array().unwrap().len(), 2);
    // Three more backups of docs alone: each sends its change, not music's ids.
    for n in 0..3 {
        fs::write(docs.join("letter.txt"), format!("dear store, take {n}\n")).unwrap();
        let out = rig.homing(&["backup", "--set", "docs", "--json"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let summary = summary(&out);
        assert!(
            summary["bytes_sent"].as_u64().unwrap() < 8 * 1024,
            "{summary}"
        );
    }
    let docs_state = describe(&docs);
    // Keep one snapshot: the newest, made of docs. Music stays in it.
    let store = rig.store.to_str().unwrap();
    store_cmd(&[
        "retention",
        "set",
        "laptop",
        "--store",
        store,
        "--keep-hourly",
        "1",
    ]);
    let gc: serde_json::Value = serde_json::from_str(&store_cmd(&[
        "gc",
        "--store",
        store,
        "--grace-hours",
        "0",
        "--json",
    ]))
    .unwrap();
    assert_eq!(
        gc["snapshots_forgotten"].as_array().unwrap().len(),
        4,
        "{gc}"
    );
    let target = rig.dir("target");
    let out = rig.homing(&[
        "restore",
        "latest",
        "--set",
        "music",
        "--target",
        target.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same(&music_state, &describe(&restored(&target, &music)));
    let out = rig.restore("latest", &target);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same(&docs_state, &describe(&restored(&target, &docs)));
    let verify = ok(rig.homing(&["verify", "--read-data"]));
    assert!(verify.contains("0 problems"), "{verify}");
    let unknown = rig.homing(&["ls", "latest", "--set", "videos"]);
    assert!(
        stderr(&unknown).contains("no set `videos`"),
        "{}",
        stderr(&unknown)
    );

    // Music leaves the configuration and is forgotten: new snapshots no longer
    // carry it.
    let config = fs::read_to_string(rig.config.join("config.toml")).unwrap();
    let at = config.find("[[set]]\nname = \"music\"").unwrap();
    fs::write(rig.config.join("config.toml"), &config[..at]).unwrap();
    ok(rig.homing(&["forget-set", "music"]));
    let out = rig.homing(&["backup", "--set", "docs", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let gone = rig.homing(&["ls", "latest", "--set", "music"]);
    assert!(
        stderr(&gone).contains("no set `music`"),
        "{}",
        stderr(&gone)
    );
    let again = rig.homing(&["forget-set", "music"]);
    assert!(
        stderr(&again).contains("no set `music` was ever"),
        "{}",
        stderr(&again)
    );
}

#[test]
fn forgetting_a_set_drops_what_only_it_left_in_the_spool() {
    let mut rig = Rig::new("0");
    let docs = rig.dir("docs");
    let music = rig.dir("music");
    let letter = bytes(3, 200_000, false);
    fs::write(docs.join("letter.bin"), &letter).unwrap();
    fs::write(music.join("song.bin"), bytes(4, 3 << 20, false)).unwrap();
    // A file both sets hold: its objects stay, docs needs them.
    fs::write(music.join("letter-copy.bin"), &letter).unwrap();
    let docs_state = describe(&docs);
    rig.add_set("docs", &docs, "normal");
    rig.add_set("music", &music, "normal");
    // Away from the store: both sets are sealed into the spool.
    rig.stop();
    let away = rig.homing(&["backup", "--json"]);
    assert_eq!(away.status.code(), Some(3), "{}", stderr(&away));
    let queued = |rig: &Rig| -> u64 {
        let report = rig.report();
        report["queued_bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("{report}"))
    };
    assert!(queued(&rig) > 3 << 20, "{}", queued(&rig));
    let config = fs::read_to_string(rig.config.join("config.toml")).unwrap();
    let at = config.find("[[set]]\nname = \"music\"").unwrap();
    fs::write(rig.config.join("config.toml"), &config[..at]).unwrap();
    let said = ok(rig.homing(&["forget-set", "music"]));
    assert!(said.contains("will not be uploaded"), "{said}");
    // What waits is docs' alone: the letter, its tree.
    let left = queued(&rig);
    assert!((200_000..300_000).contains(&left), "{left}");
    rig.start();
    let home = rig.homing(&["backup", "--json"]);
    assert!(home.status.success(), "{}", stderr(&home));
    let summary: serde_json::Value = serde_json::from_slice(&home.stdout).unwrap();
    let sent: u64 = summary
        .as_array()
        .map_or_else(|| vec![summary.clone()], Clone::clone)
        .iter()
        .map(|s| s["bytes_uploaded"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        sent < 300_000,
        "the forgotten set's data went: {sent}\n{summary}"
    );
    let target = rig.dir("target");
    let out = rig.restore("latest", &target);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same(&docs_state, &describe(&restored(&target, &docs)));
}

#[test]
fn a_link_policy_caps_what_a_backup_sends_and_the_rest_waits_in_the_spool() {
    let rig = Rig::new("0");
    let src = rig.dir("src");
    fs::write(src.join("big.bin"), bytes(42, 2 << 20, false)).unwrap();
    let state = describe(&src);
    // The store is on this machine; a policy that names the loopback interface
    // applies to it (otherwise the loopback link has no cap).
    let policies = rig.policy(
        "tiny.toml",
        "[match]\ninterface = \"lo\"\n\n[budget]\nbytes = \"400 kB\"\nperiod = \"day\"\n",
    );
    let first = rig.backup_output(&[&src]);
    assert_eq!(first.status.code(), Some(3), "{}", stderr(&first));
    assert!(
        stderr(&first).contains("data budget of this network is spent"),
        "{}",
        stderr(&first)
    );
    let info = |rig: &Rig| -> serde_json::Value {
        serde_json::from_str(&store_cmd(&[
            "account",
            "info",
            "laptop",
            "--store",
            rig.store.to_str().unwrap(),
            "--json",
        ]))
        .unwrap()
    };
    // What the store holds came through the cap (the TLS handshake and framing
    // were charged too).
    let stored = info(&rig)["used"].as_u64().unwrap();
    assert!(stored < 380_000, "{stored}");
    assert!(stored > 100_000, "{stored}");
    assert_eq!(info(&rig)["snapshots"], 0);
    // The cap report shows the network, what it spent, and the queue.
    let report = rig.report();
    let tiny = report["networks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["network"] == "tiny")
        .unwrap_or_else(|| panic!("{report}"));
    assert_eq!(tiny["cap"], 400_000);
    assert!(tiny["spent"].as_u64().unwrap() > 300_000, "{tiny}");
    // Within the cap; past the allowance only by what was received after the
    // last reservation (received bytes cannot be refused: the margin is for them).
    assert!(tiny["spent"].as_u64().unwrap() <= 400_000, "{tiny}");
    assert!(
        report["queued_bytes"].as_u64().unwrap() > 1 << 20,
        "{report}"
    );
    let text = ok(rig.homing(&["report"]));
    assert!(text.contains("tiny") && text.contains("queued"), "{text}");
    // The budget is spent for the day: the next run seals nothing new, sends
    // nothing, and says why.
    let second = rig.backup_output(&[&src]);
    assert_eq!(second.status.code(), Some(3), "{}", stderr(&second));
    assert!(
        stderr(&second).contains("budget is spent"),
        "{}",
        stderr(&second)
    );
    let summary = summary(&second);
    assert_eq!(summary["bytes_read"], 0, "{summary}");
    assert_eq!(summary["queued"], true, "{summary}");
    assert_eq!(info(&rig)["used"].as_u64().unwrap(), stored);
    // Another link (no policy): the rest goes, the cut object resumes, and the
    // snapshot restores whole.
    fs::remove_dir_all(&policies).unwrap();
    let done = rig.backup(&[&src]);
    assert_eq!(done["bytes_read"], 0, "{done}");
    assert!(
        done["bytes_uploaded"].as_u64().unwrap() < (2 << 20) - 100_000,
        "{done}"
    );
    let target = rig.dir("target");
    assert!(rig.restore("latest", &target).status.success());
    assert_same(&state, &describe(&restored(&target, &src)));
}

#[test]
fn a_run_that_finds_the_state_held_by_another_command_is_tried_again_soon() {
    let rig = Rig::new("0");
    let src = rig.dir("src");
    fs::write(src.join("a.txt"), "first\n").unwrap();
    rig.add_set("home", &src, "normal");
    let mut daemon = rig.daemon();
    let first = rig.after_runs(1);
    let snapshot = |status: &serde_json::Value| -> String {
        status["sets"][0]["result"]["done"]["snapshot"]
            .as_str()
            .unwrap_or_else(|| panic!("{status}"))
            .to_string()
    };
    let one = snapshot(&first);
    // Another command holds the state (here: this test, as a `homing backup` by
    // hand would) when a run is asked for.
    fs::write(src.join("a.txt"), "second\n").unwrap();
    let held = redb::Database::open(rig.config.join("state/state.redb")).expect("the state");
    ok(rig.homing(&["backup-now"]));
    std::thread::sleep(Duration::from_secs(3));
    let waiting = rig.daemon_status();
    assert_eq!(
        waiting["runs"], 1,
        "a run that could not open the state: {waiting}"
    );
    assert!(waiting["error"].is_null(), "{waiting}");
    // Once it is free, the run goes within seconds, not at the next hour.
    drop(held);
    let second = rig.after_runs(2);
    assert_ne!(snapshot(&second), one, "{second}");
    let _ = daemon.kill();
    let _ = daemon.wait();
}

#[test]
fn the_daemon_backs_up_on_start_on_request_and_not_while_paused() {
    let rig = Rig::new("0");
    let src = rig.dir("src");
    fs::write(src.join("a.txt"), "first\n").unwrap();
    rig.add_set("home", &src, "normal");
    let mut daemon = rig.daemon();
    let status = || rig.daemon_status();
    let wait_for_runs = |runs: u64| rig.after_runs(runs);
    // It runs once at start.
    let first = wait_for_runs(1);
    assert_eq!(first["paused"], false);
    let snapshot = |status: &serde_json::Value| -> String {
        status["sets"][0]["result"]["done"]["snapshot"]
            .as_str()
            .unwrap_or_else(|| panic!("{status}"))
            .to_string()
    };
    let one = snapshot(&first);
    // Between runs, other commands use the state.
    let listed = rig.homing(&["snapshots", "--json"]);
    assert!(listed.status.success(), "{}", stderr(&listed));
    // On request.
    fs::write(src.join("a.txt"), "second\n").unwrap();
    ok(rig.homing(&["backup-now"]));
    let second = wait_for_runs(2);
    assert_ne!(snapshot(&second), one);
    // Not while paused: the request is refused and nothing runs.
    ok(rig.homing(&["pause"]));
    let refused = rig.homing(&["backup-now"]);
    assert!(!refused.status.success());
    assert!(stdout(&refused).contains("paused"), "{}", stdout(&refused));
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(status()["runs"], 2);
    // Resume runs at once.
    fs::write(src.join("a.txt"), "third\n").unwrap();
    ok(rig.homing(&["resume"]));
    let third = wait_for_runs(3);
    assert_eq!(third["paused"], false);
    let text = ok(rig.homing(&["status"]));
    assert!(
        text.contains("active") && text.contains("home: snapshot"),
        "{text}"
    );
    // SIGTERM stops it, and it takes its socket away.
    let _ = Command::new("kill")
        .arg(daemon.id().to_string())
        .status()
        .unwrap();
    let stopped = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        daemon.try_wait().unwrap().is_some()
    });
    assert!(stopped, "the daemon did not stop on SIGTERM");
    assert!(!rig.homing(&["status"]).status.success());
    // Three snapshots, one per run.
    let list: serde_json::Value =
        serde_json::from_str(&ok(rig.homing(&["snapshots", "--json"]))).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 3);
}

#[test]
fn a_link_that_carries_critical_sets_only_leaves_bulk_data_in_the_spool() {
    let rig = Rig::new("0");
    let docs = rig.dir("docs");
    let media = rig.dir("media");
    fs::write(docs.join("note.txt"), "urgent\n").unwrap();
    fs::write(media.join("film.bin"), bytes(77, 3 << 20, false)).unwrap();
    rig.add_set("docs", &docs, "critical");
    rig.add_set("media", &media, "bulk");
    // Media first: what it seals must not ride along with the critical set.
    let policies = rig.policy(
        "narrow.toml",
        "[match]\ninterface = \"lo\"\n\n[link]\nclasses = [\"critical\"]\n",
    );
    let out = rig.homing(&["backup", "--set", "media", "--json"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("carries critical"),
        "{}",
        stderr(&out)
    );
    let out = rig.homing(&["backup", "--set", "docs", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let docs_summary = summary(&out);
    assert!(
        docs_summary["bytes_uploaded"].as_u64().unwrap() < 100_000,
        "the bulk set's data went with the critical one: {docs_summary}"
    );
    // On a link that carries everything, the film goes.
    fs::remove_dir_all(&policies).unwrap();
    let out = rig.homing(&["backup", "--set", "media", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let media_summary = summary(&out);
    assert_eq!(media_summary["bytes_read"], 0, "{media_summary}");
    assert!(
        media_summary["bytes_uploaded"].as_u64().unwrap() > 3_000_000,
        "{media_summary}"
    );
}

/// A lying store: swaps the index records of objects so that asking for one
/// serves another's bytes, whose checksums the store itself finds in order. Only
/// the client's authentication can tell.
fn swap_records(store: &Path, pairs: &[(Vec<u8>, Vec<u8>)]) {
    const OBJECTS: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("objects");
    let db = redb::Database::open(store.join("index.redb")).expect("the store's index opens");
    let txn = db.begin_write().expect("the store's index");
    {
        let mut table = txn.open_table(OBJECTS).expect("the store's index");
        for (a, b) in pairs {
            let get = |table: &redb::Table<&[u8], &[u8]>, key: &[u8]| {
                redb::ReadableTable::get(table, key)
                    .expect("the store's index")
                    .expect("the store's index")
                    .value()
                    .to_vec()
            };
            let va = get(&table, a);
            let vb = get(&table, b);
            table
                .insert(a.as_slice(), vb.as_slice())
                .expect("the store's index");
            table
                .insert(b.as_slice(), va.as_slice())
                .expect("the store's index");
        }
    }
    txn.commit().expect("the store's index");
}

/// The index keys of an account's objects (account ‖ 0 ‖ id), largest first (the
/// chunks of the test's files, not trees or manifests).
fn object_keys(store: &Path, account: &str) -> Vec<Vec<u8>> {
    const OBJECTS: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("objects");
    let db = redb::Database::open(store.join("index.redb")).expect("the store's index opens");
    let txn = redb::ReadableDatabase::begin_read(&db).expect("the store's index");
    let table = txn.open_table(OBJECTS).expect("the store's index");
    let mut keys: Vec<(u32, Vec<u8>)> = redb::ReadableTable::iter(&table)
        .expect("the store's index")
        .map(|item| {
            let (k, v) = item.expect("the store's index");
            let len = u32::from_le_bytes(v.value()[16..20].try_into().expect("the store's index"));
            (len, k.value().to_vec())
        })
        .filter(|(_, k)| k.starts_with(account.as_bytes()) && k[account.len()] == 0)
        .collect();
    keys.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
    keys.into_iter().map(|(_, k)| k).collect()
}

#[test]
fn a_store_that_swaps_objects_or_serves_another_accounts_is_caught() {
    let mut rig = Rig::new("0");
    let src = rig.dir("src");
    for n in 0..4 {
        fs::write(src.join(format!("file{n}")), bytes(n + 40, 300_000, false)).unwrap();
    }
    let state = describe(&src);
    rig.backup(&[&src]);
    // A second account with objects of its own, sealed under another key.
    let store = rig.store.to_str().unwrap().to_string();
    store_cmd(&["account", "add", "other", "--store", &store]);
    let other = rig.home.path().join("other");
    store_cmd(&[
        "ca",
        "issue",
        "other",
        "--store",
        &store,
        "--out",
        other.to_str().unwrap(),
    ]);
    let other_config = rig.home.path().join("other-client");
    let address = fs::read_to_string(rig.config.join("config.toml"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("address = \"")
                .map(|a| a.trim_end_matches('"').to_string())
        })
        .unwrap();
    let o = other.to_str().unwrap();
    ok(homing(&other_config, &init_args(&address, "localhost", o)));
    let theirs = rig.dir("theirs");
    fs::write(theirs.join("x"), bytes(99, 300_000, false)).unwrap();
    let out = homing(
        &other_config,
        &["backup", "--json", theirs.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    rig.stop();
    let mine = object_keys(&rig.store, "laptop");
    let foreign = object_keys(&rig.store, "other");
    // Two of our chunks swapped; a third served from the other account.
    swap_records(
        &rig.store,
        &[
            (mine[0].clone(), mine[1].clone()),
            (mine[2].clone(), foreign[0].clone()),
        ],
    );
    rig.start();
    let verify = rig.homing(&["verify", "--read-data"]);
    assert_eq!(verify.status.code(), Some(3), "{}", stderr(&verify));
    let report = stdout(&verify);
    assert!(
        report.matches("does not authenticate").count() >= 3,
        "{report}"
    );
    let target = rig.dir("target");
    let out = rig.restore("latest", &target);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let failures = summary["failures"].to_string();
    assert!(failures.contains("does not authenticate"), "{failures}");
    // No wrong byte was written: every file there is is right.
    for (path, item) in describe(&restored(&target, &src)) {
        if item.kind == "file" {
            assert_eq!(
                Some(&item),
                state.get(&path),
                "{}",
                String::from_utf8_lossy(&path)
            );
        }
    }
}

#[test]
fn a_store_whose_name_does_not_resolve_leaves_the_backup_sealed_and_waiting() {
    let rig = Rig::new("0");
    let src = rig.dir("src");
    fs::write(src.join("a"), "away from home\n").unwrap();
    // Away from home, the store's home name means nothing.
    let config = fs::read_to_string(rig.config.join("config.toml")).unwrap();
    let away: String = config
        .lines()
        .map(|line| {
            if line.starts_with("address = ") {
                "address = \"nas.invalid:7473\"\n".to_string()
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    fs::write(rig.config.join("config.toml"), away).unwrap();
    let out = rig.backup_output(&[&src]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot resolve the store's address nas.invalid:7473"),
        "{}",
        stderr(&out)
    );
    let sealed = summary(&out);
    assert_eq!(sealed["queued"], true, "{sealed}");
    assert!(sealed["objects_sealed"].as_u64().unwrap() > 0, "{sealed}");
}

#[test]
fn a_damaged_spool_file_is_caught_before_upload_and_the_files_are_sealed_again() {
    let mut rig = Rig::new("0");
    let src = rig.dir("src");
    fs::write(src.join("photo.jpg"), bytes(7, 300_000, false)).unwrap();
    fs::write(src.join("notes.txt"), "written on the train\n".repeat(2000)).unwrap();
    let state = describe(&src);
    // Away from home: everything is sealed into the spool.
    rig.stop();
    let away = rig.backup_output(&[&src]);
    assert_eq!(away.status.code(), Some(3), "{}", stderr(&away));
    // The laptop's disk damages a byte of the spool.
    let spool = rig.config.join("state/spool");
    let file = fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .expect("a spool file");
    let mut raw = fs::read(&file).unwrap();
    raw[1000] ^= 0x10;
    fs::write(&file, &raw).unwrap();
    // Home again: the damage is named, the object is dropped, the files are read
    // and sealed again, and the backup completes.
    rig.start();
    let home = rig.backup_output(&[&src]);
    assert!(home.status.success(), "{}", stderr(&home));
    assert!(stderr(&home).contains("is damaged"), "{}", stderr(&home));
    // No snapshot needs the damaged bytes: everything restores and every
    // object of the snapshot authenticates.
    let target = rig.dir("target");
    let out = rig.restore("latest", &target);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_same(&state, &describe(&restored(&target, &src)));
    let verify = rig.homing(&["verify", "--read-data"]);
    assert!(verify.status.success(), "{}", stderr(&verify));
}

#[test]
fn a_budget_that_runs_out_was_spent_on_the_critical_set_first() {
    let mut rig = Rig::new("0");
    let media = rig.dir("media");
    let docs = rig.dir("docs");
    fs::write(media.join("film.bin"), bytes(91, 2 << 20, false)).unwrap();
    fs::write(docs.join("report.bin"), bytes(92, 300_000, false)).unwrap();
    // The bulk set first in the configuration, and sealed first.
    rig.add_set("media", &media, "bulk");
    rig.add_set("docs", &docs, "critical");
    rig.stop();
    let away = rig.homing(&["backup", "--json"]);
    assert_eq!(away.status.code(), Some(3), "{}", stderr(&away));
    rig.start();
    // Home, but over a link whose budget covers a quarter of what waits: the
    // media set's run uploads the spool, and the budget runs out.
    let policies = rig.policy(
        "tiny.toml",
        "[match]\ninterface = \"lo\"\n\n[budget]\nbytes = \"600 kB\"\nperiod = \"day\"\n",
    );
    let capped = rig.homing(&["backup", "--set", "media", "--json"]);
    assert_eq!(capped.status.code(), Some(3), "{}", stderr(&capped));
    assert!(
        stderr(&capped).contains("budget of this network is spent"),
        "{}",
        stderr(&capped)
    );
    // It was spent on the critical set's objects first: the report shows only
    // bulk data waiting, and over a link that carries critical sets only, the
    // docs set has nothing left to send.
    let report = rig.report();
    assert_eq!(report["queued_by_class"]["critical"], 0, "{report}");
    assert!(
        report["queued_by_class"]["bulk"].as_u64().unwrap() > 1_000_000,
        "{report}"
    );
    fs::remove_file(policies.join("tiny.toml")).unwrap();
    fs::write(
        policies.join("narrow.toml"),
        "[match]\ninterface = \"lo\"\n\n[link]\nclasses = [\"critical\"]\n",
    )
    .unwrap();
    let out = rig.homing(&["backup", "--set", "docs", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let docs_summary = summary(&out);
    assert_eq!(docs_summary["bytes_read"], 0, "{docs_summary}");
    assert!(
        docs_summary["bytes_uploaded"].as_u64().unwrap() < 20_000,
        "the critical set's data waited behind the bulk set's: {docs_summary}"
    );
}

#[test]
fn the_daemon_runs_on_the_last_good_policies_while_a_file_is_broken() {
    let rig = Rig::new("0");
    let src = rig.dir("src");
    fs::write(src.join("a.txt"), "first\n").unwrap();
    rig.add_set("home", &src, "normal");
    let policies = rig.policy("this-machine.toml", "[match]\ninterface = \"lo\"\n");
    let mut daemon = rig.daemon();
    let wait_for_runs = |runs: u64| rig.after_runs(runs);
    let first = wait_for_runs(1);
    assert!(
        first["network"]
            .as_str()
            .is_some_and(|n| n.starts_with("this-machine")),
        "{first}"
    );
    assert_eq!(first["error"], serde_json::Value::Null, "{first}");
    // A half-written edit: the next run goes on the policies that loaded, and
    // the status names the file, the line and what to do.
    fs::write(
        policies.join("this-machine.toml"),
        "[match]\ninterface = \"lo\"\n\n[budget]\nbytes = \n",
    )
    .unwrap();
    fs::write(src.join("a.txt"), "second\n").unwrap();
    ok(rig.homing(&["backup-now"]));
    let second = wait_for_runs(2);
    let snapshot =
        |status: &serde_json::Value| status["sets"][0]["result"]["done"]["snapshot"].clone();
    assert!(snapshot(&second).is_string(), "{second}");
    assert_ne!(
        snapshot(&second),
        snapshot(&first),
        "no new snapshot: {second}"
    );
    assert!(
        second["network"]
            .as_str()
            .is_some_and(|n| n.starts_with("this-machine")),
        "{second}"
    );
    // The run went: a warning, not an error.
    assert!(second["error"].is_null(), "{second}");
    let warning = second["warning"]
        .as_str()
        .unwrap_or_else(|| panic!("{second}"));
    assert!(
        warning.contains("this-machine.toml:") && warning.contains("last policies that loaded"),
        "{warning}"
    );
    let text = ok(rig.homing(&["status"]));
    assert!(
        text.contains("warning: ") && !text.contains("last run failed"),
        "{text}"
    );
    // Fixed, the warning goes.
    fs::write(
        policies.join("this-machine.toml"),
        "[match]\ninterface = \"lo\"\n",
    )
    .unwrap();
    ok(rig.homing(&["backup-now"]));
    let third = wait_for_runs(3);
    assert_eq!(third["error"], serde_json::Value::Null, "{third}");
    assert_eq!(third["warning"], serde_json::Value::Null, "{third}");
    let _ = daemon.kill();
    let _ = daemon.wait();
}

/// A read-only file system served by this test process (FUSE) whose files can
/// fail to read from a given offset on, as a disk with a bad sector does.
#[cfg(target_os = "linux")]
mod failing {
    use std::ffi::OsStr;
    use std::path::Path;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, SystemTime};

    use fuser::{
        Config, Errno, FileAttr, FileHandle, FileType, Filesystem, Generation, INodeNo, LockOwner,
        MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, Request,
    };

    pub(super) struct File {
        name: &'static str,
        data: Vec<u8>,
        /// Every read that reaches this offset fails with EIO.
        fails_from: Option<u64>,
        /// Bytes served, as the kernel asked for them (read-ahead included).
        served: Arc<AtomicU64>,
    }

    impl File {
        pub(super) fn new(name: &'static str, data: Vec<u8>) -> Self {
            Self {
                name,
                data,
                fails_from: None,
                served: Arc::default(),
            }
        }

        pub(super) fn failing_from(self, offset: u64) -> Self {
            Self {
                fails_from: Some(offset),
                ..self
            }
        }

        /// The count of bytes this file has served, to read while it is mounted.
        pub(super) fn served(&self) -> Arc<AtomicU64> {
            Arc::clone(&self.served)
        }
    }

    struct Tree {
        files: Vec<File>,
        mtime: SystemTime,
    }

    const TTL: Duration = Duration::from_secs(60);

    impl Tree {
        fn file(&self, ino: INodeNo) -> Option<&File> {
            usize::try_from(u64::from(ino))
                .ok()?
                .checked_sub(2)
                .and_then(|i| self.files.get(i))
        }

        fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
            let (kind, perm, size, nlink) = if ino == INodeNo::ROOT {
                (FileType::Directory, 0o755, 0, 2)
            } else {
                let file = self.file(ino)?;
                (FileType::RegularFile, 0o644, file.data.len() as u64, 1)
            };
            Some(FileAttr {
                ino,
                size,
                blocks: size.div_ceil(512),
                atime: self.mtime,
                mtime: self.mtime,
                ctime: self.mtime,
                crtime: self.mtime,
                kind,
                perm,
                nlink,
                uid: 0,
                gid: 0,
                rdev: 0,
                flags: 0,
                blksize: 4096,
            })
        }
    }

    impl Filesystem for Tree {
        fn lookup(&self, _: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
            let found = (parent == INodeNo::ROOT)
                .then(|| self.files.iter().position(|f| OsStr::new(f.name) == name))
                .flatten()
                .and_then(|i| self.attr(INodeNo(i as u64 + 2)));
            match found {
                Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
                None => reply.error(Errno::ENOENT),
            }
        }

        fn getattr(&self, _: &Request, ino: INodeNo, _: Option<FileHandle>, reply: ReplyAttr) {
            match self.attr(ino) {
                Some(attr) => reply.attr(&TTL, &attr),
                None => reply.error(Errno::ENOENT),
            }
        }

        fn read(
            &self,
            _: &Request,
            ino: INodeNo,
            _: FileHandle,
            offset: u64,
            size: u32,
            _: OpenFlags,
            _: Option<LockOwner>,
            reply: ReplyData,
        ) {
            let Some(file) = self.file(ino) else {
                return reply.error(Errno::ENOENT);
            };
            let end = offset.saturating_add(u64::from(size));
            if file.fails_from.is_some_and(|bad| end > bad) {
                return reply.error(Errno::EIO);
            }
            let len = file.data.len() as u64;
            let range = offset.min(len) as usize..end.min(len) as usize;
            file.served.fetch_add(range.len() as u64, Ordering::Relaxed);
            reply.data(&file.data[range]);
        }

        fn readdir(
            &self,
            _: &Request,
            ino: INodeNo,
            _: FileHandle,
            offset: u64,
            mut reply: ReplyDirectory,
        ) {
            if ino != INodeNo::ROOT {
                return reply.error(Errno::ENOTDIR);
            }
            let entries = [
                (INodeNo::ROOT, FileType::Directory, "."),
                (INodeNo::ROOT, FileType::Directory, ".."),
            ]
            .into_iter()
            .chain(
                self.files
                    .iter()
                    .enumerate()
                    .map(|(i, f)| (INodeNo(i as u64 + 2), FileType::RegularFile, f.name)),
            );
            for (n, (ino, kind, name)) in entries.enumerate().skip(offset as usize) {
                if reply.add(ino, n as u64 + 1, kind, name) {
                    break;
                }
            }
            reply.ok();
        }
    }

    /// Serves `files` at `dir` until the session is dropped; `None` where this
    /// process may not mount (not root, or no FUSE in the kernel).
    pub(super) fn mount(dir: &Path, files: Vec<File>) -> Option<fuser::BackgroundSession> {
        if !super::is_root() {
            return None;
        }
        let tree = Tree {
            files,
            mtime: SystemTime::UNIX_EPOCH + Duration::from_secs(1_780_000_000),
        };
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::RO,
            MountOption::FSName("homing-bad-sectors".to_string()),
        ];
        fuser::spawn_mount(tree, dir, &config)
            .map_err(|error| eprintln!("cannot mount the failing file system: {error}"))
            .ok()
    }
}

#[test]
#[cfg(target_os = "linux")]
fn a_read_error_in_the_middle_of_a_file_leaves_that_file_out_and_the_rest_is_backed_up() {
    let rig = Rig::new("0");
    let src = rig.dir("src");
    let good = bytes(81, 300_000, false);
    // Named to come after the damaged files in the walk.
    let later = bytes(82, 5_000, true);
    let files = vec![
        failing::File::new("later", later.clone()),
        // Large enough for the parallel pipeline where the run has threads for it.
        failing::File::new("bad-large.img", bytes(83, 12 << 20, false)).failing_from(6 << 20),
        failing::File::new("bad-small.doc", bytes(84, 400_000, false)).failing_from(200_000),
        failing::File::new("good", good.clone()),
    ];
    let Some(session) = failing::mount(&src, files) else {
        skip("a FUSE file system needs root and /dev/fuse");
        return;
    };
    // Both ways a large file is sealed: in the parallel pipeline (three threads),
    // and on the walking thread (one).
    for threads in [3, 1] {
        rig.set_sealing_threads(Some(threads));
        let out = rig.backup_output(&[&src]);
        assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
        let summary = summary(&out);
        assert_eq!(summary["unreadable"], 2, "{summary}");
        let problems = summary["problems"].to_string();
        assert!(
            problems.contains("/bad-large.img") && problems.contains("/bad-small.doc"),
            "{problems}"
        );
        // EIO, whatever the locale says of it.
        assert!(problems.contains("os error 5"), "{problems}");
        assert!(!problems.contains("/good") && !problems.contains("/later"));
        // What could be read is in the snapshot, byte for byte; the damaged files
        // are not, not even in part.
        let target = rig.dir(&format!("restored-{threads}"));
        let out = rig.restore(&snapshot_of(&summary), &target);
        assert!(out.status.success(), "{}", stderr(&out));
        let root = restored(&target, &src);
        assert_eq!(fs::read(root.join("good")).unwrap(), good);
        assert_eq!(fs::read(root.join("later")).unwrap(), later);
        assert!(!root.join("bad-large.img").exists() && !root.join("bad-small.doc").exists());
    }
    session.umount_and_join().unwrap();
    // The store holds nothing broken: what was sealed of the damaged files before
    // the error is either unreferenced or whole.
    let store = rig.store.to_str().expect("UTF-8");
    let out = Command::new(binary("homing-store"))
        .args(["check", "--store", store])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
#[cfg(target_os = "linux")]
fn a_full_spool_stops_the_reading_of_a_large_file_at_once() {
    let rig = Rig::new("0");
    let spool = rig.config.join("state/spool");
    fs::create_dir_all(&spool).unwrap();
    let Some(_mounted) = Mounted::tmpfs(&spool, "4m") else {
        skip("mounting a small file system for the spool needs root");
        return;
    };
    let src = rig.dir("src");
    let image = failing::File::new("disk.img", bytes(91, 64 << 20, false));
    let served = image.served();
    let Some(session) = failing::mount(&src, vec![image]) else {
        skip("a FUSE file system needs root and /dev/fuse");
        return;
    };
    // A spool with room for 4 MiB of a 64 MiB file that does not compress: the
    // backup stops, and does not read the rest of the file first. Both ways a
    // large file is sealed: in the parallel pipeline, and on the walking thread.
    for threads in [3, 1] {
        rig.set_sealing_threads(Some(threads));
        served.store(0, std::sync::atomic::Ordering::Relaxed);
        assert_stopped_by_a_full_spool(&rig.backup_output(&[&src]));
        let read = served.load(std::sync::atomic::Ordering::Relaxed);
        let said =
            format!("{threads} sealing threads: {read} bytes of 64 MiB read for a 4 MiB spool");
        eprintln!("{said}");
        assert!(read < 16 << 20, "{said}");
    }
    session.umount_and_join().unwrap();
}

/// A cache directory as the Cache Directory Tagging Specification makes one.
fn tag_as_cache(dir: &Path) {
    fs::write(
        dir.join("CACHEDIR.TAG"),
        "Signature: 8a477f597d28d172789f06886806bc55\n# a cache: regenerated, not backed up\n",
    )
    .expect("the tag is written");
}

#[test]
fn quickstart_backs_up_a_tree_without_its_caches_and_runs_again() {
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("cfg");
    let store = home.path().join("store");
    let src = home.path().join("project");
    fs::create_dir_all(src.join("src")).unwrap();
    fs::write(src.join("src/main.rs"), bytes(101, 20_000, true)).unwrap();
    fs::write(src.join("notes.txt"), bytes(102, 3_000, true)).unwrap();
    // A build directory tagged as a cache (cargo tags its `target/` so), and one
    // whose tag lacks the signature, which is therefore no cache.
    fs::create_dir_all(src.join("target/debug")).unwrap();
    tag_as_cache(&src.join("target"));
    fs::write(src.join("target/debug/big.bin"), bytes(103, 2 << 20, false)).unwrap();
    fs::create_dir(src.join("not-a-cache")).unwrap();
    fs::write(src.join("not-a-cache/CACHEDIR.TAG"), "Signature: wrong\n").unwrap();
    fs::write(src.join("not-a-cache/kept"), b"kept\n").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let quickstart = || {
        homing(
            &config,
            &[
                OsStr::new("quickstart"),
                src.as_os_str(),
                OsStr::new("--store-dir"),
                store.as_os_str(),
                OsStr::new("--port"),
                OsStr::new(&port),
                OsStr::new("--json"),
            ],
        )
    };
    let first = quickstart();
    let pid = || fs::read_to_string(store.join("serve.pid")).unwrap_or_default();
    // The server it started, stopped when the test ends however it ends.
    struct Server(PathBuf);
    impl Drop for Server {
        fn drop(&mut self) {
            if let Ok(pid) = fs::read_to_string(&self.0) {
                let _ = Command::new("kill").arg(pid.trim()).status();
            }
        }
    }
    let _server = Server(store.join("serve.pid"));
    assert!(first.status.success(), "{}", stderr(&first));
    let first = summary(&first);
    assert_eq!(first["caches_skipped"], 1, "{first}");
    assert!(
        first["bytes_read"].as_u64().unwrap() < 100_000,
        "the cache's 2 MiB was read: {first}"
    );
    // Run again: the same server, a second snapshot, nothing read again.
    let server = pid();
    let again = quickstart();
    assert!(again.status.success(), "{}", stderr(&again));
    assert!(!stderr(&again).contains("Started the store server"));
    assert_eq!(pid(), server);
    let again = summary(&again);
    assert_eq!(again["files_changed"], 0, "{again}");
    assert_eq!(again["bytes_read"], 0, "{again}");
    assert_eq!(again["sequence"], 2, "{again}");
    // The restore has everything but the cache's contents: its directory stays,
    // empty.
    let target = home.path().join("restored");
    let out = homing(
        &config,
        &[
            OsStr::new("restore"),
            OsStr::new("latest"),
            OsStr::new("--target"),
            target.as_os_str(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let root = restored(&target, &src);
    let mut expected = describe(&src);
    expected.retain(|path, _| !path.starts_with(b"/target/"));
    assert_same(&expected, &describe(&root));
    assert_eq!(fs::read_dir(root.join("target")).unwrap().count(), 0);
    // A set that says `exclude_caches = false` backs the cache up too.
    let file = config.join("config.toml");
    let text = fs::read_to_string(&file).unwrap();
    let at = text
        .find("name = \"quickstart\"")
        .expect("the quickstart set");
    let text = format!(
        "{}name = \"quickstart\"\nexclude_caches = false{}",
        &text[..at],
        &text[at + "name = \"quickstart\"".len()..]
    );
    fs::write(&file, text).unwrap();
    let all = homing(&config, &["backup", "--set", "quickstart", "--json"]);
    assert!(all.status.success(), "{}", stderr(&all));
    let all = summary(&all);
    assert_eq!(all["caches_skipped"], 0, "{all}");
    assert!(all["bytes_read"].as_u64().unwrap() >= 2 << 20, "{all}");
}
