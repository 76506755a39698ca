//! The object store: each account's sealed objects, appended to segments and
//! indexed in redb, with resumable uploads and quotas.
//!
//! Order of writing, so that nothing acknowledged is ever lost:
//!
//! 1. pieces of an upload are appended to `partial/<account>/<id>.part` and synced,
//!    so that a cut upload (or a killed server) resumes where it stopped;
//! 2. the complete object is appended to the current segment and synced;
//! 3. one index transaction records the object (segment, offset, length, BLAKE3 of
//!    its bytes), charges the account and forgets the partial upload;
//! 4. only then is the object reported stored.
//!
//! A crash between 2 and 3 leaves unreferenced bytes at a segment's end: dead space,
//! never read, reported by [`ObjectStore::check`]. Objects of one account are
//! invisible to every other: the account name is part of every index key, and the
//! same id in two accounts is two objects.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use homing_crypto::ObjectId;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::backend::Backend;
use crate::error::{StoreError, index};
use crate::retention::{self, Policy};

/// The largest sealed object the store accepts: the largest plaintext Homing writes
/// (16 MiB), its codec byte, and the seal overhead, with room to spare.
pub const MAX_OBJECT_LEN: u32 = 16 * 1024 * 1024 + 1024;

/// What the smallest sealed object takes (the seal's header and tag around an
/// empty payload): every object is charged at least this, so that tiny or empty
/// objects cannot fill the index for free.
pub const MIN_CHARGE: u64 = 46;

/// What a commit is charged per referenced id: the index stores every id, so the
/// reference lists count against the hard quota like object bytes.
pub const REFERENCE_COST: u64 = 32;

/// A new segment is started once the current one reaches this size.
pub const SEGMENT_TARGET: u64 = 64 * 1024 * 1024;

/// (account, id) → segment u64, offset u64, length u32, BLAKE3 of the bytes.
const OBJECTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("objects");
/// (account, id) → announced total length of an upload in progress.
const PARTIALS: TableDefinition<&[u8], u32> = TableDefinition::new("partials");
/// account → used u64, objects u64, soft quota u64, hard quota u64, disabled u8.
const ACCOUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("accounts");
/// (account, id) → the record of an object that failed a check, kept for the report.
const QUARANTINE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("quarantine");
/// (account, sequence u64 big-endian) → manifest id, committed-at u64, parent flag + id.
const SNAPSHOTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("snapshots");
/// (account, id) → the spans of snapshot sequence numbers that reference the id:
/// pairs of (first u64, end u64) little-endian, `end` exclusive, [`OPEN`] while the
/// head still references it. The snapshots of an account form one chain, so a
/// commit only opens and closes spans (its delta) and a snapshot's references
/// are the ids with a span around its sequence number; retention and `check`
/// read them without keys.
const LIVE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("live");

/// The end of a span the head still references.
const OPEN: u64 = u64::MAX;
/// account → head manifest id, head sequence u64.
const HEADS: TableDefinition<&str, &[u8]> = TableDefinition::new("heads");
/// account → retention policy: hourly u32, daily u32, weekly u32 (little-endian).
const RETENTION: TableDefinition<&str, &[u8]> = TableDefinition::new("retention");
/// (account, id) → when garbage collection first found the object unreferenced
/// (seconds since the epoch). An object is deleted only when a later collection,
/// a grace period on, still finds it unreferenced: an upload whose commit is on
/// its way is not taken from under it.
const GARBAGE: TableDefinition<&[u8], u64> = TableDefinition::new("garbage");

const RECORD_LEN: usize = 8 + 8 + 4 + 32;
const ACCOUNT_LEN: usize = 8 + 8 + 8 + 8 + 1;
/// Uploads of objects whose ids fall in different shards proceed in parallel.
const SHARDS: usize = 16;

/// Whether the store holds an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holding {
    /// Stored whole.
    Stored,
    /// Not at all.
    Missing,
    /// An upload was cut after this many bytes.
    Partial(u32),
}

/// What a piece of an upload achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The store now holds this many bytes of the object.
    Incomplete(u32),
    /// The object is stored whole and durably.
    Stored,
}

/// An account's quotas and usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Account {
    /// Bytes of objects stored.
    pub used: u64,
    /// Objects stored.
    pub objects: u64,
    /// Soft quota (a warning), 0 for none.
    pub soft_limit: u64,
    /// Hard quota (a refusal), 0 for none.
    pub hard_limit: u64,
    /// Whether the account is disabled.
    pub disabled: bool,
}

/// One committed snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// Its manifest's id.
    pub id: ObjectId,
    /// The account's commit counter, from 1.
    pub sequence: u64,
    /// When it was committed, in seconds since the Unix epoch.
    pub committed_at: u64,
}

/// A page of an account's snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshots {
    /// The head, if any snapshot was committed.
    pub head: Option<ObjectId>,
    /// The snapshots asked for, oldest first.
    pub entries: Vec<Snapshot>,
    /// Whether more follow the last one.
    pub more: bool,
}

/// What [`ObjectStore::check`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CheckReport {
    /// Objects read and compared with their checksums.
    pub objects: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Objects that are damaged or unreadable.
    pub damaged: Vec<Damage>,
    /// Objects kept snapshots reference that the store does not hold whole (lost
    /// to damage, or missing): what a restore of those snapshots would lack.
    pub lost: Vec<Lost>,
    /// Bytes in segments that no object refers to (crash leftovers).
    pub unreferenced_bytes: u64,
    /// Whether damaged objects were moved to quarantine.
    pub repaired: bool,
}

/// One damaged object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Its account.
    pub account: String,
    /// The object.
    pub id: ObjectId,
    /// What is wrong.
    pub problem: String,
}

/// What a garbage collection did (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Snapshots the retention policies forgot: (account, sequence).
    pub snapshots_forgotten: Vec<(String, u64)>,
    /// Objects deleted.
    pub objects_deleted: u64,
    /// Their bytes.
    pub bytes_freed: u64,
    /// Unneeded objects still in their grace period.
    pub objects_waiting: u64,
    /// Segment files deleted.
    pub segments_deleted: u64,
    /// Their bytes on disk.
    pub segment_bytes_freed: u64,
}

/// An object that kept snapshots need and the store does not hold (whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    /// Its account.
    pub account: String,
    /// The object.
    pub id: ObjectId,
    /// The sequence numbers of the kept snapshots that reference it.
    pub snapshots: Vec<u64>,
}

/// What a compaction of segments did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// Segments whose live objects were moved out, and which were then deleted.
    pub segments_compacted: u64,
    /// Objects moved to the newest segment.
    pub objects_moved: u64,
    /// Their bytes (written again).
    pub bytes_moved: u64,
    /// Bytes on disk given back: the deleted segments' lengths.
    pub segment_bytes_freed: u64,
    /// Objects that failed their checksum and were left where they are, with their
    /// segment, for `check` to name.
    pub damaged_left: u64,
}

/// A segment is compacted when less than this share of it (in 1/100) is live.
const COMPACT_BELOW_PERCENT: u64 = 50;

/// Records one compaction holds in memory at most (about 100 bytes each), but
/// always those of one segment; the other candidates wait for the next run.
#[cfg(not(test))]
const COMPACT_RECORDS: usize = 200_000;
#[cfg(test)]
const COMPACT_RECORDS: usize = 4;

/// Objects are moved in groups of about this many bytes, each under the writer
/// lock for one append and one index transaction: uploads wait at most that long.
const COMPACT_GROUP: u64 = 8 * 1024 * 1024;

/// Where an object is, and the checksum of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    segment: u64,
    offset: u64,
    len: u32,
    checksum: [u8; 32],
}

/// The segment being appended to.
struct Writer {
    segment: u64,
    len: u64,
    /// [`SEGMENT_TARGET`], but for tests that need many segments.
    target: u64,
}

impl Writer {
    /// Appends `parts` to the current segment (a new one once it has reached
    /// [`SEGMENT_TARGET`]) and returns the segment and offset they start at. On a
    /// failure the torn tail is cut off, so that the segment holds only whole
    /// objects; if even that fails, the tail stays unreferenced dead space.
    fn append(
        &mut self,
        backend: &impl Backend,
        parts: &[&[u8]],
    ) -> Result<(u64, u64), StoreError> {
        if self.len >= self.target {
            self.segment += 1;
            self.len = 0;
        }
        match backend.append(self.segment, parts) {
            Ok(offset) => {
                self.len = offset + parts.iter().map(|part| part.len() as u64).sum::<u64>();
                Ok((self.segment, offset))
            }
            Err(error) => {
                let _ = backend.truncate(self.segment, self.len);
                Err(error.into())
            }
        }
    }
}

/// Per-account object storage over a [`Backend`].
pub struct ObjectStore<B> {
    dir: PathBuf,
    backend: B,
    db: Database,
    writer: Mutex<Writer>,
    shards: [Mutex<()>; SHARDS],
}

