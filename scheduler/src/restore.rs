//! Reading snapshots back: `snapshots`, `ls`, `restore`, `verify`.
//!
//! Every object is authenticated and its plaintext checked against its id before a
//! byte of it is written; a file is written to a temporary name beside its place
//! and renamed only when all of it verified, so a damaged or foreign object never
//! leaves wrong bytes under the file's name. A restore that is run again skips the
//! files already in place: same size, and the same chunk ids when the local file
//! is cut again (read locally, nothing fetched).

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, bail};
use homing_crypto::{KeyRing, ObjectId, ObjectKind};
use homing_transfer::proto::ObjectState;
use homing_transfer::{Chunker, open_object};
use redb::Database;
use serde::Serialize;

use crate::remote::{Remote, checked_head};
use crate::tree::{Content, Entry, Kind, Manifest, decode_list, decode_tree};

/// A snapshot as `homing snapshots` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotInfo {
    /// Its id.
    pub id: String,
    /// The store's sequence number.
    pub store_sequence: u64,
    /// When the store committed it (seconds since the epoch).
    pub committed_at: u64,
    /// The manifest.
    pub manifest: Manifest,
}

/// Lists the store's snapshots with their manifests, oldest first.
///
/// # Errors
/// Connection errors, manifests that do not open, rollback.
pub fn snapshots(
    remote: &mut Remote,
    keys: &KeyRing,
    db: &Database,
) -> anyhow::Result<Vec<SnapshotInfo>> {
    checked_head(remote, keys, db)?;
    let list = remote.run(async |c| c.list().await)?;
    let mut out = Vec::with_capacity(list.entries.len());
    for entry in list.entries {
        let manifest = remote.manifest(keys, entry.id)?;
        out.push(SnapshotInfo {
            id: entry.id.to_string(),
            store_sequence: entry.sequence,
            committed_at: entry.committed_at,
            manifest,
        });
    }
    Ok(out)
}

/// Finds a snapshot: `latest`, its id, or an unambiguous prefix of it.
///
/// # Errors
/// No such snapshot, an ambiguous prefix, or an empty store.
pub fn resolve(
    remote: &mut Remote,
    keys: &KeyRing,
    db: &Database,
    spec: &str,
) -> anyhow::Result<(ObjectId, Manifest)> {
    let head = checked_head(remote, keys, db)?;
    if spec == "latest" {
        let (id, _) = head.context("the store has no snapshots yet")?;
        let manifest = remote.manifest(keys, id)?;
        return Ok((id, manifest));
    }
    let spec = spec.to_ascii_lowercase();
    if spec.is_empty() || !spec.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("`{spec}` is not a snapshot id, a prefix of one, or `latest`");
    }
    let list = remote.run(async |c| c.list().await)?;
    let matches: Vec<ObjectId> = list
        .entries
        .iter()
        .map(|e| e.id)
        .filter(|id| id.to_string().starts_with(&spec))
        .collect();
    match matches.as_slice() {
        [id] => {
            let manifest = remote.manifest(keys, *id)?;
            Ok((*id, manifest))
        }
        [] => bail!("no snapshot id starts with `{spec}`; see `homing snapshots`"),
        _ => bail!(
            "`{spec}` is ambiguous: {} snapshots start with it; give more digits",
            matches.len()
        ),
    }
}

/// Fetches and opens a tree.
///
/// # Errors
/// A missing or damaged tree, naming its id and the directory.
pub fn fetch_tree(
    remote: &mut Remote,
    keys: &KeyRing,
    id: ObjectId,
    path: &Path,
) -> anyhow::Result<Vec<Entry>> {
    let sealed = remote
        .run(async |c| c.get(id).await)
        .with_context(|| format!("cannot fetch tree {id} of {}", path.display()))?;
    let plain = open_object(keys, ObjectKind::Tree, &id, &sealed).with_context(|| {
        format!(
            "tree {id} of {} does not authenticate: damaged, swapped or not ours",
            path.display()
        )
    })?;
    decode_tree(&plain).with_context(|| format!("tree {id} of {}", path.display()))
}

