//! `homing backup`: scan, seal what changed into the spool, upload, commit.
//!
//! ```text
//!  walk (sorted) ──▶ index says unchanged? ──yes──▶ reuse its content ids
//!        │                    │ no
//!        │                    ▼
//!        │          read, chunk, seal ──▶ spool (same transaction as the index entry)
//!        ▼
//!  tree per directory (Merkle) ──▶ manifest ──▶ upload the spool ──▶ commit
//! ```
//!
//! The walk visits paths in the order of their index keys (components joined by
//! NUL), so the old index is read alongside it like a sorted merge: an index key
//! the walk passes without visiting belongs to a file that is gone and is dropped.
//! Memory holds one directory's entries per level of the walk, never the tree.
//!
//! Crash safety: a file's index entry and the sealed objects of its content are
//! committed in one transaction, so everything the index names is in the spool or
//! in the store; objects leave the spool only after the store said `Stored`.
//! Killed at any point, the next run re-reads no unchanged file and uploads only
//! what the store lacks.

use std::collections::BTreeMap;
use std::fs::{File, Metadata};
use std::ops::Bound;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use anyhow::{Context, bail};
use homing_crypto::{KeyRing, ObjectId, ObjectKind};
use homing_transfer::client::{ClientError, Pending};
use homing_transfer::proto::{ObjectState, WireError};
use homing_transfer::stream::BudgetExhausted;
use homing_transfer::{Chunker, PipelineOptions, SealedObject, Sealer, seal_new_chunks};
use ignore::gitignore::{Gitignore, GitignoreBuilder};
use indicatif::{ProgressBar, ProgressStyle};
use redb::{Database, ReadOnlyTable, ReadableDatabase, ReadableTable, WriteTransaction};
use serde::Serialize;

use crate::config::BackupSet;
use crate::remote::{self, Remote};
use crate::spool::{self as spool_files, Damaged, SPOOL_AT, Spool};
use crate::state::{self, IndexEntry, KNOWN, SetHead};

use crate::tree::{
    Content, Entry, INLINE_IDS, Kind, Manifest, ManifestSummary, OtherSet, encode_list,
    encode_tree, split_ids,
};

/// Files at least this large are sealed by the parallel pipeline, where a run
/// has two threads or more for it ([`Run::sealing_threads`]).
const PARALLEL_FROM: u64 = 8 << 20;
/// A scan transaction is committed after this many sealed bytes (redb keeps a
/// transaction's pages in memory until it commits; each commit syncs the spool
/// and the state: at 4 MiB they cost an initial backup about 3 % more CPU) ...
const TXN_BYTES: u64 = 16 << 20;
/// ... or this much time.
const TXN_TIME: Duration = Duration::from_secs(5);
/// While the store is reachable, the spool is uploaded whenever it holds this
/// much (or the configured limit, if lower): memory and the state file stay small
/// and the link is busy while the scan goes on.
const UPLOAD_BATCH: u64 = 32 << 20;
/// ... or this many objects: an upload holds every waiting object's id, place
/// and answer in memory, and 32 MiB of small files is tens of thousands.
const UPLOAD_OBJECTS: u64 = 8192;
/// Tries to read a file that keeps changing while it is read.
const READ_TRIES: usize = 3;
/// Unreadable paths named in the summary (all are counted).
const NAMED_PROBLEMS: usize = 50;

/// A file being backed up could not be read: the file's problem, not the
/// backup's (it is named, counted and left out, and the run goes on). Only the
/// reads of the file itself are marked so; any other failure while sealing it
/// (the spool, the state) stops the set's backup.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Unreadable(std::io::Error);

/// What a backup run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// The backup set.
    pub set: String,
    /// The new snapshot.
    pub snapshot: Option<String>,
    /// Its sequence number.
    pub sequence: u64,
    /// Files looked at.
    pub files_scanned: u64,
    /// Files read because they were new or changed.
    pub files_changed: u64,
    /// Files whose metadata said they were unchanged (not read).
    pub files_unchanged: u64,
    /// Files the index knew and the scan did not find.
    pub files_deleted: u64,
    /// Files and directories that could not be read (skipped, named below).
    pub unreadable: u64,
    /// Files that kept changing while being read (the last reading is kept).
    pub changed_while_reading: u64,
    /// Sockets and devices, which are not backed up.
    pub skipped_special: u64,
    /// Cache directories (tagged `CACHEDIR.TAG`) kept empty, their contents left out.
    pub caches_skipped: u64,
    /// Directories.
    pub dirs: u64,
    /// Bytes of file content in the snapshot.
    pub bytes_in_snapshot: u64,
    /// Bytes read from files.
    pub bytes_read: u64,
    /// Plaintext bytes of the objects sealed (content new to this client).
    pub bytes_new: u64,
    /// Bytes of objects sealed (new to this client).
    pub bytes_sealed: u64,
    /// Objects sealed.
    pub objects_sealed: u64,
    /// Objects uploaded.
    pub objects_uploaded: u64,
    /// Object bytes uploaded.
    pub bytes_uploaded: u64,
    /// Bytes the connection sent, TLS included.
    pub bytes_sent: u64,
    /// Bytes the connection received, TLS included.
    pub bytes_received: u64,
    /// Bytes the whole connection had sent when this set was done: its TLS
    /// handshake and the history check included (for one set, all it cost).
    pub connection_sent: u64,
    /// Bytes the whole connection had received then.
    pub connection_received: u64,
    /// Seconds the run took.
    pub seconds: f64,
    /// CPU seconds this process used so far (user + system).
    pub cpu_seconds: f64,
    /// The largest resident memory this process had so far, in bytes.
    pub peak_rss_bytes: u64,
    /// Paths that could not be read, and why (the first few).
    pub problems: Vec<String>,
    /// Sealed into the spool only: the link's policy allowed no upload (or the
    /// store was out of reach); the next run uploads and commits.
    pub queued: bool,
}

