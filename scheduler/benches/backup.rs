//! The main job's figures: `cargo bench -p homing --bench backup`.
//!
//! Runs the real release binaries against a real store server on loopback, on
//! generated trees, and prints what issue 4 asks for:
//!
//! - initial backup of a ~300 MB laptop-like tree (source text, documents,
//!   incompressible media, a VM-image-like file): MB/s, CPU seconds per GB, peak
//!   memory; against a baseline measured in the same run (reading every file and
//!   hashing it with BLAKE3, the least any content-addressed backup must do);
//! - rescan of the unchanged tree, and of an unchanged tree of 100k files;
//! - bytes on the wire for (a) 100 bytes changed in the middle of a 200 MB file of
//!   mixed content (median of 20 positions), (b) one new 1 KB file in 10k files
//!   over 500 directories, (c) an hour of typical edits, against the compressed
//!   size of what is genuinely new;
//! - peak memory of an initial backup of 10k and of 200k small files.
//!
//! `HOMING_BENCH_QUICK=1` shrinks everything tenfold for a smoke run;
//! `HOMING_BENCH_INITIAL_ONLY=1` stops after the initial backup and its floor;
//! `HOMING_BENCH_RSS_ONLY=1` runs only the 10k and 200k files' backups;
//! `HOMING_BENCH_DIR` says where the trees go (default: the system's temporary
//! directory; use a disk, not a RAM disk, for honest figures).

use std::fs;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use tokio::time::Instant;

use serde_json::Value;