/// The chunk ids of a file's content (fetching its lists if it has them).
///
/// # Errors
/// A missing or damaged list, naming its id and the file.
pub fn chunk_ids(
    remote: &mut Remote,
    keys: &KeyRing,
    content: &Content,
    path: &Path,
) -> anyhow::Result<Vec<ObjectId>> {
    match content {
        Content::Inline(ids) => Ok(ids.clone()),
        Content::Lists(lists) => {
            let mut ids = Vec::new();
            let mut failure = None;
            let fetched = remote.run(async |c| {
                c.get_many(lists, |id, sealed| {
                    match open_object(keys, ObjectKind::Tree, &id, &sealed)
                        .map_err(|e| e.to_string())
                        .and_then(|plain| decode_list(&plain).map_err(|e| e.to_string()))
                    {
                        Ok(list) => {
                            ids.extend(list);
                            Ok(())
                        }
                        Err(error) => {
                            failure = Some((id, error));
                            Err(std::io::Error::other("a list does not open"))
                        }
                    }
                })
                .await
            });
            if let Some((id, error)) = failure {
                bail!(
                    "chunk list {id} of {} does not authenticate: {error}",
                    path.display()
                );
            }
            fetched
                .with_context(|| format!("cannot fetch the chunk lists of {}", path.display()))?;
            Ok(ids)
        }
    }
}

/// Finds the entry at `path` (absolute, inside the snapshot) below `root`.
/// Returns the entries of the path's components, from the top.
fn find(
    remote: &mut Remote,
    keys: &KeyRing,
    root: ObjectId,
    path: &Path,
) -> anyhow::Result<Vec<Entry>> {
    let mut trail = Vec::new();
    let mut tree = root;
    let mut at = PathBuf::from("/");
    for component in path.components() {
        let name = match component {
            Component::RootDir | Component::CurDir => continue,
            Component::Normal(name) => name.as_bytes(),
            _ => bail!(
                "{}: only plain absolute paths name files in a snapshot",
                path.display()
            ),
        };
        let entries = fetch_tree(remote, keys, tree, &at)?;
        let entry = entries
            .into_iter()
            .find(|e| e.name == name)
            .with_context(|| format!("{} is not in the snapshot", path.display()))?;
        at.push(OsStr::from_bytes(name));
        if let Kind::Dir(id) = entry.kind {
            tree = id;
        }
        trail.push(entry);
    }
    Ok(trail)
}

/// A line of `homing ls`.
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    /// The path (lossy UTF-8 for display).
    pub path: String,
    /// `dir`, `file`, `symlink` or `fifo`.
    pub kind: &'static str,
    /// Permission bits.
    pub mode: u32,
    /// Size in bytes (files).
    pub size: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Symlink target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// Lists the entries of the tree `root` below `path`, depth first.
///
/// # Errors
/// Missing or damaged trees.
pub fn ls(
    remote: &mut Remote,
    keys: &KeyRing,
    root: ObjectId,
    path: Option<&Path>,
    out: &mut dyn FnMut(Listed) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let start = path.unwrap_or(Path::new("/"));
    let trail = find(remote, keys, root, start)?;
    match trail.last() {
        None => walk_listing(remote, keys, root, Path::new("/"), out),
        Some(entry) => {
            out(listed(start, entry))?;
            if let Kind::Dir(id) = entry.kind {
                walk_listing(remote, keys, id, start, out)?;
            }
            Ok(())
        }
    }
}

fn walk_listing(
    remote: &mut Remote,
    keys: &KeyRing,
    tree: ObjectId,
    at: &Path,
    out: &mut dyn FnMut(Listed) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    for entry in fetch_tree(remote, keys, tree, at)? {
        let path = at.join(OsStr::from_bytes(&entry.name));
        out(listed(&path, &entry))?;
        if let Kind::Dir(id) = entry.kind {
            walk_listing(remote, keys, id, &path, out)?;
        }
    }
    Ok(())
}