impl Summary {
    /// The summary as a person reads it.
    pub fn to_text(&self) -> String {
        if self.queued {
            return format!(
                "set `{}`: sealed into the spool, not uploaded: {} files scanned, {} changed, \
                 {} sealed in {} new objects; the next run that may upload sends them\n",
                self.set,
                self.files_scanned,
                self.files_changed,
                crate::commands::human_bytes(self.bytes_sealed),
                self.objects_sealed
            );
        }
        use crate::commands::human_bytes as b;
        let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
        let mut text = format!(
            "snapshot {} of set `{}` (number {})\n\
             files: {} scanned, {} changed, {} unchanged, {} deleted, {} unreadable, {} changed while read\n\
             directories: {}{}\n\
             read {}, sealed {} in {} new objects, uploaded {} in {} objects\n\
             sent {} on the wire for this set, TLS records included (received {}); the \
             connection, handshake included: {} sent, {} received\n\
             dedup {:.2}x (read / new), compression {:.2}x (new / sealed)\n\
             took {:.1} s ({:.1} s of CPU, peak memory {})\n",
            self.snapshot.as_deref().unwrap_or("-"),
            self.set,
            self.sequence,
            self.files_scanned,
            self.files_changed,
            self.files_unchanged,
            self.files_deleted,
            self.unreadable,
            self.changed_while_reading,
            self.dirs,
            match self.caches_skipped {
                0 => String::new(),
                n => format!(
                    " ({n} cache director{} kept empty, their contents left out: CACHEDIR.TAG)",
                    if n == 1 { "y" } else { "ies" }
                ),
            },
            b(self.bytes_read),
            b(self.bytes_sealed),
            self.objects_sealed,
            b(self.bytes_uploaded),
            self.objects_uploaded,
            b(self.bytes_sent),
            b(self.bytes_received),
            b(self.connection_sent),
            b(self.connection_received),
            ratio(self.bytes_read, self.bytes_new),
            ratio(self.bytes_new, self.bytes_sealed),
            self.seconds,
            self.cpu_seconds,
            b(self.peak_rss_bytes),
        );
        for problem in &self.problems {
            text.push_str("  unreadable: ");
            text.push_str(problem);
            text.push('\n');
        }
        if self.unreadable > self.problems.len() as u64 {
            text.push_str(&format!(
                "  ... and {} more\n",
                self.unreadable - self.problems.len() as u64
            ));
        }
        text
    }
}

/// An object this client believed safe is not: the store lacked it (collected
/// as garbage, or lost and repaired) or its spooled copy was damaged. The caches
/// that said so were dropped, and a new run reads the files that need it and
/// seals and sends it again.
#[derive(Debug, thiserror::Error)]
#[error("{cause}; the local caches were reset, so the next run seals and sends it again")]
pub struct CachesReset {
    /// What was found, naming the object.
    pub cause: String,
}

/// The network's budget ran out during the upload: what was sealed waits in the
/// spool (a cut object resumes where it stopped), nothing was committed.
#[derive(Debug, thiserror::Error)]
#[error(
    "the data budget of this network is spent: {waiting} objects wait in the spool and go when \
     a link's budget allows; nothing was committed"
)]
pub struct BudgetSpent {
    /// Objects still to upload.
    pub waiting: usize,
}

/// Everything a run needs.
pub struct Run<'a> {
    /// The owner's keys.
    pub keys: &'a KeyRing,
    /// The local state.
    pub db: &'a Database,
    /// The spool's files (where [`Run::db`] says each object is).
    pub spool: &'a mut Spool,
    /// The store; `None` seals into the spool only (the link's policy says no,
    /// or the store is out of reach): the next run uploads.
    pub remote: Option<&'a mut Remote>,
    /// Spool limit in bytes.
    pub spool_limit: u64,
    /// Threads that seal a large file beside the walking thread; below 2 the
    /// walking thread seals it alone (`[seal] threads`).
    pub sealing_threads: usize,
    /// Paths never backed up (the client's own state).
    pub skip: Vec<PathBuf>,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// The host name for the manifest.
    pub host: String,
    /// The priority class of the set backed up (its spooled objects carry it).
    pub class: u8,
    /// The classes an upload may take from the spool (the link's policy).
    pub upload_classes: Vec<u8>,
}

impl std::fmt::Debug for Run<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Run").finish_non_exhaustive()
    }
}

/// The order spooled objects go in: the most urgent class first; within a
/// class the spool file with the fewest bytes still waiting first (a file
/// holds what one process sealed, up to `spool::FILE_BYTES`, and what
/// compaction moved into it: roughly one change set), then the order of
/// sealing (which also reads the files front to back). A budget that runs
/// short is spent on what matters most, a small change does not wait behind a
/// large import of the same class, and of equals the older goes first.
fn upload_order(
    mut waiting: Vec<(ObjectId, Option<u8>, Option<spool_files::Location>)>,
    file_bytes: &std::collections::HashMap<u64, u64>,
) -> Vec<ObjectId> {
    waiting.sort_by_key(|(_, class, location)| {
        (
            class.unwrap_or(u8::MAX),
            location.map_or((u64::MAX, u64::MAX, u64::MAX), |l| {
                (
                    file_bytes.get(&l.file).copied().unwrap_or(u64::MAX),
                    l.file,
                    l.offset,
                )
            }),
        )
    });
    waiting.into_iter().map(|(id, _, _)| id).collect()
}

/// A node of the tree of selected paths: the directories leading to them.
#[derive(Debug, Default)]
struct Node {
    selected: bool,
    children: BTreeMap<Vec<u8>, Node>,
}