impl<B: Backend> ObjectStore<B> {
    /// Opens (or creates) a store whose index and partial uploads live in `dir`
    /// and whose segments live in `backend`.
    ///
    /// # Errors
    /// If the index cannot be opened or the backend cannot be listed.
    pub fn open(dir: &Path, backend: B) -> Result<Self, StoreError> {
        fs::create_dir_all(dir.join("partial")).map_err(|source| StoreError::Io {
            action: "create",
            path: dir.join("partial"),
            source,
        })?;
        // Several processes may use the index at once (the server, and the admin
        // commands while it runs); redb lets one write transaction run at a time.
        let db = Database::builder()
            .set_concurrency_mode(redb::ConcurrencyMode::MultiWriter)
            .create(dir.join("index.redb"))
            .map_err(index)?;
        let txn = db.begin_write().map_err(index)?;
        for table in [OBJECTS, QUARANTINE, SNAPSHOTS, LIVE] {
            txn.open_table(table).map_err(index)?;
        }
        txn.open_table(PARTIALS).map_err(index)?;
        txn.open_table(ACCOUNTS).map_err(index)?;
        txn.open_table(HEADS).map_err(index)?;
        txn.open_table(RETENTION).map_err(index)?;
        txn.open_table(GARBAGE).map_err(index)?;
        txn.commit().map_err(index)?;
        // Append to the newest segment; a fresh store starts at segment 1.
        let (segment, len) = backend.list()?.last().copied().unwrap_or((1, 0));
        let store = Self {
            dir: dir.to_path_buf(),
            backend,
            db,
            writer: Mutex::new(Writer {
                segment,
                len,
                target: SEGMENT_TARGET,
            }),
            shards: std::array::from_fn(|_| Mutex::new(())),
        };
        Ok(store)
    }

    /// The backend, for tools and tests.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Starts a new segment once the current one holds `target` bytes: tests make
    /// many small segments with it.
    #[cfg(test)]
    fn with_segment_target(self, target: u64) -> Self {
        self.writer.lock().unwrap_or_else(|p| p.into_inner()).target = target;
        self
    }

    /// Creates an account with quotas in bytes (0 for none).
    ///
    /// # Errors
    /// An invalid or existing name, or an index failure.
    pub fn add_account(
        &self,
        name: &str,
        soft_limit: u64,
        hard_limit: u64,
    ) -> Result<(), StoreError> {
        check_account_name(name)?;
        let txn = self.db.begin_write().map_err(index)?;
        {
            let mut accounts = txn.open_table(ACCOUNTS).map_err(index)?;
            if accounts.get(name).map_err(index)?.is_some() {
                return Err(StoreError::AccountExists(name.to_string()));
            }
            let account = Account {
                used: 0,
                objects: 0,
                soft_limit,
                hard_limit,
                disabled: false,
            };
            accounts
                .insert(name, encode_account(&account).as_slice())
                .map_err(index)?;
        }
        txn.commit().map_err(index)
    }

    /// An account's quotas and usage.
    ///
    /// # Errors
    /// An unknown account, or an index failure.
    pub fn account(&self, name: &str) -> Result<Account, StoreError> {
        let txn = self.db.begin_read().map_err(index)?;
        let accounts = txn.open_table(ACCOUNTS).map_err(index)?;
        let value = accounts
            .get(name)
            .map_err(index)?
            .ok_or_else(|| StoreError::UnknownAccount(name.to_string()))?;
        Ok(decode_account(value.value()))
    }

    /// Every account, by name.
    ///
    /// # Errors
    /// An index failure.
    pub fn accounts(&self) -> Result<Vec<(String, Account)>, StoreError> {
        let txn = self.db.begin_read().map_err(index)?;
        let accounts = txn.open_table(ACCOUNTS).map_err(index)?;
        accounts
            .iter()
            .map_err(index)?
            .map(|entry| {
                let (name, value) = entry.map_err(index)?;
                Ok((name.value().to_string(), decode_account(value.value())))
            })
            .collect()
    }

    /// Changes an account's quotas (in bytes, 0 for none) and whether it is
    /// disabled. A lower hard quota refuses new objects; nothing stored is deleted.
    ///
    /// # Errors
    /// An unknown account, or an index failure.
    pub fn update_account(
        &self,
        name: &str,
        change: impl FnOnce(&mut Account),
    ) -> Result<Account, StoreError> {
        // Under the writer lock, so that an upload's quota check sees the change.
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let txn = self.db.begin_write().map_err(index)?;
        let account = {
            let mut accounts = txn.open_table(ACCOUNTS).map_err(index)?;
            let mut account = accounts
                .get(name)
                .map_err(index)?
                .map(|v| decode_account(v.value()))
                .ok_or_else(|| StoreError::UnknownAccount(name.to_string()))?;
            change(&mut account);
            accounts
                .insert(name, encode_account(&account).as_slice())
                .map_err(index)?;
            account
        };
        txn.commit().map_err(index)?;
        Ok(account)
    }

    /// Commits a snapshot: its manifest `manifest_id` (already stored) follows
    /// `parent`, which must be the account's head, and references what `change`
    /// says: the parent's references plus `added` minus `removed` for a delta,
    /// exactly `added` otherwise. Every added id must be stored (the parent's are:
    /// nothing a kept snapshot references is ever collected). Atomic: either all of
    /// it is recorded or nothing. Returns the new head's sequence number.
    ///
    /// # Errors
    /// [`StoreError::StaleParent`], [`StoreError::MissingReferences`] (the manifest
    /// included), [`StoreError::InvalidCommit`] for a delta that removes an id the
    /// parent does not reference, or an index failure.
    pub fn commit(
        &self,
        account: &str,
        manifest_id: &ObjectId,
        parent: Option<&ObjectId>,
        change: &Change<'_>,
        committed_at: u64,
    ) -> Result<u64, StoreError> {
        if self.account(account)?.disabled {
            return Err(StoreError::AccountDisabled(account.to_string()));
        }
        let invalid = |message: String| StoreError::InvalidCommit {
            account: account.to_string(),
            message,
        };
        if change.delta && parent.is_none() {
            return Err(invalid("a delta commit needs a parent".into()));
        }
        if !change.delta && !change.removed.is_empty() {
            return Err(invalid("only a delta commit removes ids".into()));
        }
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let txn = self.db.begin_write().map_err(index)?;
        let sequence = {
            let mut heads = txn.open_table(HEADS).map_err(index)?;
            let head = heads
                .get(account)
                .map_err(index)?
                .map(|v| decode_head(v.value()));
            if head.map(|(id, _)| id).as_ref() != parent {
                return Err(StoreError::StaleParent {
                    account: account.to_string(),
                    head: head.map(|(id, _)| id),
                });
            }
            let objects = txn.open_table(OBJECTS).map_err(index)?;
            let mut missing = Vec::new();
            let mut count = 0;
            // Objects `check --repair` quarantined that the head still references
            // count as missing too: a delta does not name them, but the snapshot
            // would need them.
            let quarantined: Vec<ObjectId> = {
                let quarantine = txn.open_table(QUARANTINE).map_err(index)?;
                let live = txn.open_table(LIVE).map_err(index)?;
                let (start, end) = account_range(account);
                let mut ids = Vec::new();
                for item in quarantine
                    .range(start.as_slice()..=end.as_slice())
                    .map_err(index)?
                {
                    let (k, _) = item.map_err(index)?;
                    let still = live
                        .get(k.value())
                        .map_err(index)?
                        .is_some_and(|v| is_open(v.value()));
                    if still && change.delta {
                        ids.push(split_key(k.value()).1);
                    }
                }
                ids
            };
            for id in std::iter::once(manifest_id)
                .chain(change.added)
                .chain(&quarantined)
            {
                if objects
                    .get(key(account, id).as_slice())
                    .map_err(index)?
                    .is_none()
                {
                    count += 1;
                    if missing.len() < 1000 {
                        missing.push(*id);
                    }
                }
            }
            if count > 0 {
                return Err(StoreError::MissingReferences {
                    account: account.to_string(),
                    count,
                    ids: missing,
                });
            }
            let sequence = head.map_or(1, |(_, s)| s + 1);
            let mut live = txn.open_table(LIVE).map_err(index)?;
            // Spans the head closes: the removed ids, or for a whole list every
            // id the head referenced that the list does not name.
            let closing: Vec<ObjectId> = if change.delta {
                change.removed.to_vec()
            } else {
                let named: std::collections::HashSet<&ObjectId> = change.added.iter().collect();
                let (start, end) = account_range(account);
                let mut closing = Vec::new();
                for item in live
                    .range(start.as_slice()..=end.as_slice())
                    .map_err(index)?
                {
                    let (k, v) = item.map_err(index)?;
                    let (_, id) = split_key(k.value());
                    if is_open(v.value()) && !named.contains(&id) {
                        closing.push(id);
                    }
                }
                closing
            };
            for id in &closing {
                let k = key(account, id);
                let mut spans = live
                    .get(k.as_slice())
                    .map_err(index)?
                    .map(|v| v.value().to_vec())
                    .unwrap_or_default();
                if !is_open(&spans) {
                    return Err(invalid(format!(
                        "it removes {id}, which the parent does not reference"
                    )));
                }
                let at = spans.len() - 8;
                spans[at..].copy_from_slice(&sequence.to_le_bytes());
                live.insert(k.as_slice(), spans.as_slice()).map_err(index)?;
            }
            let mut opened = 0_u64;
            for id in change.added {
                let k = key(account, id);
                let mut spans = live
                    .get(k.as_slice())
                    .map_err(index)?
                    .map(|v| v.value().to_vec())
                    .unwrap_or_default();
                if is_open(&spans) {
                    // Referenced already (listed twice, or a whole list).
                    continue;
                }
                spans.extend_from_slice(&sequence.to_le_bytes());
                spans.extend_from_slice(&OPEN.to_le_bytes());
                live.insert(k.as_slice(), spans.as_slice()).map_err(index)?;
                opened += 1;
            }
            drop(live);
            drop(objects);
            // The index keeps every span, so new ones are charged like object
            // bytes: a client cannot fill the disk with commits.
            charge(&txn, account, REFERENCE_COST * opened, 0, Quota::Enforce)?;
            let snapshot_key = snapshot_key(account, sequence);
            let mut value = Vec::with_capacity(32 + 8 + 33);
            value.extend_from_slice(manifest_id.as_bytes());
            value.extend_from_slice(&committed_at.to_le_bytes());
            match parent {
                None => value.push(0),
                Some(parent) => {
                    value.push(1);
                    value.extend_from_slice(parent.as_bytes());
                }
            }
            txn.open_table(SNAPSHOTS)
                .map_err(index)?
                .insert(snapshot_key.as_slice(), value.as_slice())
                .map_err(index)?;
            let mut head_value = [0_u8; 40];
            head_value[..32].copy_from_slice(manifest_id.as_bytes());
            head_value[32..].copy_from_slice(&sequence.to_le_bytes());
            heads
                .insert(account, head_value.as_slice())
                .map_err(index)?;
            sequence
        };
        txn.commit().map_err(index)?;
        Ok(sequence)
    }