fn listed(path: &Path, entry: &Entry) -> Listed {
    let (kind, size, target) = match &entry.kind {
        Kind::Dir(_) => ("dir", 0, None),
        Kind::File { size, .. } => ("file", *size, None),
        Kind::Symlink(target) => (
            "symlink",
            0,
            Some(String::from_utf8_lossy(target).into_owned()),
        ),
        Kind::Fifo => ("fifo", 0, None),
    };
    Listed {
        path: path.to_string_lossy().into_owned(),
        kind,
        mode: entry.mode,
        size,
        mtime: entry.mtime,
        target,
    }
}

/// What a restore did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreSummary {
    /// Files written.
    pub files_restored: u64,
    /// Files already in place (not fetched).
    pub files_in_place: u64,
    /// Directories.
    pub dirs: u64,
    /// Symlinks, FIFOs and hard links made.
    pub others: u64,
    /// Bytes of file content written.
    pub bytes_written: u64,
    /// Bytes the connection received.
    pub bytes_received: u64,
    /// Files that failed (named), with why.
    pub failures: Vec<String>,
}

/// Restores `path` of the tree `root` (everything if `None`) under `target`, keeping
/// its layout: `/home/me/a` lands in `TARGET/home/me/a`.
///
/// # Errors
/// A snapshot whose trees do not open; a target that cannot be written. Files whose
/// content fails are named in [`RestoreSummary::failures`] and the rest goes on.
pub fn restore(
    remote: &mut Remote,
    keys: &KeyRing,
    root: ObjectId,
    path: Option<&Path>,
    target: &Path,
) -> anyhow::Result<RestoreSummary> {
    fs::create_dir_all(target)
        .with_context(|| format!("cannot create the target {}", target.display()))?;
    let mut restorer = Restorer {
        remote,
        keys,
        summary: RestoreSummary::default(),
        links: HashMap::new(),
        owner: nix::unistd::geteuid().is_root(),
    };
    let start = path.unwrap_or(Path::new("/"));
    let trail = find(restorer.remote, keys, root, start)?;
    match trail.split_last() {
        None => restorer.dir(root, Path::new("/"), target)?,
        Some((last, leading)) => {
            // The directories leading to the path, with their metadata after.
            let mut at = target.to_path_buf();
            for entry in leading {
                at.push(OsStr::from_bytes(&entry.name));
                fs::create_dir_all(&at)
                    .with_context(|| format!("cannot create {}", at.display()))?;
            }
            let parent = start.parent().unwrap_or(Path::new("/"));
            restorer.entry(last, parent, &at)?;
        }
    }
    let (_, received) = restorer.remote.traffic();
    restorer.summary.bytes_received = received;
    Ok(restorer.summary)
}

struct Restorer<'a> {
    remote: &'a mut Remote,
    keys: &'a KeyRing,
    summary: RestoreSummary,
    links: HashMap<(u64, u64), PathBuf>,
    owner: bool,
}