struct Rig {
    homing: PathBuf,
    store_binary: PathBuf,
    work: PathBuf,
    config: PathBuf,
    server: Child,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

fn run(binary: &Path, args: &[&str]) -> String {
    let out = Command::new(binary)
        .args(args)
        .output()
        .expect("the binary runs");
    assert!(
        out.status.success(),
        "{} {args:?}: {}",
        binary.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Rig {
    fn new(work: PathBuf) -> Self {
        let homing = PathBuf::from(env!("CARGO_BIN_EXE_homing"));
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--release", "--locked", "-p", "homing-store"])
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building homing-store failed");
        let store_binary = homing.with_file_name("homing-store");
        let store = work.join("store");
        let s = store.to_str().expect("UTF-8");
        run(&store_binary, &["init", s]);
        run(&store_binary, &["account", "add", "bench", "--store", s]);
        let prefix = work.join("bench");
        let p = prefix.to_str().expect("UTF-8");
        run(
            &store_binary,
            &["ca", "issue", "bench", "--store", s, "--out", p],
        );
        let mut server = Command::new(&store_binary)
            .args(["serve", "--store", s, "--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("the server starts");
        let mut line = String::new();
        BufReader::new(server.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("the server says where it listens");
        let address = line
            .trim()
            .strip_prefix("listening on ")
            .expect("listening on ADDR")
            .to_string();
        let config = work.join("client");
        let c = config.to_str().expect("UTF-8");
        run(
            &homing,
            &[
                "--config",
                c,
                "init",
                "--store",
                &address,
                "--server-name",
                "localhost",
                "--ca",
                &format!("{p}-ca.crt"),
                "--cert",
                &format!("{p}.crt"),
                "--key",
                &format!("{p}.key"),
                "--no-passphrase",
            ],
        );
        Self {
            homing,
            store_binary,
            work,
            config,
            server,
        }
    }

    /// Backs up `path` as set `set`; returns the summary.
    /// `HOMING_BENCH_WRAP` (words split on spaces, e.g. `perf record -o FILE --`)
    /// runs the client under a profiler.
    fn backup(&self, set: &str, path: &Path) -> Value {
        let homing = self.homing.to_str().expect("UTF-8");
        let config = self.config.to_str().expect("UTF-8");
        let path = path.to_str().expect("UTF-8");
        let args = ["--config", config, "backup", "--json", "--set", set, path];
        let out = match std::env::var("HOMING_BENCH_WRAP") {
            Ok(wrap) if !wrap.trim().is_empty() => {
                let mut words: Vec<&str> = wrap.split_whitespace().collect();
                let program = words.remove(0);
                words.push(homing);
                words.extend(args);
                run(Path::new(program), &words)
            }
            _ => run(&self.homing, &args),
        };
        let all: Value = serde_json::from_str(&out).expect("a JSON summary");
        all[0].clone()
    }
}

/// Deterministic bytes: xorshift64.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn random(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// Text like source code or prose: words from a vocabulary, lines, indents.
    fn text(&mut self, len: usize) -> Vec<u8> {
        const WORDS: &[&str] = &[
            "fn", "let", "mut", "self", "return", "match", "impl", "struct", "the", "and",
            "backup", "store", "link", "budget", "error", "result", "value", "index", "file",
            "path", "chunk", "seal", "upload", "if", "else", "for", "in", "while", "Some", "None",
            "Ok", "Err", "=", "+", "{", "}", "(", ")", ";", "//", "pub", "use",
        ];
        let mut out = Vec::with_capacity(len + 32);
        let mut column = 0;
        while out.len() < len {
            let n = self.next();
            let word = WORDS[(n % WORDS.len() as u64) as usize];
            if column == 0 {
                let indent = (n >> 8) % 4 * 4;
                out.extend(std::iter::repeat_n(b' ', indent as usize));
            }
            out.extend_from_slice(word.as_bytes());
            column += word.len() + 1;
            // Identifiers with numbers make the text less repetitive.
            if (n >> 16).is_multiple_of(5) {
                out.extend_from_slice(format!("{}", (n >> 20) % 1000).as_bytes());
            }
            if column > 60 + ((n >> 24) % 30) as usize {
                out.push(b'\n');
                column = 0;
            } else {
                out.push(b' ');
            }
        }
        out.truncate(len);
        out
    }

    /// Mixed content: runs of text, random bytes and zeros, 64 KiB to 1 MiB each.
    fn mixed(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let n = self.next();
            let run = (64 << 10) + (n % (960 << 10)) as usize;
            let run = run.min(len - out.len());
            match n % 3 {
                0 => out.extend(self.text(run)),
                1 => out.extend(self.random(run)),
                _ => out.extend(std::iter::repeat_n(0_u8, run)),
            }
        }
        out
    }
}

fn write(path: &Path, data: &[u8]) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("a directory");
    }
    fs::write(path, data).expect("a file");
}

/// The ~300 MB laptop-like tree; returns its size.
fn laptop(root: &Path, scale: usize, g: &mut Gen) -> u64 {
    let mut total = 0_u64;
    let mut put = |path: PathBuf, data: Vec<u8>| {
        total += data.len() as u64;
        write(&path, &data);
    };
    // Sources: 2 000 files of 2-30 KB text in 100 directories (~32 MB).
    for n in 0..2000 / scale {
        let len = 2000 + (g.next() % 28_000) as usize;
        put(
            root.join(format!("src/dir{:03}/file{n:04}.rs", n % 100)),
            g.text(len),
        );
    }
    // Documents: 150 of 50-500 KB, text with embedded random (images) (~40 MB).
    for n in 0..150 / scale {
        let len = 50_000 + (g.next() % 450_000) as usize;
        let mut data = g.text(len / 2);
        data.extend(g.random(len / 4));
        data.extend(g.text(len / 4));
        put(root.join(format!("docs/report{n:03}.odt")), data);
    }
    // Photos: 25 of 2-6 MB, incompressible (~100 MB).
    for n in 0..25 / scale {
        let len = (2 << 20) + (g.next() % (4 << 20)) as usize;
        put(root.join(format!("photos/IMG_{n:04}.jpg")), g.random(len));
    }
    // Logs: 5 of 1 MB text.
    for n in 0..5 {
        put(
            root.join(format!("logs/app{n}.log")),
            g.text((1 << 20) / scale),
        );
    }
    // A VM image: 128 MB of mixed runs.
    put(root.join("vm/disk.img"), g.mixed((128 << 20) / scale));
    total
}

/// `count` small files (100-2000 bytes) over `dirs` directories, two levels deep.
fn many(root: &Path, count: usize, dirs: usize, g: &mut Gen) {
    for n in 0..count {
        let d = n % dirs;
        let len = 100 + (g.next() % 1900) as usize;
        let data = g.text(len);
        write(
            &root.join(format!("top{:02}/dir{d:04}/f{n:06}.txt", d % 20)),
            &data,
        );
    }
}

/// Calls `f` with every file below `root`.
fn for_each_file(root: &Path, mut f: impl FnMut(&Path)) {
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("a directory") {
            let path = entry.expect("an entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                f(&path);
            }
        }
    }
}

/// Reads and BLAKE3-hashes every file below `root`: the baseline.
fn read_and_hash(root: &Path) -> (f64, u64) {
    let started = Instant::now();
    let mut total = 0;
    let mut buffer = vec![0_u8; 1 << 20];
    for_each_file(root, |path| {
        let mut file = fs::File::open(path).expect("a file");
        let mut hasher = blake3::Hasher::new();
        loop {
            let n = file.read(&mut buffer).expect("readable");
            if n == 0 {
                break;
            }
            total += n as u64;
            hasher.update(&buffer[..n]);
        }
        std::hint::black_box(hasher.finalize());
    });
    (started.elapsed().as_secs_f64(), total)
}

/// CPU seconds this process has used, user and system.
fn cpu_seconds() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    let usage = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage");
    let seconds = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    seconds(usage.user_time()) + seconds(usage.system_time())
}