    /// The objects kept snapshots reference that are missing or `damaged`.
    fn lost(&self, damaged: &[Damage]) -> Result<Vec<Lost>, StoreError> {
        let damaged: std::collections::HashSet<(&str, ObjectId)> =
            damaged.iter().map(|d| (d.account.as_str(), d.id)).collect();
        let txn = self.db.begin_read().map_err(index)?;
        let snapshots = txn.open_table(SNAPSHOTS).map_err(index)?;
        let mut kept: std::collections::HashMap<String, Vec<u64>> = Default::default();
        for item in snapshots.iter().map_err(index)? {
            let (k, _) = item.map_err(index)?;
            let k = k.value();
            let (account, sequence) = k.split_at(k.len() - 8);
            let account = String::from_utf8_lossy(&account[..account.len() - 1]).into_owned();
            let sequence = u64::from_be_bytes(sequence.try_into().expect("8 bytes"));
            kept.entry(account).or_default().push(sequence);
        }
        let live = txn.open_table(LIVE).map_err(index)?;
        let objects = txn.open_table(OBJECTS).map_err(index)?;
        let mut lost: BTreeMap<(String, ObjectId), BTreeSet<u64>> = BTreeMap::new();
        // A kept snapshot's manifest is needed as much as what it references.
        for item in snapshots.iter().map_err(index)? {
            let (k, v) = item.map_err(index)?;
            let k = k.value();
            let (account, sequence) = k.split_at(k.len() - 8);
            let account = String::from_utf8_lossy(&account[..account.len() - 1]).into_owned();
            let sequence = u64::from_be_bytes(sequence.try_into().expect("8 bytes"));
            let manifest = ObjectId::from_bytes(v.value()[..32].try_into().expect("32 bytes"));
            let held = objects
                .get(key(&account, &manifest).as_slice())
                .map_err(index)?
                .is_some();
            if !held || damaged.contains(&(account.as_str(), manifest)) {
                lost.entry((account, manifest))
                    .or_default()
                    .insert(sequence);
            }
        }
        for item in live.iter().map_err(index)? {
            let (k, v) = item.map_err(index)?;
            let (account, id) = split_key(k.value());
            let Some(sequences) = kept.get(&account) else {
                continue;
            };
            let needed: Vec<u64> = sequences
                .iter()
                .copied()
                .filter(|s| spans_contain(v.value(), *s))
                .collect();
            if needed.is_empty() {
                continue;
            }
            let held = objects.get(k.value()).map_err(index)?.is_some();
            if !held || damaged.contains(&(account.as_str(), id)) {
                lost.entry((account, id)).or_default().extend(needed);
            }
        }
        Ok(lost
            .into_iter()
            .map(|((account, id), snapshots)| Lost {
                account,
                id,
                snapshots: snapshots.into_iter().collect(),
            })
            .collect())
    }

    /// Sets an account's retention policy (zeros: keep every snapshot).
    ///
    /// # Errors
    /// An unknown account, or an index failure.
    pub fn set_retention(&self, account: &str, policy: Policy) -> Result<(), StoreError> {
        self.account(account)?;
        let txn = self.db.begin_write().map_err(index)?;
        txn.open_table(RETENTION)
            .map_err(index)?
            .insert(account, policy.encode().as_slice())
            .map_err(index)?;
        txn.commit().map_err(index)
    }

    /// An account's retention policy (zeros when none was set).
    ///
    /// # Errors
    /// An unknown account, or an index failure.
    pub fn retention(&self, account: &str) -> Result<Policy, StoreError> {
        self.account(account)?;
        let txn = self.db.begin_read().map_err(index)?;
        let table = txn.open_table(RETENTION).map_err(index)?;
        Ok(table
            .get(account)
            .map_err(index)?
            .map(|v| Policy::decode(v.value()))
            .unwrap_or_default())
    }