impl Restorer<'_> {
    /// Restores the entries of `tree` (the snapshot's `at`) into `dir`.
    fn dir(&mut self, tree: ObjectId, at: &Path, dir: &Path) -> anyhow::Result<()> {
        for entry in fetch_tree(self.remote, self.keys, tree, at)? {
            self.entry(&entry, at, dir)?;
        }
        Ok(())
    }

    fn entry(&mut self, entry: &Entry, at: &Path, dir: &Path) -> anyhow::Result<()> {
        let name = OsStr::from_bytes(&entry.name);
        let source = at.join(name);
        let path = dir.join(name);
        match &entry.kind {
            Kind::Dir(id) => {
                match fs::symlink_metadata(&path) {
                    Ok(meta) if meta.is_dir() => {}
                    Ok(_) => {
                        fs::remove_file(&path)
                            .with_context(|| format!("cannot replace {}", path.display()))?;
                        fs::create_dir(&path)
                            .with_context(|| format!("cannot create {}", path.display()))?;
                    }
                    Err(_) => fs::create_dir(&path)
                        .with_context(|| format!("cannot create {}", path.display()))?,
                }
                // Writable while its entries are restored; its own mode comes after.
                fs::set_permissions(&path, fs::Permissions::from_mode(0o700))
                    .with_context(|| format!("cannot change {}", path.display()))?;
                self.dir(*id, &source, &path)?;
                self.summary.dirs += 1;
                self.metadata(entry, &path)?;
            }
            Kind::File {
                size,
                link,
                content,
            } => {
                if let Some(first) = link.and_then(|key| self.links.get(&key)).cloned() {
                    remove_any(&path)?;
                    fs::hard_link(&first, &path).with_context(|| {
                        format!("cannot link {} to {}", path.display(), first.display())
                    })?;
                    self.summary.others += 1;
                    return Ok(());
                }
                match self.file(&source, &path, *size, content) {
                    Ok(()) => {
                        self.metadata(entry, &path)?;
                        if let Some(key) = link {
                            self.links.insert(*key, path);
                        }
                    }
                    Err(error) => {
                        let message = format!("{}: {error:#}", source.display());
                        tracing::error!("{message}");
                        self.summary.failures.push(message);
                    }
                }
            }
            Kind::Symlink(target) => {
                let wanted = OsStr::from_bytes(target);
                let same = fs::read_link(&path).is_ok_and(|t| t.as_os_str() == wanted);
                if !same {
                    remove_any(&path)?;
                    std::os::unix::fs::symlink(wanted, &path)
                        .with_context(|| format!("cannot create symlink {}", path.display()))?;
                }
                self.summary.others += 1;
                self.metadata(entry, &path)?;
            }
            Kind::Fifo => {
                let is_fifo = fs::symlink_metadata(&path)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_fifo(&m.file_type()));
                if !is_fifo {
                    remove_any(&path)?;
                    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600))
                        .with_context(|| format!("cannot create FIFO {}", path.display()))?;
                }
                self.summary.others += 1;
                self.metadata(entry, &path)?;
            }
        }
        Ok(())
    }

    /// Restores a file's content unless the file in place has it already.
    fn file(
        &mut self,
        source: &Path,
        path: &Path,
        size: u64,
        content: &Content,
    ) -> anyhow::Result<()> {
        let ids = chunk_ids(self.remote, self.keys, content, source)?;
        if in_place(self.keys, path, size, &ids) {
            self.summary.files_in_place += 1;
            return Ok(());
        }
        let mut temporary_name = std::ffi::OsString::from(".");
        temporary_name.push(path.file_name().unwrap_or_default());
        temporary_name.push(".homing-restore");
        let temporary = path.with_file_name(temporary_name);
        let result = self.write(source, &temporary, size, &ids);
        if let Err(error) = result {
            let _ = fs::remove_file(&temporary);
            return Err(error);
        }
        if fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
            fs::remove_dir_all(path)
                .with_context(|| format!("cannot replace directory {}", path.display()))?;
        }
        fs::rename(&temporary, path)
            .with_context(|| format!("cannot move the restored file to {}", path.display()))?;
        self.summary.files_restored += 1;
        self.summary.bytes_written += size;
        Ok(())
    }

    fn write(
        &mut self,
        source: &Path,
        temporary: &Path,
        size: u64,
        ids: &[ObjectId],
    ) -> anyhow::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode_private()
            .open(temporary)
            .with_context(|| format!("cannot create {}", temporary.display()))?;
        let keys = self.keys;
        let mut written = 0_u64;
        let mut failure: Option<anyhow::Error> = None;
        let fetched = self.remote.run(async |c| {
            c.get_many(ids, |id, sealed| {
                let plain = match open_object(keys, ObjectKind::Chunk, &id, &sealed) {
                    Ok(plain) => plain,
                    Err(error) => {
                        failure = Some(anyhow::anyhow!(
                            "object {id} does not authenticate ({error}): damaged, swapped \
                             or not ours; nothing of this file was written"
                        ));
                        return Err(std::io::Error::other("an object does not open"));
                    }
                };
                // Runs of zeros become holes: sparse files stay sparse.
                if plain.iter().all(|&b| b == 0) {
                    file.seek(SeekFrom::Current(plain.len() as i64))?;
                } else {
                    file.write_all(&plain)?;
                }
                written += plain.len() as u64;
                Ok(())
            })
            .await
        });
        if let Some(error) = failure {
            return Err(error);
        }
        fetched.with_context(|| format!("cannot fetch the content of {}", source.display()))?;
        if written != size {
            bail!(
                "{}: the snapshot says {size} bytes, its objects hold {written}",
                source.display()
            );
        }
        file.set_len(size)?;
        file.sync_all()
            .with_context(|| format!("cannot write {}", temporary.display()))?;
        Ok(())
    }

    /// Mode, owner (as root) and modification time.
    fn metadata(&mut self, entry: &Entry, path: &Path) -> anyhow::Result<()> {
        use nix::sys::stat::{UtimensatFlags, utimensat};
        use nix::sys::time::TimeSpec;
        let symlink = matches!(entry.kind, Kind::Symlink(_));
        if self.owner {
            nix::unistd::fchownat(
                nix::fcntl::AT_FDCWD,
                path,
                Some(nix::unistd::Uid::from_raw(entry.uid)),
                Some(nix::unistd::Gid::from_raw(entry.gid)),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .with_context(|| format!("cannot change the owner of {}", path.display()))?;
        }
        if !symlink {
            fs::set_permissions(path, fs::Permissions::from_mode(entry.mode))
                .with_context(|| format!("cannot change the mode of {}", path.display()))?;
        }
        let mtime = TimeSpec::new(entry.mtime, i64::from(entry.mtime_nanos));
        utimensat(
            nix::fcntl::AT_FDCWD,
            path,
            &TimeSpec::UTIME_OMIT,
            &mtime,
            UtimensatFlags::NoFollowSymlink,
        )
        .with_context(|| format!("cannot set the time of {}", path.display()))?;
        Ok(())
    }
}