/// Backs up one set.
///
/// # Errors
/// Connection and store errors, a full spool with an unreachable store, rollback.
/// Unreadable files are not errors: they are counted, named and skipped.
pub fn backup(run: Run<'_>, set: &BackupSet) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let time = jiff::Timestamp::now().as_second();
    let mut roots = Node::default();
    let mut paths = Vec::new();
    for path in &set.paths {
        let path = normalise(path)
            .with_context(|| format!("backup set `{}`: path {}", set.name, path.display()))?;
        paths.push(path.display().to_string());
        let mut node = &mut roots;
        for component in path.components().skip(1) {
            node = node
                .children
                .entry(component.as_os_str().as_bytes().to_vec())
                .or_default();
        }
        node.selected = true;
    }
    let mut excludes = GitignoreBuilder::new("/");
    for pattern in &set.exclude {
        excludes
            .add_line(None, pattern)
            .with_context(|| format!("backup set `{}`: exclude `{pattern}`", set.name))?;
    }
    let excludes = excludes
        .build()
        .with_context(|| format!("backup set `{}`: excludes", set.name))?;

    let mut run = run;
    let (parent, (sent_before, received_before)) = match run.remote.as_deref_mut() {
        Some(remote) => (
            remote::checked_head(remote, run.keys, run.db)?,
            // The connection's counters run across sets: this set's share is the
            // difference.
            remote.traffic(),
        ),
        None => (None, (0, 0)),
    };
    let mut scan = Scan::new(run, set, excludes)?;
    // What an interrupted run left in the spool goes first.
    scan.upload_spool()?;
    let root = scan.virtual_dir(Path::new("/"), &roots)?;
    let root = root.context("nothing to back up: every path is missing or unreadable")?;
    scan.finish_index()?;
    scan.upload_spool()?;
    if scan.run.remote.is_none() {
        // Sealed and queued: nothing to commit until the spool has gone.
        let mut summary = std::mem::take(&mut scan.summary);
        summary.queued = true;
        summary.seconds = started.elapsed().as_secs_f64();
        (summary.cpu_seconds, summary.peak_rss_bytes) = resources();
        scan.progress.finish_and_clear();
        return Ok(summary);
    }

    let mut summary = scan.summary;
    // The other sets ride along as last committed (their references with them).
    let sets = state::set_heads(scan.run.db)?;
    let mut others = std::collections::BTreeMap::new();
    for (name, head) in sets.iter().filter(|(name, _)| **name != set.name) {
        let root = ObjectId::from_hex(&head.root)
            .with_context(|| format!("the state's record of set `{name}` is damaged"))?;
        others.insert(
            name.clone(),
            OtherSet {
                root,
                time: head.time,
                paths: head.paths.clone(),
            },
        );
    }
    let manifest = Manifest {
        version: 1,
        set: set.name.clone(),
        host: scan.run.host.clone(),
        time,
        paths,
        root,
        sequence: parent.map_or(1, |(_, sequence)| sequence + 1),
        previous: parent.map(|(id, _)| id),
        summary: ManifestSummary {
            files: summary.files_scanned,
            dirs: summary.dirs,
            bytes: summary.bytes_in_snapshot,
        },
        others,
    };
    let sealed = scan
        .sealer
        .seal(ObjectKind::Snapshot, &manifest.encode())
        .context("cannot seal the manifest")?;
    let remote = scan.run.remote.as_deref_mut().expect("uploading");
    let committed = commit(
        remote,
        scan.run.db,
        &Committing {
            set: &set.name,
            building: scan.building,
            sets: &sets,
            head: SetHead {
                root: root.to_string(),
                time,
                paths: manifest.paths.clone(),
                table: scan.building,
            },
        },
        &sealed,
        manifest.previous,
    );
    let (head, _) = match committed {
        Ok(head) => head,
        Err(error) => {
            if let Some(ClientError::Store(WireError::MissingReferences { ids })) =
                error.downcast_ref::<ClientError>()
            {
                // The store lost objects this client believed it held: forget what
                // it believed, so that the next run seals and sends them again.
                forget_known(scan.run.db, &set.name)?;
                return Err(anyhow::Error::new(CachesReset {
                    cause: format!(
                        "the store lacks {} or more objects this snapshot needs (first: {})",
                        ids.len(),
                        ids.first().map(ToString::to_string).unwrap_or_default()
                    ),
                }));
            }
            return Err(error);
        }
    };
    state::set_known_head(scan.run.db, &head, manifest.sequence)?;
    let (sent, received) = scan.run.remote.as_deref().map_or((0, 0), Remote::traffic);
    summary.bytes_sent = sent - sent_before;
    summary.bytes_received = received - received_before;
    summary.connection_sent = sent;
    summary.connection_received = received;
    summary.snapshot = Some(head.to_string());
    summary.sequence = manifest.sequence;
    summary.seconds = started.elapsed().as_secs_f64();
    (summary.cpu_seconds, summary.peak_rss_bytes) = resources();
    scan.progress.finish_and_clear();
    Ok(summary)
}

/// What a commit needs to know of the sets.
struct Committing<'a> {
    /// The set backed up.
    set: &'a str,
    /// Its reference table that holds this snapshot's references of it.
    building: u8,
    /// What this client last committed of every set (before this one).
    sets: &'a std::collections::BTreeMap<String, SetHead>,
    /// What to record for the set once committed.
    head: SetHead,
}

/// Commits the snapshot. The snapshot references the set's fresh tree and the
/// other sets' last committed ones. When this client's last commit is the
/// store's head, the sets' reference tables add up to the parent's references and
/// only the difference travels: ids of this set that are new to every table,
/// and ids this set dropped that no other set needs. Otherwise every id goes
/// (those two sets shared are named twice, which the store takes as once).
fn commit(
    remote: &mut Remote,
    db: &Database,
    committing: &Committing<'_>,
    manifest: &SealedObject,
    parent: Option<ObjectId>,
) -> anyhow::Result<(ObjectId, u64)> {
    let delta = parent.is_some() && state::refs_head(db)? == parent;
    let txn = db.begin_read()?;
    let new_name = state::refs_table_name(committing.set, committing.building);
    let new = txn.open_table(state::refs_table(&new_name))?;
    let old = match committing.sets.get(committing.set) {
        Some(head) => {
            let name = state::refs_table_name(committing.set, head.table);
            Some(txn.open_table(state::refs_table(&name))?)
        }
        None => None,
    };
    let mut others = Vec::new();
    for (name, head) in committing.sets {
        if name != committing.set {
            let table = state::refs_table_name(name, head.table);
            others.push(txn.open_table(state::refs_table(&table))?);
        }
    }
    let needed_elsewhere = |id: &ObjectId| -> bool {
        others
            .iter()
            .any(|table| table.get(id.as_bytes()).is_ok_and(|v| v.is_some()))
    };
    let failed = std::cell::RefCell::new(None);
    let result = if delta {
        let added =
            Difference::new(&new, old.as_ref(), &failed)?.filter(|id| !needed_elsewhere(id));
        let removed: Box<dyn Iterator<Item = ObjectId>> = match &old {
            Some(old) => Box::new(
                Difference::new(old, Some(&new), &failed)?.filter(|id| !needed_elsewhere(id)),
            ),
            None => Box::new(std::iter::empty()),
        };
        remote.run(async |c| {
            c.commit(manifest.id, parent, &manifest.bytes, true, added, removed)
                .await
        })
    } else {
        let mut all: Box<dyn Iterator<Item = ObjectId>> =
            Box::new(Difference::new(&new, None, &failed)?);
        for table in &others {
            all = Box::new(all.chain(Difference::new(table, None, &failed)?));
        }
        remote.run(async |c| {
            c.commit(
                manifest.id,
                parent,
                &manifest.bytes,
                false,
                all,
                std::iter::empty(),
            )
            .await
        })
    };
    if let Some(error) = failed.into_inner() {
        return Err(error).context("cannot read the snapshot's references");
    }
    drop((new, old, others, txn));
    match result {
        Ok(head) => {
            let txn = db.begin_write()?;
            state::set_set_head(&txn, committing.set, &committing.head)?;
            state::set_refs_head(&txn, Some(&head.0))?;
            txn.commit()?;
            Ok(head)
        }
        Err(ClientError::Store(WireError::StaleParent { head })) => bail!(
            "another client committed to this account meanwhile (head {}); run the \
             backup again",
            head.map(|h| h.to_string()).unwrap_or_else(|| "none".into())
        ),
        Err(error) => Err(anyhow::Error::new(error)).context("the store refused the snapshot"),
    }
}

/// The ids of one reference table that another lacks, in id order: a merge of
/// two sorted tables, streamed, so that memory does not grow with the backup.
struct Difference<'t> {
    left: redb::Range<'t, &'static [u8; 32], ()>,
    right: Option<std::iter::Peekable<redb::Range<'t, &'static [u8; 32], ()>>>,
    failed: &'t std::cell::RefCell<Option<redb::StorageError>>,
}

impl<'t> Difference<'t> {
    /// The ids of `left` that `right` lacks (all of them without `right`).
    fn new(
        left: &'t redb::ReadOnlyTable<&'static [u8; 32], ()>,
        right: Option<&'t redb::ReadOnlyTable<&'static [u8; 32], ()>>,
        failed: &'t std::cell::RefCell<Option<redb::StorageError>>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            left: left.iter()?,
            right: match right {
                Some(right) => Some(right.iter()?.peekable()),
                None => None,
            },
            failed,
        })
    }
}