    /// Applies every account's retention policy, then deletes the objects no kept
    /// snapshot needs that were found unneeded at least `grace` seconds before
    /// `now` (at once with a grace of 0), and the segments left without objects.
    /// With `dry_run`, reports what it would do and changes nothing.
    ///
    /// Safe while the server runs: it changes the index in one transaction, which
    /// commits wait for, and deletes only segments the server no longer appends
    /// to. It never needs a key: what a snapshot references is in the spans its
    /// commits left.
    ///
    /// # Errors
    /// An index or backend failure (what was done before it stays done).
    pub fn collect_garbage(
        &self,
        now: u64,
        grace: u64,
        dry_run: bool,
    ) -> Result<GcReport, StoreError> {
        let mut report = GcReport::default();
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let txn = self.db.begin_write().map_err(index)?;
        // Which snapshots stay, and their manifests.
        let mut kept: HashMap<String, (BTreeSet<u64>, HashSet<ObjectId>)> = HashMap::new();
        {
            let accounts: Vec<String> = {
                let table = txn.open_table(ACCOUNTS).map_err(index)?;
                let mut names = Vec::new();
                for item in table.iter().map_err(index)? {
                    names.push(item.map_err(index)?.0.value().to_string());
                }
                names
            };
            let retention = txn.open_table(RETENTION).map_err(index)?;
            let heads = txn.open_table(HEADS).map_err(index)?;
            let mut snapshots = txn.open_table(SNAPSHOTS).map_err(index)?;
            for account in accounts {
                let policy = retention
                    .get(account.as_str())
                    .map_err(index)?
                    .map(|v| Policy::decode(v.value()))
                    .unwrap_or_default();
                let head = heads
                    .get(account.as_str())
                    .map_err(index)?
                    .map(|v| decode_head(v.value()).1);
                let (start, end) = (snapshot_key(&account, 0), snapshot_key(&account, u64::MAX));
                let mut all = Vec::new();
                for item in snapshots
                    .range(start.as_slice()..=end.as_slice())
                    .map_err(index)?
                {
                    let (k, v) = item.map_err(index)?;
                    let k = k.value();
                    let sequence =
                        u64::from_be_bytes(k[k.len() - 8..].try_into().expect("8 bytes"));
                    let v = v.value();
                    let manifest = ObjectId::from_bytes(v[..32].try_into().expect("32 bytes"));
                    let at = u64::from_le_bytes(v[32..40].try_into().expect("8 bytes"));
                    all.push((sequence, at, manifest));
                }
                let times: Vec<(u64, u64)> = all.iter().map(|(s, t, _)| (*s, *t)).collect();
                let keep = retention::kept(&times, head, policy);
                let mut manifests = HashSet::new();
                for (sequence, _, manifest) in all {
                    if keep.contains(&sequence) {
                        manifests.insert(manifest);
                    } else {
                        report.snapshots_forgotten.push((account.clone(), sequence));
                        if !dry_run {
                            snapshots
                                .remove(snapshot_key(&account, sequence).as_slice())
                                .map_err(index)?;
                        }
                    }
                }
                kept.insert(account, (keep, manifests));
            }
        }
        // Spans that no kept snapshot falls in are dropped (and their charge given
        // back); an id left without spans is needed by no snapshot.
        let mut span_credit: HashMap<String, u64> = HashMap::new();
        // Ids whose spans all go (a dry run does not write the pruning, so it
        // consults this instead).
        let mut emptied: HashSet<Vec<u8>> = HashSet::new();
        {
            let mut live = txn.open_table(LIVE).map_err(index)?;
            let mut changes: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
            for item in live.iter().map_err(index)? {
                let (k, v) = item.map_err(index)?;
                let (account, _) = split_key(k.value());
                let keep = kept.get(&account).map(|(keep, _)| keep);
                let spans = v.value();
                let mut pruned = Vec::with_capacity(spans.len());
                for pair in spans.chunks_exact(16) {
                    let first = u64::from_le_bytes(pair[..8].try_into().expect("8 bytes"));
                    let end = u64::from_le_bytes(pair[8..].try_into().expect("8 bytes"));
                    let needed = end == OPEN
                        || keep.is_some_and(|keep| keep.range(first..end).next().is_some());
                    if needed {
                        pruned.extend_from_slice(pair);
                    }
                }
                if pruned.len() != spans.len() {
                    if pruned.is_empty() {
                        emptied.insert(k.value().to_vec());
                    }
                    let dropped = ((spans.len() - pruned.len()) / 16) as u64;
                    *span_credit.entry(account).or_default() += dropped * REFERENCE_COST;
                    changes.push((k.value().to_vec(), pruned));
                }
            }
            if !dry_run {
                for (k, spans) in changes {
                    if spans.is_empty() {
                        live.remove(k.as_slice()).map_err(index)?;
                    } else {
                        live.insert(k.as_slice(), spans.as_slice()).map_err(index)?;
                    }
                }
            }
        }
        // Objects: needed if a span or a kept manifest names them.
        let mut deletions: Vec<(Vec<u8>, Record)> = Vec::new();
        let mut live_bytes: BTreeMap<u64, u64> = BTreeMap::new();
        {
            let objects = txn.open_table(OBJECTS).map_err(index)?;
            let live = txn.open_table(LIVE).map_err(index)?;
            let mut garbage = txn.open_table(GARBAGE).map_err(index)?;
            for item in objects.iter().map_err(index)? {
                let (k, v) = item.map_err(index)?;
                let k = k.value();
                let record = decode_record(v.value());
                let (account, id) = split_key(k);
                let needed = (!emptied.contains(k)
                    && live
                        .get(k)
                        .map_err(index)?
                        .is_some_and(|spans| !spans.value().is_empty()))
                    || kept
                        .get(&account)
                        .is_some_and(|(_, manifests)| manifests.contains(&id));
                let since = garbage.get(k).map_err(index)?.map(|v| v.value());
                if needed {
                    *live_bytes.entry(record.segment).or_default() += u64::from(record.len);
                    if since.is_some() && !dry_run {
                        garbage.remove(k).map_err(index)?;
                    }
                    continue;
                }
                match since {
                    Some(since) if now >= since.saturating_add(grace) => {
                        deletions.push((k.to_vec(), record));
                    }
                    None if grace == 0 => deletions.push((k.to_vec(), record)),
                    None => {
                        report.objects_waiting += 1;
                        *live_bytes.entry(record.segment).or_default() += u64::from(record.len);
                        if !dry_run {
                            garbage.insert(k, now).map_err(index)?;
                        }
                    }
                    Some(_) => {
                        report.objects_waiting += 1;
                        *live_bytes.entry(record.segment).or_default() += u64::from(record.len);
                    }
                }
            }
        }
        report.objects_deleted = deletions.len() as u64;
        report.bytes_freed = deletions.iter().map(|(_, r)| u64::from(r.len)).sum();
        if dry_run {
            return Ok(report);
        }
        {
            let mut objects = txn.open_table(OBJECTS).map_err(index)?;
            let mut garbage = txn.open_table(GARBAGE).map_err(index)?;
            let mut accounts = txn.open_table(ACCOUNTS).map_err(index)?;
            let mut credit: HashMap<String, (u64, u64)> = HashMap::new();
            for (k, record) in &deletions {
                objects.remove(k.as_slice()).map_err(index)?;
                garbage.remove(k.as_slice()).map_err(index)?;
                let (account, _) = split_key(k);
                let entry = credit.entry(account).or_default();
                entry.0 += charged(u64::from(record.len));
                entry.1 += 1;
            }
            for (account, bytes) in span_credit {
                credit.entry(account).or_default().0 += bytes;
            }
            for (account, (bytes, count)) in credit {
                let current = accounts
                    .get(account.as_str())
                    .map_err(index)?
                    .map(|v| decode_account(v.value()));
                if let Some(mut info) = current {
                    info.used = info.used.saturating_sub(bytes);
                    info.objects = info.objects.saturating_sub(count);
                    accounts
                        .insert(account.as_str(), encode_account(&info).as_slice())
                        .map_err(index)?;
                }
            }
        }
        txn.commit().map_err(index)?;
        // Segments without an object go, but never the newest: it is the one
        // being appended to. A server in another process may have stored objects
        // since the scan above; it writes only to the newest segment and indexes
        // what it wrote before it moves on to a new one, so an index read now,
        // after the listing, names every object of every older segment.
        let segments = self.backend.list()?;
        let newest = segments.last().map(|(segment, _)| *segment);
        let candidates: Vec<(u64, u64)> = segments
            .into_iter()
            .filter(|(segment, _)| Some(*segment) != newest && !live_bytes.contains_key(segment))
            .collect();
        if !candidates.is_empty() {
            let used = self.segment_usage()?;
            for (segment, len) in candidates {
                if !used.contains_key(&segment) {
                    self.backend.delete(segment)?;
                    report.segments_deleted += 1;
                    report.segment_bytes_freed += len;
                }
            }
        }
        Ok(report)
    }

    /// Drops uploads in progress whose partial file was last written more than
    /// `max_age` seconds before `now`: a laptop that never came back for them.
    /// Only the server calls it (it holds the locks of the uploads it runs).
    ///
    /// # Errors
    /// An index failure.
    pub fn expire_partials(&self, now: u64, max_age: u64) -> Result<u64, StoreError> {
        let keys: Vec<Vec<u8>> = {
            let txn = self.db.begin_read().map_err(index)?;
            let partials = txn.open_table(PARTIALS).map_err(index)?;
            let mut keys = Vec::new();
            for item in partials.iter().map_err(index)? {
                keys.push(item.map_err(index)?.0.value().to_vec());
            }
            keys
        };
        let mut expired = 0;
        for k in keys {
            let (account, id) = split_key(&k);
            let _shard = self.shards[usize::from(id.as_bytes()[0]) % SHARDS]
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let written = fs::metadata(self.partial_path(&account, &id))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            if now.saturating_sub(written) > max_age {
                self.forget_partial(&account, &id, &k)?;
                expired += 1;
            }
        }
        Ok(expired)
    }

    /// The ids snapshot `sequence` of `account` references (for `check` and tests).
    ///
    /// # Errors
    /// An index failure.
    pub fn references(&self, account: &str, sequence: u64) -> Result<Vec<ObjectId>, StoreError> {
        let txn = self.db.begin_read().map_err(index)?;
        let live = txn.open_table(LIVE).map_err(index)?;
        let (start, end) = account_range(account);
        let mut ids = Vec::new();
        for item in live
            .range(start.as_slice()..=end.as_slice())
            .map_err(index)?
        {
            let (k, v) = item.map_err(index)?;
            if spans_contain(v.value(), sequence) {
                ids.push(split_key(k.value()).1);
            }
        }
        Ok(ids)
    }

    /// How many snapshots the account keeps, counted in the index without reading
    /// them.
    ///
    /// # Errors
    /// An unknown account, or an index failure.
    pub fn snapshot_count(&self, account: &str) -> Result<u64, StoreError> {
        self.account(account)?;
        let txn = self.db.begin_read().map_err(index)?;
        let table = txn.open_table(SNAPSHOTS).map_err(index)?;
        let (start, end) = (snapshot_key(account, 0), snapshot_key(account, u64::MAX));
        let mut count = 0;
        for entry in table
            .range(start.as_slice()..=end.as_slice())
            .map_err(index)?
        {
            entry.map_err(index)?;
            count += 1;
        }
        Ok(count)
    }

    /// The account's head: the manifest id of its newest snapshot, if any.
    ///
    /// # Errors
    /// An unknown account, or an index failure.
    pub fn head(&self, account: &str) -> Result<Option<ObjectId>, StoreError> {
        self.account(account)?;
        read_head(&self.db.begin_read().map_err(index)?, account)
    }