/// The least CPU an initial backup of `root` can spend with this design, measured
/// on one thread of this process in the same run: read every file, cut it with
/// the client's own `Chunker`, id every chunk, compress and seal each distinct
/// one with its `Sealer`, write the sealed bytes to a spool file synced every
/// 16 MiB (as often as the client commits its state), and read each 32 MiB of it
/// back once, as the upload does. No index, no
/// state database, no threads, no trees, no TLS and no socket: everything the
/// real run adds to this is left out, so the real run can only cost more.
/// Returns CPU seconds and the sealed bytes.
fn sealing_floor(root: &Path, scratch: &Path) -> (f64, u64) {
    use homing_crypto::{MasterKey, ObjectKind};
    use homing_transfer::{Chunker, DEFAULT_ZSTD_LEVEL, Sealer};
    let master = MasterKey::generate().expect("a key");
    let keys = master.key_ring();
    let mut sealer = Sealer::new(&keys, DEFAULT_ZSTD_LEVEL).expect("a sealer");
    let mut seen = std::collections::HashSet::new();
    let mut spool = fs::OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(scratch)
        .expect("a spool file");
    // Bytes sealed (written), written since the last sync, and read back.
    let (mut sealed, mut unsynced, mut read) = (0_u64, 0_u64, 0_u64);
    let mut batch = Vec::new();
    let mut back = Vec::new();
    // Reads back the objects (their lengths) written last, `bytes` in all.
    let mut read_back = |spool: &mut fs::File, batch: &mut Vec<u64>, bytes: u64| {
        let mut at = spool.stream_position().expect("a position") - bytes;
        for len in batch.drain(..) {
            back.resize(len as usize, 0);
            spool.seek(SeekFrom::Start(at)).expect("seek");
            spool.read_exact(&mut back).expect("read back");
            at += len;
        }
        spool.seek(SeekFrom::End(0)).expect("seek");
    };
    let cpu = cpu_seconds();
    let mut buffer = Some(Vec::new());
    for_each_file(root, |path| {
        let file = fs::File::open(path).expect("a file");
        let reused = buffer.take().expect("given back");
        let mut chunker = Chunker::reusing(file, keys.chunker_seed(), reused);
        while let Some((_, chunk)) = chunker.next_chunk().expect("readable") {
            let id = keys.object_id(chunk);
            if !seen.insert(id) {
                continue;
            }
            let object = sealer
                .seal_with_id(ObjectKind::Chunk, id, chunk)
                .expect("sealed");
            spool.write_all(&object.bytes).expect("spooled");
            let len = object.bytes.len() as u64;
            (unsynced, sealed) = (unsynced + len, sealed + len);
            batch.push(len);
            if unsynced >= 16 << 20 {
                spool.sync_data().expect("synced");
                unsynced = 0;
            }
            if sealed - read >= 32 << 20 {
                read_back(&mut spool, &mut batch, sealed - read);
                read = sealed;
            }
        }
        buffer = Some(chunker.into_buffer());
    });
    spool.sync_data().expect("synced");
    read_back(&mut spool, &mut batch, sealed - read);
    let cpu = cpu_seconds() - cpu;
    drop(spool);
    fs::remove_file(scratch).expect("removed");
    (cpu, sealed)
}

fn compressed(data: &[u8]) -> u64 {
    zstd::bulk::compress(data, 3).expect("zstd").len() as u64
}

fn num(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} in {v}"))
}

fn median(mut values: Vec<u64>) -> u64 {
    values.sort_unstable();
    values[values.len() / 2]
}

/// A tree of `count` small files over `dirs` directories under the bench's work
/// directory, and the summary of its initial backup as set `name`.
fn many_backed_up(
    rig: &Rig,
    name: &str,
    count: usize,
    dirs: usize,
    g: &mut Gen,
) -> (PathBuf, Value) {
    let root = rig.work.join(name);
    many(&root, count, dirs, g);
    let summary = rig.backup(name, &root);
    (root, summary)
}