impl Iterator for Difference<'_> {
    type Item = ObjectId;

    fn next(&mut self) -> Option<ObjectId> {
        loop {
            let id = match self.left.next()? {
                Ok((id, _)) => *id.value(),
                Err(error) => {
                    *self.failed.borrow_mut() = Some(error);
                    return None;
                }
            };
            let Some(right) = self.right.as_mut() else {
                return Some(ObjectId::from_bytes(id));
            };
            // Skip the right side up to `id`.
            loop {
                match right.peek() {
                    Some(Ok((other, _))) if *other.value() < id => {
                        right.next();
                    }
                    Some(Ok((other, _))) if *other.value() == id => break,
                    Some(Err(_)) => {
                        if let Some(Err(error)) = right.next() {
                            *self.failed.borrow_mut() = Some(error);
                        }
                        return None;
                    }
                    _ => return Some(ObjectId::from_bytes(id)),
                }
            }
        }
    }
}

/// What a cache directory's `CACHEDIR.TAG` begins with (the Cache Directory
/// Tagging Specification): a file of that name without it tags nothing.
const CACHEDIR_SIGNATURE: &[u8] = b"Signature: 8a477f597d28d172789f06886806bc55";

/// Whether `dir` is tagged as a cache directory. A tag that cannot be read is no
/// tag: the directory is backed up, and what cannot be read in it is named. The
/// tag is opened without following a link and without blocking, and read only
/// if it is a regular file: a FIFO of that name cannot stop the walk.
fn is_cache_dir(dir: &Path) -> bool {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let flags = nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_NOFOLLOW;
    let Ok(mut tag) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits())
        .open(dir.join("CACHEDIR.TAG"))
    else {
        return false;
    };
    let mut start = [0_u8; CACHEDIR_SIGNATURE.len()];
    tag.metadata().is_ok_and(|m| m.is_file())
        && tag.read_exact(&mut start).is_ok()
        && start == CACHEDIR_SIGNATURE
}

/// Forgets which ids the store holds and the set's index.
fn forget_known(db: &Database, set: &str) -> anyhow::Result<()> {
    let txn = db.begin_write()?;
    state::clear_known(&txn)?;
    let name = state::index_name(set);
    txn.delete_table(state::index_table(&name))?;
    // The next commit sends the whole list.
    state::set_refs_head(&txn, None)?;
    txn.commit()?;
    Ok(())
}

fn normalise(path: &Path) -> anyhow::Result<PathBuf> {
    if !path.is_absolute() {
        bail!("not an absolute path");
    }
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(name) => out.push(name),
            Component::ParentDir => {
                out.pop();
            }
            Component::Prefix(_) => bail!("not a Unix path"),
        }
    }
    Ok(out)
}

/// The index key of a path: its components joined by NUL, which sorts exactly as
/// the walk visits paths.
fn index_key(path: &Path) -> Vec<u8> {
    let mut key = Vec::with_capacity(path.as_os_str().len());
    for component in path.components().skip(1) {
        if !key.is_empty() {
            key.push(0);
        }
        key.extend_from_slice(component.as_os_str().as_bytes());
    }
    key
}

struct Scan<'a> {
    run: Run<'a>,
    set: &'a BackupSet,
    excludes: Gitignore,
    sealer: Sealer<'a>,
    /// The buffer small files are chunked in, lent to each file's chunker.
    chunk_buffer: Vec<u8>,
    index_name: String,
    /// Which of the set's two reference tables collects its references now.
    building: u8,
    /// Its name.
    refs_name: String,
    old_index: ReadOnlyTable<&'static [u8], &'static [u8]>,
    cursor: Option<Vec<u8>>,
    txn: Option<WriteTransaction>,
    txn_bytes: u64,
    txn_started: Instant,
    spool_bytes: u64,
    /// What the last upload left in the spool (classes the link does not carry,
    /// refusals).
    left_by_upload: u64,
    /// Objects spooled since the last upload.
    spooled_since_upload: u64,
    root_device: Option<u64>,
    summary: Summary,
    progress: ProgressBar,
}