    /// The account's head, and up to `limit` snapshots from sequence `from` on,
    /// oldest first, with whether more follow.
    ///
    /// # Errors
    /// An unknown account, or an index failure.
    pub fn snapshots(
        &self,
        account: &str,
        from: u64,
        limit: usize,
    ) -> Result<Snapshots, StoreError> {
        self.account(account)?;
        let txn = self.db.begin_read().map_err(index)?;
        let head = read_head(&txn, account)?;
        let table = txn.open_table(SNAPSHOTS).map_err(index)?;
        let start = snapshot_key(account, from);
        let end = snapshot_key(account, u64::MAX);
        let mut entries = Vec::new();
        let mut more = false;
        for entry in table
            .range(start.as_slice()..=end.as_slice())
            .map_err(index)?
        {
            let (key, value) = entry.map_err(index)?;
            if entries.len() == limit {
                more = true;
                break;
            }
            let key = key.value();
            let sequence = u64::from_be_bytes(key[key.len() - 8..].try_into().expect("8 bytes"));
            let value = value.value();
            entries.push(Snapshot {
                id: ObjectId::from_bytes(value[..32].try_into().expect("32 bytes")),
                sequence,
                committed_at: u64::from_le_bytes(value[32..40].try_into().expect("8 bytes")),
            });
        }
        Ok(Snapshots {
            head,
            entries,
            more,
        })
    }

    /// Whether `account` holds `id`, and how much of a cut upload.
    ///
    /// # Errors
    /// An unknown account, or an index or file failure.
    pub fn holding(&self, account: &str, id: &ObjectId) -> Result<Holding, StoreError> {
        self.account(account)?;
        let key = key(account, id);
        let txn = self.db.begin_read().map_err(index)?;
        if is_stored(&txn, &key)? {
            return Ok(Holding::Stored);
        }
        if txn
            .open_table(PARTIALS)
            .map_err(index)?
            .get(key.as_slice())
            .map_err(index)?
            .is_some()
        {
            return Ok(Holding::Partial(self.partial_len(account, id)?));
        }
        Ok(Holding::Missing)
    }