/// The peak-memory line for the initial backups of 10k and of 200k small files.
fn rss_line(tenk: &Value, twohundredk: &Value, scale: usize) -> (f64, f64) {
    let (rss_10k, rss_200k) = (
        num(tenk, "peak_rss_bytes") / 1e6,
        num(twohundredk, "peak_rss_bytes") / 1e6,
    );
    println!(
        "peak RSS, initial backup: {rss_10k:.1} MB for {} files, {rss_200k:.1} MB for {} files ({:.2}x)",
        10_000 / scale,
        200_000 / scale,
        rss_200k / rss_10k
    );
    (rss_10k, rss_200k)
}

fn main() {
    let quick = std::env::var_os("HOMING_BENCH_QUICK").is_some();
    let scale = if quick { 10 } else { 1 };
    let base = std::env::var_os("HOMING_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(base).expect("a work directory");
    let rig = Rig::new(dir.path().to_path_buf());
    let mut g = Gen(0x2026_1127_0000_0001);
    let mut report = serde_json::Map::new();

    if std::env::var_os("HOMING_BENCH_RSS_ONLY").is_some() {
        // For measuring memory alone: the 10k and 200k initial backups, in a
        // fresh store (the full run's state holds the other sets too).
        let (_, tenk) = many_backed_up(&rig, "tenk", 10_000 / scale, 500 / scale, &mut g);
        let (_, large) = many_backed_up(&rig, "twohundredk", 200_000 / scale, 4000 / scale, &mut g);
        rss_line(&tenk, &large, scale);
        return;
    }
    // Initial backup and rescan of the laptop tree.
    let tree = rig.work.join("laptop");
    let size = laptop(&tree, scale, &mut g);
    let (hash_seconds, hashed) = read_and_hash(&tree);
    assert_eq!(hashed, size);
    let first = rig.backup("laptop", &tree);
    let mb = size as f64 / 1e6;
    let gb = size as f64 / 1e9;
    let seconds = num(&first, "seconds");
    println!("tree: {mb:.0} MB");
    println!(
        "initial backup: {:.1} s, {:.0} MB/s, {:.2} CPU-s/GB, peak RSS {:.1} MB; sent {:.1} MB",
        seconds,
        mb / seconds,
        num(&first, "cpu_seconds") / gb,
        num(&first, "peak_rss_bytes") / 1e6,
        num(&first, "connection_sent") / 1e6,
    );
    println!(
        "  baseline (read + BLAKE3 every file, same run): {:.1} s, {:.0} MB/s; backup/baseline time {:.2}x",
        hash_seconds,
        mb / hash_seconds,
        seconds / hash_seconds
    );
    let (floor_cpu, floor_sealed) = sealing_floor(&tree, &rig.work.join("floor.spool"));
    println!(
        "  floor (one thread: read, cut, id, seal each distinct chunk, spool with syncs, read back; \
         no state, no trees, no TLS): {:.2} CPU-s/GB, sealed {:.1} MB; backup/floor CPU {:.2}x",
        floor_cpu / gb,
        floor_sealed as f64 / 1e6,
        num(&first, "cpu_seconds") / floor_cpu,
    );
    if std::env::var_os("HOMING_BENCH_INITIAL_ONLY").is_some() {
        // For profiling the initial backup (`perf record` around the bench).
        return;
    }
    let rescan = rig.backup("laptop", &tree);
    println!(
        "rescan, unchanged: {:.2} s, read {} bytes, sent {} bytes",
        num(&rescan, "seconds"),
        rescan["bytes_read"],
        rescan["connection_sent"]
    );
    report.insert("tree_mb".into(), mb.into());
    report.insert("initial_mb_per_s".into(), (mb / seconds).into());
    report.insert(
        "initial_cpu_s_per_gb".into(),
        (num(&first, "cpu_seconds") / gb).into(),
    );
    report.insert(
        "initial_peak_rss_mb".into(),
        (num(&first, "peak_rss_bytes") / 1e6).into(),
    );
    report.insert("baseline_mb_per_s".into(), (mb / hash_seconds).into());
    report.insert("floor_cpu_s_per_gb".into(), (floor_cpu / gb).into());
    report.insert("rescan_s".into(), num(&rescan, "seconds").into());

    // (c) An hour of typical edits.
    let mut new_information = 0;
    for n in 0..5 {
        let addition = g.text(20_000 / scale);
        new_information += compressed(&addition);
        let mut log = fs::OpenOptions::new()
            .append(true)
            .open(tree.join(format!("logs/app{n}.log")))
            .expect("a log");
        log.write_all(&addition).expect("appended");
    }
    let sources = 2000 / scale;
    for k in 0..sources / 100 {
        let n = (k * 97) % sources;
        let path = tree.join(format!("src/dir{:03}/file{n:04}.rs", n % 100));
        let mut data = fs::read(&path).expect("a source");
        let at = data.len() / 2;
        let line = g.text(60);
        new_information += compressed(&line);
        data.splice(at..at, line);
        fs::write(&path, data).expect("edited");
    }
    for n in 0..2 {
        let photo = g.random(3 << 20);
        new_information += compressed(&photo);
        write(&tree.join(format!("photos/new_{n}.jpg")), &photo);
    }
    fs::rename(tree.join("src/dir007"), tree.join("src/dir007-renamed")).expect("renamed");
    let hour = rig.backup("laptop", &tree);
    let sent = num(&hour, "connection_sent") as u64;
    println!(
        "(c) an hour of edits: sent {sent} bytes for {new_information} bytes of new information (compressed): {:+.1} %",
        (sent as f64 / new_information as f64 - 1.0) * 100.0
    );
    report.insert("c_sent".into(), sent.into());
    report.insert("c_new_information".into(), new_information.into());

    // (a) 100 bytes in the middle of a 200 MB file of mixed content.
    let big_dir = rig.work.join("big");
    let big = big_dir.join("mixed.bin");
    let big_len = (200 << 20) / scale;
    write(&big, &g.mixed(big_len));
    rig.backup("big", &big_dir);
    let mut sends = Vec::new();
    let mut cpu = Vec::new();
    for _ in 0..20 {
        let at = big_len / 4 + (g.next() % (big_len as u64 / 2)) as usize;
        let mut file = fs::OpenOptions::new()
            .write(true)
            .open(&big)
            .expect("the big file");
        file.seek(SeekFrom::Start(at as u64)).expect("seek");
        file.write_all(&g.random(100)).expect("written");
        drop(file);
        let summary = rig.backup("big", &big_dir);
        sends.push(num(&summary, "connection_sent") as u64);
        cpu.push((num(&summary, "cpu_seconds") * 1000.0) as u64);
    }
    let a = median(sends.clone());
    println!(
        "(a) 100 bytes in a {} MB file: median {a} bytes sent ({:.1} KiB; min {}, max {})",
        big_len >> 20,
        a as f64 / 1024.0,
        sends.iter().min().expect("20"),
        sends.iter().max().expect("20"),
    );
    let a_cpu = median(cpu);
    println!(
        "    each backup of it: median {a_cpu} CPU-ms ({:.2} CPU-s/GB of the file)",
        a_cpu as f64 / 1000.0 / (big_len as f64 / 1e9)
    );
    report.insert("a_median_sent".into(), a.into());
    report.insert("a_median_cpu_ms".into(), a_cpu.into());

    // (b) One new 1 KB file in 10k files over 500 directories.
    let (small, tenk) = many_backed_up(&rig, "tenk", 10_000 / scale, 500 / scale, &mut g);
    write(&small.join("top03/dir0123/new.txt"), &g.text(1000));
    let b = rig.backup("tenk", &small);
    let b_sent = num(&b, "connection_sent") as u64;
    println!(
        "(b) one new 1 KB file in {} files: {b_sent} bytes sent ({:.1} KiB)",
        10_000 / scale,
        b_sent as f64 / 1024.0
    );
    report.insert("b_sent".into(), b_sent.into());

    // Rescan of 100k unchanged files; peak memory for 10k vs 200k files.
    let (hundredk, _) = many_backed_up(&rig, "hundredk", 100_000 / scale, 2000 / scale, &mut g);
    let again = rig.backup("hundredk", &hundredk);
    println!(
        "rescan of {} unchanged files: {:.2} s (CPU {:.2} s)",
        100_000 / scale,
        num(&again, "seconds"),
        num(&again, "cpu_seconds"),
    );
    report.insert("rescan_100k_s".into(), num(&again, "seconds").into());
    fs::remove_dir_all(&hundredk).expect("cleaned");
    let (_, large) = many_backed_up(&rig, "twohundredk", 200_000 / scale, 4000 / scale, &mut g);
    let (rss_10k, rss_200k) = rss_line(&tenk, &large, scale);
    report.insert("rss_10k_mb".into(), rss_10k.into());
    report.insert("rss_200k_mb".into(), rss_200k.into());
    let _ = &rig.store_binary;
    println!("{}", Value::Object(report));
}