impl<'a> Scan<'a> {
    fn new(run: Run<'a>, set: &'a BackupSet, excludes: Gitignore) -> anyhow::Result<Self> {
        let index_name = state::index_name(&set.name);
        // The set's references are collected afresh, in its table that does not
        // hold those of its last commit.
        let building = state::set_heads(run.db)?
            .get(&set.name)
            .map_or(0, |head| 1 - head.table);
        let refs_name = state::refs_table_name(&set.name, building);
        let txn = run.db.begin_write()?;
        txn.delete_table(state::refs_table(&refs_name))?;
        txn.open_table(state::refs_table(&refs_name))?;
        txn.open_table(state::index_table(&index_name))?;
        txn.commit()?;
        let old_index = run
            .db
            .begin_read()?
            .open_table(state::index_table(&index_name))?;
        let (spool_bytes, _) = state::spool_size(run.db)?;
        let sealer = Sealer::new(run.keys, homing_transfer::DEFAULT_ZSTD_LEVEL)?;
        let progress = if run.progress {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {elapsed} {msg}")
                    .expect("a valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        } else {
            ProgressBar::hidden()
        };
        Ok(Self {
            run,
            set,
            excludes,
            sealer,
            chunk_buffer: Vec::new(),
            index_name,
            building,
            refs_name,
            old_index,
            cursor: None,
            txn: None,
            txn_bytes: 0,
            txn_started: Instant::now(),
            spool_bytes,
            left_by_upload: 0,
            spooled_since_upload: 0,
            root_device: None,
            summary: Summary {
                set: set.name.clone(),
                ..Summary::default()
            },
            progress,
        })
    }

    fn txn(&mut self) -> anyhow::Result<&WriteTransaction> {
        if self.txn.is_none() {
            self.txn = Some(self.run.db.begin_write()?);
            self.txn_bytes = 0;
            self.txn_started = Instant::now();
        }
        Ok(self.txn.as_ref().expect("just opened"))
    }

    fn commit_txn(&mut self) -> anyhow::Result<()> {
        if let Some(txn) = self.txn.take() {
            // The spooled bytes the transaction names are on disk first.
            self.run.spool.sync()?;
            txn.commit().context("cannot write the local state")?;
        }
        Ok(())
    }

    fn maybe_commit_txn(&mut self) -> anyhow::Result<()> {
        if self.txn_bytes >= TXN_BYTES || self.txn_started.elapsed() >= TXN_TIME {
            self.commit_txn()?;
        }
        // With a store: every batch of newly sealed bytes (what an upload left,
        // the classes this link does not carry, does not count again). Without:
        // a full spool stops the run.
        let due = if self.run.remote.is_some() {
            self.spool_bytes.saturating_sub(self.left_by_upload)
                >= self.run.spool_limit.min(UPLOAD_BATCH)
                || self.spooled_since_upload >= UPLOAD_OBJECTS
        } else {
            self.spool_bytes >= self.run.spool_limit
        };
        if due {
            self.upload_spool().context(
                "the spool could not be uploaded; everything sealed so far is kept in \
                 the spool for the next run",
            )?;
        }
        Ok(())
    }

    fn note_progress(&self) {
        self.progress.set_message(format!(
            "{} files, {} changed, {:.1} MB read, {:.1} MB sealed",
            self.summary.files_scanned,
            self.summary.files_changed,
            self.summary.bytes_read as f64 / 1e6,
            self.summary.bytes_sealed as f64 / 1e6,
        ));
    }

    fn problem(&mut self, path: &Path, what: &str, error: &dyn std::fmt::Display) {
        self.summary.unreadable += 1;
        tracing::warn!("{}: {what}: {error}", path.display());
        if self.summary.problems.len() < NAMED_PROBLEMS {
            self.summary
                .problems
                .push(format!("{}: {what}: {error}", path.display()));
        }
    }

    /// Adds ids to the snapshot's references.
    fn reference(&mut self, ids: &[ObjectId]) -> anyhow::Result<()> {
        let name = self.refs_name.clone();
        let txn = self.txn()?;
        let mut refs = txn.open_table(state::refs_table(&name))?;
        for id in ids {
            refs.insert(id.as_bytes(), ())?;
        }
        Ok(())
    }

    /// Whether an object is in the spool or known to be stored. A spooled object
    /// of a less urgent class takes this set's class: this set needs it too.
    fn have(&mut self, id: &ObjectId) -> anyhow::Result<bool> {
        let class = self.run.class;
        let txn = self.txn()?;
        if txn.open_table(KNOWN)?.get(id.as_bytes())?.is_some() {
            return Ok(true);
        }
        if !spool_files::contains(txn, id)? {
            return Ok(false);
        }
        let mut classes = txn.open_table(state::SPOOL_CLASS)?;
        let current = classes.get(id.as_bytes())?.map(|v| v.value());
        if current.is_some_and(|c| c > class) {
            classes.insert(id.as_bytes(), class)?;
        }
        Ok(true)
    }

    /// Puts a sealed object into the spool; the caller has asked
    /// [`Scan::have`] that it is neither there nor stored.
    fn spool(&mut self, object: &SealedObject) -> anyhow::Result<()> {
        let len = object.bytes.len() as u64;
        let class = self.run.class;
        self.txn()?;
        let txn = self.txn.as_ref().expect("just opened");
        self.run
            .spool
            .append(txn, &object.id, &object.bytes, class)?;
        self.spool_bytes += len;
        self.spooled_since_upload += 1;
        self.txn_bytes += len;
        self.summary.bytes_new += u64::from(object.plain_len);
        self.summary.bytes_sealed += len;
        self.summary.objects_sealed += 1;
        Ok(())
    }

    /// Seals a plaintext of `kind` into the spool unless its id is there already.
    fn seal_into_spool(&mut self, kind: ObjectKind, plaintext: &[u8]) -> anyhow::Result<ObjectId> {
        let id = self.run.keys.object_id(plaintext);
        if !self.have(&id)? {
            let object = self.sealer.seal_with_id(kind, id, plaintext)?;
            self.spool(&object)?;
        }
        Ok(id)
    }

    /// The tree of a directory that leads to selected paths (or is one).
    fn virtual_dir(&mut self, path: &Path, node: &Node) -> anyhow::Result<Option<ObjectId>> {
        let mut entries = Vec::new();
        for (name, child) in &node.children {
            let child_path = path.join(std::ffi::OsStr::from_bytes(name));
            // A selected path that is a symlink is followed: `homing backup ~/docs`
            // means the directory, wherever it lives.
            let child_meta = if child.selected {
                std::fs::metadata(&child_path)
            } else {
                std::fs::symlink_metadata(&child_path)
            };
            let child_meta = match child_meta {
                Ok(m) => m,
                Err(error) => {
                    self.problem(&child_path, "cannot stat", &error);
                    continue;
                }
            };
            let entry = if child.selected {
                self.root_device = Some(child_meta.dev());
                self.entry(&child_path, name.clone(), &child_meta)?
            } else if child_meta.is_dir() {
                self.virtual_dir(&child_path, child)?
                    .map(|id| make_entry(name.clone(), &child_meta, Kind::Dir(id)))
            } else {
                self.problem(&child_path, "not a directory", &"a path leads through it");
                None
            };
            entries.extend(entry);
        }
        if entries.is_empty() && !node.selected && path != Path::new("/") {
            return Ok(None);
        }
        self.tree(&entries).map(Some)
    }

    fn tree(&mut self, entries: &[Entry]) -> anyhow::Result<ObjectId> {
        self.summary.dirs += 1;
        let plain = encode_tree(entries);
        let id = self.seal_into_spool(ObjectKind::Tree, &plain)?;
        self.reference(&[id])?;
        Ok(id)
    }

    /// The entry of one path, scanning below it if it is a directory; `None` for
    /// what is skipped (unreadable, excluded, special files).
    fn entry(
        &mut self,
        path: &Path,
        name: Vec<u8>,
        meta: &Metadata,
    ) -> anyhow::Result<Option<Entry>> {
        let kind = meta.file_type();
        if kind.is_dir() {
            Ok(self
                .dir(path)?
                .map(|id| make_entry(name, meta, Kind::Dir(id))))
        } else if kind.is_file() {
            Ok(self.file(path, meta)?.map(|k| make_entry(name, meta, k)))
        } else if kind.is_symlink() {
            match std::fs::read_link(path) {
                Ok(target) => Ok(Some(make_entry(
                    name,
                    meta,
                    Kind::Symlink(target.as_os_str().as_bytes().to_vec()),
                ))),
                Err(error) => {
                    self.problem(path, "cannot read the link", &error);
                    Ok(None)
                }
            }
        } else if kind.is_fifo() {
            Ok(Some(make_entry(name, meta, Kind::Fifo)))
        } else {
            self.summary.skipped_special += 1;
            Ok(None)
        }
    }

    fn dir(&mut self, path: &Path) -> anyhow::Result<Option<ObjectId>> {
        let listing = match std::fs::read_dir(path) {
            Ok(listing) => listing,
            Err(error) => {
                self.problem(path, "cannot list", &error);
                return Ok(None);
            }
        };
        let mut names = Vec::new();
        for item in listing {
            match item {
                Ok(item) => names.push(item.file_name()),
                Err(error) => {
                    self.problem(path, "cannot list", &error);
                    return Ok(None);
                }
            }
        }
        names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let mut entries = Vec::with_capacity(names.len());
        for name in names {
            let child = path.join(&name);
            if self.run.skip.iter().any(|s| s == &child) {
                continue;
            }
            let meta = match std::fs::symlink_metadata(&child) {
                Ok(meta) => meta,
                // Gone since the listing: as if it never was.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => {
                    self.problem(&child, "cannot stat", &error);
                    continue;
                }
            };
            if self.excludes.matched(&child, meta.is_dir()).is_ignore() {
                continue;
            }
            let name = name.as_bytes().to_vec();
            let mount_point = meta.is_dir()
                && self.set.one_file_system
                && self.root_device.is_some_and(|d| d != meta.dev());
            // A mount point left out is not looked into for a tag.
            let cache =
                !mount_point && meta.is_dir() && self.set.exclude_caches && is_cache_dir(&child);
            if mount_point || cache {
                // Kept as an empty directory, not entered.
                if cache {
                    self.summary.caches_skipped += 1;
                    tracing::debug!(
                        "{}: a cache directory (CACHEDIR.TAG), left out",
                        child.display()
                    );
                }
                let id = self.tree(&[])?;
                entries.push(make_entry(name, &meta, Kind::Dir(id)));
                continue;
            }
            if let Some(entry) = self.entry(&child, name, &meta)? {
                entries.push(entry);
            }
        }
        self.tree(&entries).map(Some)
    }