    /// Takes a piece of an upload: `data` goes at `offset` of the object `id` of
    /// `total` bytes. The piece that completes the object stores it.
    ///
    /// # Errors
    /// A piece at another offset than the bytes held ([`StoreError::OffsetMismatch`]),
    /// a total that differs from the first piece's or exceeds the limit, a full
    /// account, or a failure of the index, the files or the backend. After an error
    /// the bytes held before the piece are still held.
    pub fn put_piece(
        &self,
        account: &str,
        id: &ObjectId,
        total: u32,
        offset: u32,
        data: &[u8],
    ) -> Result<PutOutcome, StoreError> {
        let info = self.account(account)?;
        if info.disabled {
            return Err(StoreError::AccountDisabled(account.to_string()));
        }
        if total > MAX_OBJECT_LEN {
            return Err(StoreError::TooLarge {
                id: *id,
                len: u64::from(total),
                limit: u64::from(MAX_OBJECT_LEN),
            });
        }
        let end = u64::from(offset) + data.len() as u64;
        if end > u64::from(total) {
            return Err(StoreError::LengthMismatch {
                id: *id,
                expected: u64::from(total),
                got: end,
            });
        }
        let _shard = self.shards[usize::from(id.as_bytes()[0]) % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let key = key(account, id);
        let announced = {
            let txn = self.db.begin_read().map_err(index)?;
            if is_stored(&txn, &key)? {
                let stale = txn
                    .open_table(PARTIALS)
                    .map_err(index)?
                    .get(key.as_slice())
                    .map_err(index)?
                    .is_some();
                drop(txn);
                if stale {
                    // Stored whole by another connection while this one had begun
                    // piece by piece: the upload in progress is moot.
                    self.forget_partial(account, id, &key)?;
                }
                return Ok(PutOutcome::Stored);
            }
            let partials = txn.open_table(PARTIALS).map_err(index)?;
            partials
                .get(key.as_slice())
                .map_err(index)?
                .map(|v| v.value())
        };
        let path = self.partial_path(account, id);
        let held = match announced {
            Some(announced) if announced != total => {
                return Err(StoreError::LengthMismatch {
                    id: *id,
                    expected: u64::from(announced),
                    got: u64::from(total),
                });
            }
            Some(_) => self.partial_len(account, id)?,
            None => {
                if offset != 0 {
                    return Err(StoreError::OffsetMismatch { id: *id, held: 0 });
                }
                // Refuse early what could never fit, counting the uploads in progress,
                // so that partial uploads cannot fill the disk past the quota.
                check_quota(account, &info, self.pending(account)? + u64::from(total))?;
                self.start_partial(account, &key, total, &path)?;
                0
            }
        };
        if offset != held {
            return Err(StoreError::OffsetMismatch { id: *id, held });
        }
        if !data.is_empty() {
            append_synced(&path, data)?;
        }
        let held = offset + data.len() as u32;
        if held < total {
            return Ok(PutOutcome::Incomplete(held));
        }
        self.complete(account, &key, &path)?;
        Ok(PutOutcome::Stored)
    }

    /// Stores objects that arrived whole, together: one append and sync of the
    /// segment and one index transaction for all of them (group commit), instead of
    /// a partial file and several syncs each. Returns one result per object, in
    /// order (an object with an upload in progress gets `OffsetMismatch`, so that
    /// it continues piece by piece).
    ///
    /// # Errors
    /// A failure that concerns the whole batch (unknown or disabled account, the
    /// backend, the index): nothing of the batch is stored then.
    pub fn put_whole(
        &self,
        account: &str,
        objects: &[(ObjectId, &[u8])],
    ) -> Result<Vec<Result<PutOutcome, StoreError>>, StoreError> {
        if self.account(account)?.disabled {
            return Err(StoreError::AccountDisabled(account.to_string()));
        }
        let mut results: Vec<Option<Result<PutOutcome, StoreError>>> =
            Vec::with_capacity(objects.len());
        results.resize_with(objects.len(), || None);
        // A second copy of an id in the batch gets the first copy's answer.
        let mut first_copy: Vec<Option<usize>> = vec![None; objects.len()];
        let mut seen = std::collections::HashMap::new();
        for (i, (id, data)) in objects.iter().enumerate() {
            if data.len() > MAX_OBJECT_LEN as usize {
                results[i] = Some(Err(StoreError::TooLarge {
                    id: *id,
                    len: data.len() as u64,
                    limit: u64::from(MAX_OBJECT_LEN),
                }));
            } else if let Some(&j) = seen.get(id) {
                first_copy[i] = Some(j);
            } else {
                seen.insert(*id, i);
            }
        }
        // Hashed before the lock is taken, so that other uploads are not held up by it.
        let checksums: Vec<Option<[u8; 32]>> = objects
            .iter()
            .enumerate()
            .map(|(i, (_, data))| {
                (results[i].is_none() && first_copy[i].is_none())
                    .then(|| *blake3::hash(data).as_bytes())
            })
            .collect();
        // Everything else is decided under the writer lock, where no other upload
        // of the account can store or finish the same object meanwhile.
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let info = self.account(account)?;
        let mut pending = self.pending(account)?;
        let mut accepted = Vec::new();
        let mut empty_partials = Vec::new();
        let mut wanted = 0_u64;
        {
            let txn = self.db.begin_read().map_err(index)?;
            let stored = txn.open_table(OBJECTS).map_err(index)?;
            let partials = txn.open_table(PARTIALS).map_err(index)?;
            for (i, (id, data)) in objects.iter().enumerate() {
                if results[i].is_some() || first_copy[i].is_some() {
                    continue;
                }
                let key = key(account, id);
                if stored.get(key.as_slice()).map_err(index)?.is_some() {
                    results[i] = Some(Ok(PutOutcome::Stored));
                    continue;
                }
                if let Some(total) = partials.get(key.as_slice()).map_err(index)? {
                    let held = self.partial_len(account, id)?;
                    if held > 0 {
                        // Bytes are held: the upload goes on piece by piece.
                        results[i] = Some(Err(StoreError::OffsetMismatch { id: *id, held }));
                        continue;
                    }
                    // An upload recorded but empty: the whole object replaces it.
                    pending = pending.saturating_sub(u64::from(total.value()));
                    empty_partials.push(key.clone());
                }
                let len = charged(data.len() as u64);
                if let Err(full) = check_quota(account, &info, pending + wanted + len) {
                    results[i] = Some(Err(full));
                    continue;
                }
                wanted += len;
                accepted.push((i, key));
            }
        }
        if !accepted.is_empty() {
            let parts: Vec<&[u8]> = accepted.iter().map(|(i, _)| objects[*i].1).collect();
            let (segment, base) = writer.append(&self.backend, &parts)?;
            let txn = self.db.begin_write().map_err(index)?;
            {
                let mut table = txn.open_table(OBJECTS).map_err(index)?;
                let mut offset = base;
                for (i, key) in &accepted {
                    let data = objects[*i].1;
                    let record = Record {
                        segment,
                        offset,
                        len: u32::try_from(data.len()).expect("bounded by MAX_OBJECT_LEN"),
                        checksum: checksums[*i].expect("hashed: neither refused nor a copy"),
                    };
                    table
                        .insert(key.as_slice(), encode_record(&record).as_slice())
                        .map_err(index)?;
                    offset += data.len() as u64;
                }
                let mut partials = txn.open_table(PARTIALS).map_err(index)?;
                for key in &empty_partials {
                    partials.remove(key.as_slice()).map_err(index)?;
                }
                charge(&txn, account, wanted, accepted.len() as u64, Quota::Checked)?;
            }
            txn.commit().map_err(index)?;
            for (i, _) in &accepted {
                results[*i] = Some(Ok(PutOutcome::Stored));
                let _ = fs::remove_file(self.partial_path(account, &objects[*i].0));
            }
        }
        drop(writer);
        for i in 0..objects.len() {
            if let Some(j) = first_copy[i] {
                let answer = match &results[j] {
                    Some(Ok(outcome)) => Ok(*outcome),
                    Some(Err(error)) => Err(same_refusal(error)),
                    None => unreachable!("every first copy has an answer"),
                };
                results[i] = Some(answer);
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every object has a result"))
            .collect())
    }

    /// Reads `len` bytes at `offset` of an object, after checking the whole object
    /// against the checksum taken when it was stored. Returns the object's length too.
    ///
    /// # Errors
    /// An unknown object, a range past its end, damage ([`StoreError::Corrupt`]), or a
    /// failure of the index or the backend.
    pub fn read(
        &self,
        account: &str,
        id: &ObjectId,
        offset: u32,
        len: u32,
    ) -> Result<(u32, Vec<u8>), StoreError> {
        self.account(account)?;
        let mut record = self.record(account, id)?;
        let bytes = loop {
            let read = match self.verified(&record) {
                Ok(Some(bytes)) => Ok(bytes),
                Ok(None) => Err(StoreError::Corrupt {
                    account: account.to_string(),
                    id: *id,
                    segment: record.segment,
                    offset: record.offset,
                }),
                Err(error) => Err(StoreError::from(error)),
            };
            match read {
                Ok(bytes) => break bytes,
                Err(error) => {
                    // A compaction may have moved the object (and deleted its old
                    // segment) since the record was read: then read it where it is.
                    let now = self.record(account, id)?;
                    if now == record {
                        return Err(error);
                    }
                    record = now;
                }
            }
        };
        if offset > record.len {
            return Err(StoreError::LengthMismatch {
                id: *id,
                expected: u64::from(record.len),
                got: u64::from(offset),
            });
        }
        let start = offset as usize;
        let end = start.saturating_add(len as usize).min(bytes.len());
        Ok((record.len, bytes[start..end].to_vec()))
    }

    /// Reads every object back and compares it with its checksum; with `repair`,
    /// moves damaged objects to quarantine (so that a commit needing them fails
    /// loudly and the client uploads them again) and says what was lost.
    ///
    /// # Errors
    /// A failure of the index or of listing the backend (unreadable objects are
    /// reported as damage, not errors).
    pub fn check(&self, repair: bool) -> Result<CheckReport, StoreError> {
        let mut report = CheckReport::default();
        let mut referenced: std::collections::BTreeMap<u64, u64> = Default::default();
        // Where each damaged object was found damaged.
        let mut damaged_at = Vec::new();
        {
            let txn = self.db.begin_read().map_err(index)?;
            let objects = txn.open_table(OBJECTS).map_err(index)?;
            for entry in objects.iter().map_err(index)? {
                let (key, value) = entry.map_err(index)?;
                let (account, id) = split_key(key.value());
                let mut record = decode_record(value.value());
                report.objects += 1;
                report.bytes += u64::from(record.len);
                let mut gone = false;
                let problem = loop {
                    let Some(problem) = self.problem(&record) else {
                        break None;
                    };
                    // The server's compaction may have moved the object since this
                    // read began: what counts is where the index has it now.
                    match self.record(&account, &id) {
                        Ok(now) if now != record => record = now,
                        Ok(_) => break Some(problem),
                        Err(StoreError::ObjectMissing { .. }) => {
                            gone = true;
                            break None;
                        }
                        Err(error) => return Err(error),
                    }
                };
                // Counted where it is now, so that a move does not show as dead space.
                if !gone {
                    *referenced.entry(record.segment).or_default() += u64::from(record.len);
                }
                if let Some(problem) = problem {
                    report.damaged.push(Damage {
                        account,
                        id,
                        problem,
                    });
                    damaged_at.push(record);
                }
            }
        }
        for (segment, len) in self.backend.list()? {
            report.unreferenced_bytes +=
                len.saturating_sub(referenced.get(&segment).copied().unwrap_or(0));
        }
        report.lost = self.lost(&report.damaged)?;
        if repair && !report.damaged.is_empty() {
            let txn = self.db.begin_write().map_err(index)?;
            {
                let mut objects = txn.open_table(OBJECTS).map_err(index)?;
                let mut quarantine = txn.open_table(QUARANTINE).map_err(index)?;
                let mut accounts = txn.open_table(ACCOUNTS).map_err(index)?;
                for (damage, found) in report.damaged.iter().zip(&damaged_at) {
                    let key = key(&damage.account, &damage.id);
                    // Only the copy found damaged goes: one moved since is checked
                    // by the next run.
                    let now = objects
                        .get(key.as_slice())
                        .map_err(index)?
                        .map(|v| decode_record(v.value()));
                    if now != Some(*found) {
                        continue;
                    }
                    let Some(value) = objects.remove(key.as_slice()).map_err(index)? else {
                        continue;
                    };
                    let record = value.value().to_vec();
                    drop(value);
                    quarantine
                        .insert(key.as_slice(), record.as_slice())
                        .map_err(index)?;
                    let current = accounts
                        .get(damage.account.as_str())
                        .map_err(index)?
                        .map(|v| decode_account(v.value()));
                    if let Some(mut account) = current {
                        account.used = account
                            .used
                            .saturating_sub(charged(u64::from(decode_record(&record).len)));
                        account.objects = account.objects.saturating_sub(1);
                        accounts
                            .insert(damage.account.as_str(), encode_account(&account).as_slice())
                            .map_err(index)?;
                    }
                }
            }
            txn.commit().map_err(index)?;
            report.repaired = true;
        }
        Ok(report)
    }

    /// What is wrong with the bytes at `record`, if anything.
    fn problem(&self, record: &Record) -> Option<String> {
        match self.verified(record) {
            Err(error) => Some(format!("unreadable: {error}")),
            Ok(None) => Some(format!(
                "checksum mismatch in segment {:016x} at offset {}",
                record.segment, record.offset
            )),
            Ok(Some(_)) => None,
        }
    }

    /// The bytes at `record` if they match its checksum (`None` if they do not).
    fn verified(&self, record: &Record) -> Result<Option<Vec<u8>>, crate::backend::BackendError> {
        let bytes = self
            .backend
            .read(record.segment, record.offset, record.len)?;
        Ok((*blake3::hash(&bytes).as_bytes() == record.checksum).then_some(bytes))
    }

    /// Moves the live objects out of segments that are mostly dead space (less than
    /// half live) into the newest segment, then deletes those segments: the disk
    /// space that garbage collection freed in the index comes back. Objects are
    /// read and checked outside any lock, then moved a group at a time under the
    /// writer lock, each group with one synced append and one index transaction
    /// that moves only objects whose record did not change meanwhile. An object
    /// that fails its checksum is not moved, and its segment stays, so that `check`
    /// names it. A reader that looked an object up before it moved finds it again
    /// ([`read`](Self::read) and [`check`](Self::check) look again when the old
    /// place fails).
    ///
    /// Only the process that appends to segments may run it: the server (its hourly
    /// task), or `homing-store gc` while no server runs.
    ///
    /// # Errors
    /// An index or backend failure; what was moved before it stays moved.
    pub fn compact(&self) -> Result<CompactReport, StoreError> {
        let mut report = CompactReport::default();
        let current = self
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .segment;
        let live = self.segment_usage()?;
        let mut lengths: HashMap<u64, u64> = self
            .backend
            .list()?
            .into_iter()
            .filter(|&(segment, len)| {
                segment < current
                    && len > 0
                    && live.get(&segment).copied().unwrap_or(0) * 100 < len * COMPACT_BELOW_PERCENT
            })
            .collect();
        if lengths.is_empty() {
            return Ok(report);
        }
        // The records to move, by segment. Memory is bounded: past
        // `COMPACT_RECORDS`, the highest-numbered candidates wait for the next run
        // (the lowest one is always kept, however many objects it holds).
        let mut by_segment: BTreeMap<u64, Vec<(Vec<u8>, Record)>> = BTreeMap::new();
        let mut held = 0;
        self.each_record(|key, record| {
            if !lengths.contains_key(&record.segment) {
                return;
            }
            by_segment
                .entry(record.segment)
                .or_default()
                .push((key.to_vec(), record));
            held += 1;
            while held > COMPACT_RECORDS && by_segment.len() > 1 {
                let (later, records) = by_segment.pop_last().expect("more than one");
                held -= records.len();
                lengths.remove(&later);
            }
        })?;
        let mut moving: Vec<(Vec<u8>, Record)> = by_segment.into_values().flatten().collect();
        moving.sort_by_key(|(_, record)| (record.segment, record.offset));
        let mut keep = BTreeSet::new();
        let mut rest = &moving[..];
        while !rest.is_empty() {
            let mut take = 0;
            let mut bytes = 0;
            while take < rest.len() && (take == 0 || bytes < COMPACT_GROUP) {
                bytes += u64::from(rest[take].1.len);
                take += 1;
            }
            let (group, after) = rest.split_at(take);
            rest = after;
            let mut read = Vec::with_capacity(group.len());
            for (key, record) in group {
                match self.verified(record) {
                    Ok(Some(bytes)) => read.push((key, record, bytes)),
                    // Damage, unless the object went meanwhile (a collection in
                    // another process): then there is nothing to move or to name.
                    _ if self.current_record(key)?.as_ref() == Some(record) => {
                        report.damaged_left += 1;
                        keep.insert(record.segment);
                    }
                    _ => {}
                }
            }
            if read.is_empty() {
                continue;
            }
            // The copies are appended (and synced) before the index transaction
            // begins, so that other processes' index writes do not wait for the
            // sync; a copy whose record changed meanwhile is dead space.
            let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            let parts: Vec<&[u8]> = read.iter().map(|(_, _, bytes)| bytes.as_slice()).collect();
            let (segment, base) = writer.append(&self.backend, &parts)?;
            let txn = self.db.begin_write().map_err(index)?;
            {
                let mut table = txn.open_table(OBJECTS).map_err(index)?;
                let mut offset = base;
                for (key, record, bytes) in &read {
                    let at = offset;
                    offset += bytes.len() as u64;
                    // Deleted or moved meanwhile: left alone.
                    let now = table
                        .get(key.as_slice())
                        .map_err(index)?
                        .map(|v| decode_record(v.value()));
                    if now.as_ref() != Some(*record) {
                        continue;
                    }
                    let moved = Record {
                        segment,
                        offset: at,
                        ..**record
                    };
                    table
                        .insert(key.as_slice(), encode_record(&moved).as_slice())
                        .map_err(index)?;
                    report.objects_moved += 1;
                    report.bytes_moved += bytes.len() as u64;
                }
            }
            txn.commit().map_err(index)?;
        }
        // A segment goes once the index names no object in it (read afresh, as
        // garbage collection does), and none of its objects was left damaged.
        let used = self.segment_usage()?;
        let mut segments: Vec<(u64, u64)> = lengths.into_iter().collect();
        segments.sort_unstable();
        for (segment, len) in segments {
            if !used.contains_key(&segment) && !keep.contains(&segment) {
                self.backend.delete(segment)?;
                report.segments_compacted += 1;
                report.segment_bytes_freed += len;
            }
        }
        Ok(report)
    }

    /// The bytes of the objects the index records in each segment (a segment it
    /// records none in is absent), read afresh.
    fn segment_usage(&self) -> Result<BTreeMap<u64, u64>, StoreError> {
        let mut usage = BTreeMap::new();
        self.each_record(|_, record| {
            *usage.entry(record.segment).or_default() += u64::from(record.len);
        })?;
        Ok(usage)
    }

    /// Calls `visit` with the key and record of every stored object, from one
    /// read transaction.
    fn each_record(&self, mut visit: impl FnMut(&[u8], Record)) -> Result<(), StoreError> {
        let txn = self.db.begin_read().map_err(index)?;
        for item in txn
            .open_table(OBJECTS)
            .map_err(index)?
            .iter()
            .map_err(index)?
        {
            let (key, value) = item.map_err(index)?;
            visit(key.value(), decode_record(value.value()));
        }
        Ok(())
    }

    /// The record of the object under index key `key` now, if any.
    fn current_record(&self, key: &[u8]) -> Result<Option<Record>, StoreError> {
        let txn = self.db.begin_read().map_err(index)?;
        let objects = txn.open_table(OBJECTS).map_err(index)?;
        Ok(objects
            .get(key)
            .map_err(index)?
            .map(|v| decode_record(v.value())))
    }

    fn record(&self, account: &str, id: &ObjectId) -> Result<Record, StoreError> {
        self.current_record(&key(account, id))?
            .ok_or_else(|| StoreError::ObjectMissing {
                account: account.to_string(),
                id: *id,
            })
    }

    fn start_partial(
        &self,
        account: &str,
        key: &[u8],
        total: u32,
        path: &Path,
    ) -> Result<(), StoreError> {
        let dir = self.dir.join("partial").join(account);
        fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
            action: "create",
            path: dir.clone(),
            source,
        })?;
        // A stale file of an upload the index forgot (crash before the record)
        // must not pass for held bytes. The directory is synced so that the new
        // file's name survives a power cut too.
        File::create(path)
            .and_then(|f| f.sync_all())
            .and_then(|()| File::open(&dir)?.sync_all())
            .map_err(|source| StoreError::Io {
                action: "create",
                path: path.to_path_buf(),
                source,
            })?;
        let txn = self.db.begin_write().map_err(index)?;
        txn.open_table(PARTIALS)
            .map_err(index)?
            .insert(key, total)
            .map_err(index)?;
        txn.commit().map_err(index)
    }