trait PrivateMode {
    fn mode_private(&mut self) -> &mut Self;
}

impl PrivateMode for OpenOptions {
    fn mode_private(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

fn remove_any(path: &Path) -> anyhow::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(_) => return Ok(()),
    }
    .with_context(|| format!("cannot replace {}", path.display()))
}

/// Whether the regular file at `path` already holds exactly this content.
fn in_place(keys: &KeyRing, path: &Path, size: u64, ids: &[ObjectId]) -> bool {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return false;
    };
    if !meta.is_file() || meta.len() != size || meta.nlink() > 1 {
        return false;
    }
    let Ok(file) = File::open(path) else {
        return false;
    };
    let mut chunker = Chunker::new(file, keys.chunker_seed());
    let mut expected = ids.iter();
    loop {
        match chunker.next_chunk() {
            Ok(Some((_, data))) => {
                if expected.next() != Some(&keys.object_id(data)) {
                    return false;
                }
            }
            Ok(None) => return expected.next().is_none(),
            Err(_) => return false,
        }
    }
}

/// What `verify` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifySummary {
    /// The snapshot.
    pub snapshot: String,
    /// Trees checked.
    pub trees: u64,
    /// Files checked.
    pub files: u64,
    /// Chunk objects checked (present, or read and authenticated).
    pub objects: u64,
    /// Whether the data was read.
    pub read_data: bool,
    /// What is wrong, naming objects and files.
    pub problems: Vec<String>,
}