    /// The index entry the old index holds for `key`, dropping the keys before it
    /// that the walk skipped (files that are gone).
    fn old_entry(&mut self, key: &[u8]) -> anyhow::Result<Option<IndexEntry>> {
        loop {
            let next = {
                let lower = match &self.cursor {
                    Some(cursor) => Bound::Excluded(cursor.as_slice()),
                    None => Bound::Unbounded,
                };
                let mut range = self.old_index.range::<&[u8]>((lower, Bound::Unbounded))?;
                match range.next() {
                    Some(item) => {
                        let (k, v) = item?;
                        Some((k.value().to_vec(), v.value().to_vec()))
                    }
                    None => None,
                }
            };
            let Some((old_key, value)) = next else {
                self.cursor = Some(key.to_vec());
                return Ok(None);
            };
            match old_key.as_slice().cmp(key) {
                std::cmp::Ordering::Less => {
                    self.drop_index_key(&old_key)?;
                    self.cursor = Some(old_key);
                }
                std::cmp::Ordering::Equal => {
                    self.cursor = Some(old_key);
                    return Ok(IndexEntry::decode(&value).ok());
                }
                std::cmp::Ordering::Greater => {
                    self.cursor = Some(key.to_vec());
                    return Ok(None);
                }
            }
        }
    }

    fn drop_index_key(&mut self, key: &[u8]) -> anyhow::Result<()> {
        self.summary.files_deleted += 1;
        let name = self.index_name.clone();
        let txn = self.txn()?;
        txn.open_table(state::index_table(&name))?.remove(key)?;
        Ok(())
    }

    /// Drops index keys after the last path visited.
    fn finish_index(&mut self) -> anyhow::Result<()> {
        let stale: Vec<Vec<u8>> = {
            let lower = match &self.cursor {
                Some(cursor) => Bound::Excluded(cursor.as_slice()),
                None => Bound::Unbounded,
            };
            let mut keys = Vec::new();
            for item in self.old_index.range::<&[u8]>((lower, Bound::Unbounded))? {
                keys.push(item?.0.value().to_vec());
            }
            keys
        };
        for key in stale {
            self.drop_index_key(&key)?;
        }
        self.commit_txn()
    }

    fn file(&mut self, path: &Path, meta: &Metadata) -> anyhow::Result<Option<Kind>> {
        self.summary.files_scanned += 1;
        let key = index_key(path);
        let now = index_entry(meta, Content::empty(), Vec::new());
        let old = self.old_entry(&key)?;
        let link = (meta.nlink() > 1).then(|| (meta.dev(), meta.ino()));
        if let Some(old) = old.filter(|old| old.same_file(&now)) {
            self.summary.files_unchanged += 1;
            self.summary.bytes_in_snapshot += old.size;
            self.reference(old.content.ids())?;
            if matches!(old.content, Content::Lists(_)) {
                self.reference(&old.chunks)?;
            }
            if self.summary.files_scanned.is_multiple_of(256) {
                self.note_progress();
            }
            return Ok(Some(Kind::File {
                size: old.size,
                link,
                content: old.content,
            }));
        }
        self.summary.files_changed += 1;
        let mut meta = meta.clone();
        let mut tries = 0;
        let (chunks, read) = loop {
            tries += 1;
            let file = match File::open(path) {
                Ok(file) => file,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(error) => {
                    self.problem(path, "cannot read", &error);
                    return Ok(None);
                }
            };
            let chunks = match self.seal_file(&file, meta.len()) {
                Ok(result) => result,
                Err(error) => {
                    // A read error is the file's problem, not the backup's.
                    match error.downcast::<Unreadable>() {
                        Ok(Unreadable(io)) => {
                            self.problem(path, "cannot read", &io);
                            return Ok(None);
                        }
                        Err(error) => return Err(error),
                    }
                }
            };
            let after = file.metadata().context("cannot stat an open file")?;
            let stable = after.len() == chunks.1
                && after.mtime() == meta.mtime()
                && after.mtime_nsec() == meta.mtime_nsec()
                && after.ctime() == meta.ctime()
                && after.ctime_nsec() == meta.ctime_nsec();
            if stable {
                break chunks;
            }
            if tries >= READ_TRIES {
                self.summary.changed_while_reading += 1;
                tracing::warn!(
                    "{}: changed while being read, {READ_TRIES} times; the last reading is kept",
                    path.display()
                );
                meta = after;
                break chunks;
            }
            meta = after;
        };
        self.summary.bytes_read += read;
        self.summary.bytes_in_snapshot += read;
        let content = if chunks.len() <= INLINE_IDS {
            Content::Inline(chunks.clone())
        } else {
            let mut lists = Vec::new();
            for piece in split_ids(&chunks) {
                lists.push(self.seal_into_spool(ObjectKind::Tree, &encode_list(piece))?);
            }
            Content::Lists(lists)
        };
        self.reference(content.ids())?;
        if matches!(content, Content::Lists(_)) {
            self.reference(&chunks)?;
        }
        let mut entry = index_entry(&meta, content.clone(), chunks);
        // The size recorded is what was read (a file that changed while read).
        entry.size = read;
        let name = self.index_name.clone();
        let txn = self.txn()?;
        txn.open_table(state::index_table(&name))?
            .insert(key.as_slice(), entry.encode().as_slice())?;
        self.note_progress();
        self.maybe_commit_txn()?;
        Ok(Some(Kind::File {
            size: read,
            link,
            content,
        }))
    }