    fn complete(&self, account: &str, key: &[u8], path: &Path) -> Result<(), StoreError> {
        let mut bytes = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|source| StoreError::Io {
                action: "read",
                path: path.to_path_buf(),
                source,
            })?;
        let len = u32::try_from(bytes.len()).expect("bounded by MAX_OBJECT_LEN");
        let checksum = *blake3::hash(&bytes).as_bytes();
        // One writer at a time: the quota check, the append and the index update
        // happen together, so parallel uploads cannot overshoot the hard quota.
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        // Another connection of the account may have stored the same object whole
        // meanwhile: then this upload is done, and nothing is charged twice.
        if is_stored(&self.db.begin_read().map_err(index)?, key)? {
            let txn = self.db.begin_write().map_err(index)?;
            txn.open_table(PARTIALS)
                .map_err(index)?
                .remove(key)
                .map_err(index)?;
            txn.commit().map_err(index)?;
            drop(writer);
            let _ = fs::remove_file(path);
            return Ok(());
        }
        let info = self.account(account)?;
        check_quota(account, &info, charged(u64::from(len)))?;
        let (segment, offset) = writer.append(&self.backend, &[bytes.as_slice()])?;
        let record = Record {
            segment,
            offset,
            len,
            checksum,
        };
        let txn = self.db.begin_write().map_err(index)?;
        {
            txn.open_table(OBJECTS)
                .map_err(index)?
                .insert(key, encode_record(&record).as_slice())
                .map_err(index)?;
            txn.open_table(PARTIALS)
                .map_err(index)?
                .remove(key)
                .map_err(index)?;
            charge(&txn, account, charged(u64::from(len)), 1, Quota::Checked)?;
        }
        txn.commit().map_err(index)?;
        drop(writer);
        // The object is safe; a partial file left by a failure here is no longer
        // named by the index and is removed the next time the store opens.
        let _ = fs::remove_file(path);
        Ok(())
    }

    /// Drops an upload in progress: its record and its file.
    fn forget_partial(&self, account: &str, id: &ObjectId, key: &[u8]) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(index)?;
        txn.open_table(PARTIALS)
            .map_err(index)?
            .remove(key)
            .map_err(index)?;
        txn.commit().map_err(index)?;
        let _ = fs::remove_file(self.partial_path(account, id));
        Ok(())
    }

    /// The announced totals of the account's uploads in progress.
    fn pending(&self, account: &str) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(index)?;
        let partials = txn.open_table(PARTIALS).map_err(index)?;
        let start = key(account, &ObjectId::from_bytes([0; 32]));
        let end = key(account, &ObjectId::from_bytes([0xff; 32]));
        let mut total = 0;
        for entry in partials
            .range(start.as_slice()..=end.as_slice())
            .map_err(index)?
        {
            total += u64::from(entry.map_err(index)?.1.value());
        }
        Ok(total)
    }

    /// Removes partial files the index no longer names (left by a crash between
    /// the index transaction and the file's removal). Only the server calls it,
    /// when it starts: run by an admin command while the server works, it could
    /// take a file whose record the server is about to commit.
    ///
    /// # Errors
    /// An index failure, or a directory that cannot be listed.
    pub fn remove_stray_partials(&self) -> Result<(), StoreError> {
        let root = self.dir.join("partial");
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io {
                action: "list",
                path,
                source,
            }
        };
        let txn = self.db.begin_read().map_err(index)?;
        let partials = txn.open_table(PARTIALS).map_err(index)?;
        for account in fs::read_dir(&root).map_err(io(&root))? {
            let account = account.map_err(io(&root))?;
            if !account.file_type().map_err(io(&root))?.is_dir() {
                continue; // not ours; left alone
            }
            let Some(name) = account.file_name().to_str().map(str::to_string) else {
                continue;
            };
            for file in fs::read_dir(account.path()).map_err(io(&account.path()))? {
                let file = file.map_err(io(&account.path()))?;
                let id = file
                    .file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".part"))
                    .and_then(ObjectId::from_hex);
                let named = match id {
                    Some(id) => partials
                        .get(key(&name, &id).as_slice())
                        .map_err(index)?
                        .is_some(),
                    None => false,
                };
                if !named {
                    let _ = fs::remove_file(file.path());
                }
            }
        }
        Ok(())
    }

    fn partial_path(&self, account: &str, id: &ObjectId) -> PathBuf {
        self.dir
            .join("partial")
            .join(account)
            .join(format!("{id}.part"))
    }

    fn partial_len(&self, account: &str, id: &ObjectId) -> Result<u32, StoreError> {
        let path = self.partial_path(account, id);
        match fs::metadata(&path) {
            Ok(meta) => Ok(u32::try_from(meta.len()).unwrap_or(u32::MAX)),
            // The record was written but the file lost: nothing is held.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(source) => Err(StoreError::Io {
                action: "inspect",
                path,
                source,
            }),
        }
    }
}