/// Checks a snapshot: every tree opens, every object is in the store, and with
/// `read_data`, every object is fetched and authenticated.
///
/// # Errors
/// Connection errors; what is wrong with the snapshot goes into the summary.
pub fn verify(
    remote: &mut Remote,
    keys: &KeyRing,
    snapshot: ObjectId,
    manifest: &Manifest,
    read_data: bool,
) -> anyhow::Result<VerifySummary> {
    let mut verifier = Verifier {
        summary: VerifySummary {
            snapshot: snapshot.to_string(),
            read_data,
            ..VerifySummary::default()
        },
        seen_trees: HashSet::new(),
        seen_objects: HashSet::new(),
        batch: Vec::new(),
        read_data,
    };
    // Every set the snapshot holds: its own and the others as last committed.
    for (_, root) in manifest.roots() {
        verifier.tree(remote, keys, root, Path::new("/"))?;
    }
    verifier.flush(remote, keys)?;
    Ok(verifier.summary)
}

struct Verifier {
    summary: VerifySummary,
    seen_trees: HashSet<ObjectId>,
    seen_objects: HashSet<ObjectId>,
    /// Objects to check and the file they belong to.
    batch: Vec<(ObjectId, PathBuf)>,
    read_data: bool,
}

impl Verifier {
    fn tree(
        &mut self,
        remote: &mut Remote,
        keys: &KeyRing,
        id: ObjectId,
        at: &Path,
    ) -> anyhow::Result<()> {
        if !self.seen_trees.insert(id) {
            return Ok(());
        }
        self.summary.trees += 1;
        let entries = match fetch_tree(remote, keys, id, at) {
            Ok(entries) => entries,
            Err(error) => {
                self.summary.problems.push(format!("{error:#}"));
                return Ok(());
            }
        };
        for entry in entries {
            let path = at.join(OsStr::from_bytes(&entry.name));
            match &entry.kind {
                Kind::Dir(id) => self.tree(remote, keys, *id, &path)?,
                Kind::File { content, .. } => {
                    self.summary.files += 1;
                    match chunk_ids(remote, keys, content, &path) {
                        Ok(ids) => {
                            for id in ids {
                                if self.seen_objects.insert(id) {
                                    self.batch.push((id, path.clone()));
                                }
                            }
                        }
                        Err(error) => self.summary.problems.push(format!("{error:#}")),
                    }
                    if self.batch.len() >= 4096 {
                        self.flush(remote, keys)?;
                    }
                }
                Kind::Symlink(_) | Kind::Fifo => {}
            }
        }
        Ok(())
    }

    fn flush(&mut self, remote: &mut Remote, keys: &KeyRing) -> anyhow::Result<()> {
        let batch = std::mem::take(&mut self.batch);
        if batch.is_empty() {
            return Ok(());
        }
        self.summary.objects += batch.len() as u64;
        let ids: Vec<ObjectId> = batch.iter().map(|(id, _)| *id).collect();
        let states = remote.run(async |c| c.query(&ids).await)?;
        let mut present = Vec::new();
        for ((id, path), state) in batch.iter().zip(states) {
            if state == ObjectState::Stored {
                present.push((*id, path));
            } else {
                self.summary.problems.push(format!(
                    "object {id} of {} is missing from the store",
                    path.display()
                ));
            }
        }
        if self.read_data {
            // Fetched pipelined, delivered in order: the n-th delivery is present[n].
            let ids: Vec<ObjectId> = present.iter().map(|(id, _)| *id).collect();
            let mut at = 0;
            let problems = &mut self.summary.problems;
            let fetched = remote.run(async |c| {
                c.get_many(&ids, |id, sealed| {
                    let path = present[at].1;
                    at += 1;
                    if let Err(error) = open_object(keys, ObjectKind::Chunk, &id, &sealed) {
                        problems.push(format!(
                            "object {id} of {} does not authenticate: {error}",
                            path.display()
                        ));
                    }
                    Ok(())
                })
                .await
            });
            if let Err(error) = fetched {
                let path = present.get(at).map(|(_, p)| p.display().to_string());
                problems.push(format!(
                    "{}: {error}",
                    path.unwrap_or_else(|| "the snapshot".into())
                ));
            }
        }
        Ok(())
    }
}