    /// Reads, chunks and seals a file into the spool; returns its chunk ids and the
    /// bytes read.
    fn seal_file(&mut self, file: &File, len: u64) -> anyhow::Result<(Vec<ObjectId>, u64)> {
        let mut ids = Vec::new();
        let mut read = 0_u64;
        if len < PARALLEL_FROM || self.run.sealing_threads < 2 {
            let buffer = std::mem::take(&mut self.chunk_buffer);
            let mut chunker = Chunker::reusing(file, self.run.keys.chunker_seed(), buffer);
            let mut seal = || -> anyhow::Result<()> {
                while let Some((span, data)) = chunker.next_chunk().map_err(Unreadable)? {
                    read += u64::from(span.len);
                    let id = self.run.keys.object_id(data);
                    if !self.have(&id)? {
                        let object = self.sealer.seal_with_id(ObjectKind::Chunk, id, data)?;
                        self.spool(&object)?;
                    }
                    ids.push(id);
                }
                Ok(())
            };
            let sealed = seal();
            self.chunk_buffer = chunker.into_buffer();
            return sealed.map(|()| (ids, read));
        }
        // Large files: the parallel pipeline seals on other threads; this thread
        // puts the sealed chunks into the spool, a bounded channel between them.
        // What the last committed state says is stored or spooled is not sealed
        // again: a large file changed in one place costs reading and cutting, not
        // compressing and encrypting all of it. (What this run spooled since its
        // last commit is sealed, then found here and dropped.)
        let keys = self.run.keys;
        let sealing_threads = self.run.sealing_threads;
        let committed = self.run.db.begin_read()?;
        let stored = state::optional_table(&committed, KNOWN)?;
        let spooled = state::optional_table(&committed, SPOOL_AT)?;
        // A lookup that fails counts as new: the chunk is sealed, as before.
        let known =
            |id: &ObjectId| state::holds(stored.as_ref(), id) || state::holds(spooled.as_ref(), id);
        let known = &known;
        let (sender, receiver) = std::sync::mpsc::sync_channel(8);
        std::thread::scope(|scope| -> anyhow::Result<()> {
            // The sender moves in: the channel ends when the sealing does.
            let sealing = scope.spawn(move || {
                seal_new_chunks::<_, anyhow::Error, _>(
                    file,
                    keys,
                    PipelineOptions {
                        threads: sealing_threads,
                        ..PipelineOptions::default()
                    },
                    known,
                    |chunk| {
                        sender
                            .send(chunk)
                            .map_err(|_| anyhow::anyhow!("the spool stopped taking sealed chunks"))
                    },
                )
            });
            let mut failure = None;
            // On the first failure the loop ends and the receiver is dropped: the
            // pipeline's next hand-over fails and it stops reading the file.
            for chunk in receiver {
                read += u64::from(chunk.span.len);
                ids.push(chunk.id);
                let spooled = match (self.have(&chunk.id), &chunk.object) {
                    (Ok(true), _) => Ok(()),
                    (Ok(false), Some(object)) => self.spool(object),
                    // Only a run that dropped its caches after a damaged spool
                    // file forgets what it knew, and it stops.
                    (Ok(false), None) => Err(anyhow::anyhow!(
                        "object {} left the local state while its file was read; \
                         run the backup again",
                        chunk.id
                    )),
                    (Err(error), _) => Err(error),
                };
                if let Err(error) = spooled {
                    failure = Some(error);
                    break;
                }
            }
            let sealed = sealing.join().expect("the sealing thread does not panic");
            if let Some(error) = failure {
                return Err(error);
            }
            sealed.map_err(|error| match error.downcast::<homing_transfer::Error>() {
                Ok(homing_transfer::Error::Read { source, .. }) => Unreadable(source).into(),
                Ok(other) => other.into(),
                Err(error) => error,
            })?;
            Ok(())
        })?;
        Ok((ids, read))
    }

    /// Uploads everything in the spool; what the store confirms leaves it. Without
    /// a store to upload to, a full spool stops the run (what is sealed stays).
    fn upload_spool(&mut self) -> anyhow::Result<()> {
        let result = self.upload_spool_once();
        self.left_by_upload = self.spool_bytes;
        self.spooled_since_upload = 0;
        result
    }

    fn upload_spool_once(&mut self) -> anyhow::Result<()> {
        self.commit_txn()?;
        let Some(remote) = self.run.remote.as_deref_mut() else {
            if self.spool_bytes >= self.run.spool_limit {
                bail!(
                    "the spool is full ({} of {} MB) and nothing may be uploaded now; \
                     everything sealed stays in it until a link allows",
                    self.spool_bytes / 1_000_000,
                    self.run.spool_limit / 1_000_000
                );
            }
            return Ok(());
        };
        // Only the classes the link carries (an object without a class, from an
        // older spool, goes with any), in the order they go.
        let ids: Vec<ObjectId> = {
            let txn = self.run.db.begin_read()?;
            let spool = txn.open_table(SPOOL_AT)?;
            let classes = txn.open_table(state::SPOOL_CLASS)?;
            let mut waiting = Vec::new();
            for item in spool.iter()? {
                let (id, location) = item?;
                let id = *id.value();
                let class = classes.get(&id)?.map(|v| v.value());
                if class.is_none_or(|c| self.run.upload_classes.contains(&c)) {
                    waiting.push((
                        ObjectId::from_bytes(id),
                        class,
                        spool_files::Location::decode(location.value()),
                    ));
                }
            }
            // What each spool file still holds: the size of its change set.
            let files = txn.open_table(spool_files::SPOOL_FILES)?;
            let mut file_bytes = std::collections::HashMap::new();
            for item in files.iter()? {
                let (file, live) = item?;
                file_bytes.insert(file.value(), live.value());
            }
            upload_order(waiting, &file_bytes)
        };
        if ids.is_empty() {
            return Ok(());
        }
        self.progress
            .set_message(format!("uploading {} objects", ids.len()));
        let states = remote
            .run(async |c| c.query(&ids).await)
            .context("cannot ask the store what it holds")?;
        let mut done = Vec::new();
        let mut pending = Vec::new();
        for (id, state) in ids.iter().zip(states) {
            match state {
                ObjectState::Stored => done.push(*id),
                ObjectState::Missing => pending.push(Pending { id: *id, held: 0 }),
                ObjectState::Partial(held) => pending.push(Pending { id: *id, held }),
            }
        }
        let db = self.run.db;
        let read = db.begin_read()?;
        let locations = read.open_table(SPOOL_AT)?;
        let mut stored = Vec::new();
        let remote = self.run.remote.as_deref_mut().expect("checked above");
        let files = &mut *self.run.spool;
        let result = remote.run(async |c| {
            c.upload(
                &pending,
                |id| {
                    let location = spool_files::locate(&locations, id)
                        .map_err(std::io::Error::other)?
                        .ok_or_else(|| std::io::Error::other(format!("{id} left the spool")))?;
                    files.read(id, &location)
                },
                |id| {
                    stored.push(*id);
                    Ok(())
                },
            )
            .await
        });
        drop(locations);
        drop(read);
        let stored_count = stored.len();
        done.extend(stored);
        let freed = self.release(&done)?;
        self.spool_bytes = self.spool_bytes.saturating_sub(freed);
        match result {
            Ok(summary) => {
                self.summary.objects_uploaded += summary.objects;
                self.summary.bytes_uploaded += summary.bytes;
                Ok(())
            }
            Err(ClientError::Load { source, .. })
                if source.get_ref().is_some_and(|e| e.is::<Damaged>()) =>
            {
                // Sending the damaged bytes would store what nobody can read
                // back: drop the object, and read the files that need it again.
                let damaged = source
                    .get_ref()
                    .and_then(|e| e.downcast_ref::<Damaged>())
                    .expect("checked");
                // A file that is gone takes all its objects with it.
                let txn = self.run.db.begin_write()?;
                let lost = if damaged.gone {
                    spool_files::objects_in(&txn, &[damaged.spool_file])?
                } else {
                    vec![damaged.id]
                };
                let (freed, emptied) = self.run.spool.lose(&txn, &lost)?;
                txn.commit()?;
                self.run.spool.delete_emptied(&emptied)?;
                self.spool_bytes = self.spool_bytes.saturating_sub(freed);
                Err(anyhow::Error::new(CachesReset {
                    cause: format!("{damaged}; it was dropped from the spool"),
                }))
            }
            Err(ClientError::Io(error)) if BudgetExhausted::is(&error) => {
                Err(anyhow::Error::new(BudgetSpent {
                    waiting: pending.len() - stored_count,
                }))
            }
            Err(error) => Err(anyhow::Error::new(error).context(format!(
                "the upload stopped; {} objects stay in the spool for the next run",
                pending.len()
            ))),
        }
    }