/// What an object of `len` bytes costs against the quota.
fn charged(len: u64) -> u64 {
    len.max(MIN_CHARGE)
}

/// Whether [`charge`] checks the hard quota itself.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Quota {
    /// Refuse what does not fit (nothing was written yet).
    Enforce,
    /// The quota was checked before the bytes were written; charge them.
    Checked,
}

/// Adds stored bytes and objects to an account, reading its record inside the
/// write transaction: an admin command in another process may have changed the
/// quotas since it was read for an earlier quota check.
fn charge(
    txn: &redb::WriteTransaction,
    account: &str,
    bytes: u64,
    objects: u64,
    quota: Quota,
) -> Result<(), StoreError> {
    let mut accounts = txn.open_table(ACCOUNTS).map_err(index)?;
    let mut info = accounts
        .get(account)
        .map_err(index)?
        .map(|v| decode_account(v.value()))
        .ok_or_else(|| StoreError::UnknownAccount(account.to_string()))?;
    if quota == Quota::Enforce {
        check_quota(account, &info, bytes)?;
    }
    info.used += bytes;
    info.objects += objects;
    accounts
        .insert(account, encode_account(&info).as_slice())
        .map_err(index)?;
    Ok(())
}

/// The same refusal again, for a second copy of an object in one batch. Only the
/// refusals `put_whole` gives per object occur here.
fn same_refusal(error: &StoreError) -> StoreError {
    match error {
        StoreError::StoreFull {
            account,
            used,
            limit,
            wanted,
        } => StoreError::StoreFull {
            account: account.clone(),
            used: *used,
            limit: *limit,
            wanted: *wanted,
        },
        StoreError::OffsetMismatch { id, held } => StoreError::OffsetMismatch {
            id: *id,
            held: *held,
        },
        StoreError::TooLarge { id, len, limit } => StoreError::TooLarge {
            id: *id,
            len: *len,
            limit: *limit,
        },
        other => StoreError::Io {
            action: "store",
            path: PathBuf::from("the batch"),
            source: std::io::Error::other(other.to_string()),
        },
    }
}

/// The account's head manifest, in a read transaction.
fn read_head(txn: &redb::ReadTransaction, account: &str) -> Result<Option<ObjectId>, StoreError> {
    let heads = txn.open_table(HEADS).map_err(index)?;
    Ok(heads
        .get(account)
        .map_err(index)?
        .map(|v| decode_head(v.value()).0))
}

/// Whether the index holds an object under `key`, in a read transaction.
fn is_stored(txn: &redb::ReadTransaction, key: &[u8]) -> Result<bool, StoreError> {
    let objects = txn.open_table(OBJECTS).map_err(index)?;
    Ok(objects.get(key).map_err(index)?.is_some())
}

fn check_quota(account: &str, info: &Account, wanted: u64) -> Result<(), StoreError> {
    if info.hard_limit > 0 && info.used + wanted > info.hard_limit {
        return Err(StoreError::StoreFull {
            account: account.to_string(),
            used: info.used,
            limit: info.hard_limit,
            wanted,
        });
    }
    Ok(())
}

fn append_synced(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    // `create`: a partial file lost while its record stayed restarts at offset 0,
    // as `partial_len` reports, instead of failing for ever.
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| {
            f.write_all(data)?;
            f.sync_data()
        })
        .map_err(|source| StoreError::Io {
            action: "append to",
            path: path.to_path_buf(),
            source,
        })
}

/// Account names: 1 to 64 of `[a-z0-9._-]`, not starting with a dot. Lower case
/// only, so that two accounts never share a directory on a file system that
/// ignores case.
///
/// # Errors
/// [`StoreError::InvalidAccount`].
pub fn check_account_name(name: &str) -> Result<(), StoreError> {
    let valid = (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(StoreError::InvalidAccount(name.to_string()))
    }
}

fn key(account: &str, id: &ObjectId) -> Vec<u8> {
    let mut key = Vec::with_capacity(account.len() + 1 + ObjectId::LEN);
    key.extend_from_slice(account.as_bytes());
    key.push(0);
    key.extend_from_slice(id.as_bytes());
    key
}

fn snapshot_key(account: &str, sequence: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(account.len() + 9);
    key.extend_from_slice(account.as_bytes());
    key.push(0);
    key.extend_from_slice(&sequence.to_be_bytes());
    key
}

fn decode_head(bytes: &[u8]) -> (ObjectId, u64) {
    (
        ObjectId::from_bytes(bytes[..32].try_into().expect("32 bytes")),
        u64::from_le_bytes(bytes[32..40].try_into().expect("8 bytes")),
    )
}

fn split_key(key: &[u8]) -> (String, ObjectId) {
    let (account, id) = key.split_at(key.len() - ObjectId::LEN);
    let account = String::from_utf8_lossy(&account[..account.len() - 1]).into_owned();
    (
        account,
        ObjectId::from_bytes(id.try_into().expect("split at ObjectId::LEN")),
    )
}

fn encode_record(record: &Record) -> [u8; RECORD_LEN] {
    let mut out = [0; RECORD_LEN];
    out[..8].copy_from_slice(&record.segment.to_le_bytes());
    out[8..16].copy_from_slice(&record.offset.to_le_bytes());
    out[16..20].copy_from_slice(&record.len.to_le_bytes());
    out[20..].copy_from_slice(&record.checksum);
    out
}

fn decode_record(bytes: &[u8]) -> Record {
    let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    Record {
        segment: u64_at(0),
        offset: u64_at(8),
        len: u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes")),
        checksum: bytes[20..52].try_into().expect("32 bytes"),
    }
}

fn encode_account(account: &Account) -> [u8; ACCOUNT_LEN] {
    let mut out = [0; ACCOUNT_LEN];
    for (i, value) in [
        account.used,
        account.objects,
        account.soft_limit,
        account.hard_limit,
    ]
    .iter()
    .enumerate()
    {
        out[i * 8..i * 8 + 8].copy_from_slice(&value.to_le_bytes());
    }
    out[32] = u8::from(account.disabled);
    out
}

fn decode_account(bytes: &[u8]) -> Account {
    let u64_at =
        |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    Account {
        used: u64_at(0),
        objects: u64_at(1),
        soft_limit: u64_at(2),
        hard_limit: u64_at(3),
        disabled: bytes[32] != 0,
    }
}

#[cfg(test)]
mod tests;

/// What a commit says about its references.
#[derive(Debug, Clone, Copy)]
pub struct Change<'a> {
    /// Whether `added` and `removed` are relative to the parent's references.
    pub delta: bool,
    /// Ids added (delta) or every id (whole list).
    pub added: &'a [ObjectId],
    /// Ids the parent references that the snapshot does not (delta only).
    pub removed: &'a [ObjectId],
}

/// Whether the last span of an encoded span list is open.
fn is_open(spans: &[u8]) -> bool {
    spans.len() >= 16 && spans[spans.len() - 8..] == OPEN.to_le_bytes()
}

/// Whether an encoded span list contains `sequence`.
fn spans_contain(spans: &[u8], sequence: u64) -> bool {
    spans.chunks_exact(16).any(|pair| {
        let first = u64::from_le_bytes(pair[..8].try_into().expect("8 bytes"));
        let end = u64::from_le_bytes(pair[8..].try_into().expect("8 bytes"));
        first <= sequence && sequence < end
    })
}

/// The first and last keys of an account's objects (and spans).
fn account_range(account: &str) -> (Vec<u8>, Vec<u8>) {
    (
        key(account, &ObjectId::from_bytes([0; 32])),
        key(account, &ObjectId::from_bytes([0xff; 32])),
    )
}