    /// Takes objects the store holds out of the spool; returns the bytes freed.
    fn release(&mut self, ids: &[ObjectId]) -> anyhow::Result<u64> {
        let txn = self.run.db.begin_write()?;
        let (freed, emptied) = self.run.spool.release(&txn, ids)?;
        {
            let mut known = txn.open_table(KNOWN)?;
            for id in ids {
                known.insert(id.as_bytes(), ())?;
            }
        }
        txn.commit()?;
        self.run.spool.delete_emptied(&emptied)?;
        Ok(freed)
    }
}

/// CPU seconds and peak resident memory of this process.
fn resources() -> (f64, u64) {
    use nix::sys::resource::{UsageWho, getrusage};
    let Ok(usage) = getrusage(UsageWho::RUSAGE_SELF) else {
        return (0.0, 0);
    };
    let seconds = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    let cpu = seconds(usage.user_time()) + seconds(usage.system_time());
    (cpu, peak_rss(usage.max_rss()))
}

/// Linux keeps `ru_maxrss` across `execve`, so a process started by a large one
/// would report its parent's peak: the memory map's own high-water mark is the
/// honest figure.
#[cfg(target_os = "linux")]
fn peak_rss(_max_rss: i64) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(0)
}

/// `ru_maxrss` counts kilobytes on the BSDs and bytes on macOS.
#[cfg(not(target_os = "linux"))]
fn peak_rss(max_rss: i64) -> u64 {
    let rss = max_rss.max(0) as u64;
    if cfg!(target_os = "macos") {
        rss
    } else {
        rss * 1024
    }
}

fn make_entry(name: Vec<u8>, meta: &Metadata, kind: Kind) -> Entry {
    Entry {
        name,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime: meta.mtime(),
        mtime_nanos: meta.mtime_nsec().clamp(0, 999_999_999) as u32,
        kind,
    }
}

fn index_entry(meta: &Metadata, content: Content, chunks: Vec<ObjectId>) -> IndexEntry {
    let nanos = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
    IndexEntry {
        size: meta.len(),
        mtime: nanos(meta.mtime(), meta.mtime_nsec()),
        ctime: nanos(meta.ctime(), meta.ctime_nsec()),
        inode: meta.ino(),
        device: meta.dev(),
        mode: meta.mode(),
        content,
        chunks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_regular_tag_with_the_signature_makes_a_cache_directory() {
        let root = tempfile::tempdir().unwrap();
        let dir = |name: &str| {
            let dir = root.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            dir
        };
        let tagged = dir("tagged");
        std::fs::write(
            tagged.join("CACHEDIR.TAG"),
            b"Signature: 8a477f597d28d172789f06886806bc55\n# made by a test\n",
        )
        .unwrap();
        assert!(is_cache_dir(&tagged));
        let untagged = dir("untagged");
        assert!(!is_cache_dir(&untagged));
        let wrong = dir("wrong");
        std::fs::write(wrong.join("CACHEDIR.TAG"), b"Signature: 8a477f597d28d17278").unwrap();
        assert!(!is_cache_dir(&wrong));
        let linked = dir("linked");
        std::os::unix::fs::symlink(tagged.join("CACHEDIR.TAG"), linked.join("CACHEDIR.TAG"))
            .unwrap();
        assert!(!is_cache_dir(&linked));
        // A FIFO with no writer: opened without blocking, and not read.
        let fifo = dir("fifo");
        nix::unistd::mkfifo(
            &fifo.join("CACHEDIR.TAG"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        assert!(!is_cache_dir(&fifo));
        let directory = dir("directory");
        std::fs::create_dir(directory.join("CACHEDIR.TAG")).unwrap();
        assert!(!is_cache_dir(&directory));
    }

    #[test]
    fn critical_objects_go_first_then_smaller_change_sets_then_older() {
        let at = |file, offset| {
            Some(spool_files::Location {
                file,
                offset,
                len: 1,
                crc: 0,
            })
        };
        let id = |n: u8| ObjectId::from_bytes([n; 32]);
        let sizes = |pairs: &[(u64, u64)]| pairs.iter().copied().collect();
        let waiting = vec![
            (id(1), Some(2), at(1, 0)),
            (id(2), Some(1), at(2, 0)),
            (id(3), Some(0), at(3, 100)),
            (id(4), Some(1), at(1, 500)),
            (id(5), None, at(1, 10)),
            (id(6), Some(0), at(3, 50)),
            (id(7), Some(1), None),
        ];
        // Files of equal size: by class, then the order of sealing.
        let even = sizes(&[(1, 1000), (2, 1000), (3, 1000)]);
        assert_eq!(
            upload_order(waiting.clone(), &even),
            [6, 3, 4, 2, 7, 1, 5].map(id).to_vec()
        );
        // File 2 is a small change set of the normal class: it goes before the
        // large older one in file 1.
        let small_second = sizes(&[(1, 64 << 20), (2, 3000), (3, 1000)]);
        assert_eq!(
            upload_order(waiting, &small_second),
            [6, 3, 2, 4, 7, 1, 5].map(id).to_vec()
        );
    }

    #[test]
    fn index_keys_sort_as_the_walk_visits() {
        // The walk: sorted names, depth first.
        let walk = ["/a/b", "/a/c/d", "/a.txt", "/a0", "/b"];
        let keys: Vec<Vec<u8>> = walk.iter().map(|p| index_key(Path::new(p))).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
    }

    #[test]
    fn paths_are_normalised() {
        assert_eq!(
            normalise(Path::new("/home/./me/../you/")).unwrap(),
            Path::new("/home/you")
        );
        assert!(normalise(Path::new("relative")).is_err());
    }
}
