//! The client's local state: one redb database (`state.redb` in the state
//! directory) holding the file index of each backup set, where each object of
//! the spool is (the bytes are in spool files, see [`crate::spool`]), the ids the
//! store is known to hold, the reference set of the snapshot being built, and
//! the newest head seen.
//!
//! One database, so that a file's index entry and the spool locations of its
//! content are committed in one transaction: after a crash, every id the index
//! names is either in the spool or in the store. redb locks the file, so two
//! `homing` processes never work on the same state at once.

use std::path::Path;

use anyhow::Context;
use homing_crypto::ObjectId;
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle,
};

use crate::tree::{Content, FormatError, Reader, put_varint};

/// The database's page cache.
const CACHE_BYTES: usize = 4 << 20;

/// The priority class of each spooled object (0 critical, 1 normal, 2 bulk): an
/// upload takes only the classes the link carries. An object two sets share
/// has the more urgent class of the two.
pub const SPOOL_CLASS: TableDefinition<&[u8; 32], u8> = TableDefinition::new("spool-class");
/// Ids the store confirmed holding: id → ().
pub const KNOWN: TableDefinition<&[u8; 32], ()> = TableDefinition::new("known");
/// The sets this client has committed: name → [`SetHead`] (JSON): the root of its
/// newest committed tree, and which of its two reference tables holds that
/// tree's references. A snapshot carries the roots of every set (its own fresh,
/// the others as last committed), so that retention keeps every set whatever
/// snapshot it keeps.
pub const SETS: TableDefinition<&str, &[u8]> = TableDefinition::new("sets");
/// Small values: `head` (id ‖ sequence, big-endian), and
/// `refs-head`: the snapshot whose references the sets' current reference tables
/// add up to (the last one this client committed).
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// The index table named `name` (from [`index_name`]): key → [`IndexEntry`].
pub fn index_table(name: &str) -> TableDefinition<'_, &'static [u8], &'static [u8]> {
    TableDefinition::new(name)
}

/// The name under which a set's index lives.
pub fn index_name(set: &str) -> String {
    format!("index/{set}")
}

/// Opens (or creates) the state database.
///
/// # Errors
/// If the directory cannot be created or the database is locked by another
/// `homing` process or damaged.
pub fn open(dir: &Path) -> anyhow::Result<Database> {
    // The index names every file backed up: the directory is the owner's alone.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(dir)
        .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
    let path = dir.join("state.redb");
    // A small page cache: memory must stay flat however large the index grows
    // (the spool's bytes are in files of their own).
    let db = Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create(&path)
        .with_context(|| {
            format!(
                "cannot open {} (is another homing command running?)",
                path.display()
            )
        })?;
    let txn = db.begin_write()?;
    txn.open_table(crate::spool::SPOOL_AT)?;
    txn.open_table(crate::spool::SPOOL_FILES)?;
    txn.open_table(KNOWN)?;
    txn.open_table(SETS)?;
    txn.open_table(SPOOL_CLASS)?;
    txn.open_table(META)?;
    txn.commit()?;
    Ok(db)
}

/// Whether `error` says another `homing` process holds the state: worth trying
/// again in a moment, unlike a damaged or unreadable database.
pub fn is_busy(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<redb::DatabaseError>(),
            Some(redb::DatabaseError::DatabaseAlreadyOpen)
        )
    })
}

/// The newest head this client has seen: the manifest id and its sequence.
///
/// # Errors
/// Database errors.
pub fn known_head(db: &Database) -> anyhow::Result<Option<(ObjectId, u64)>> {
    let txn = db.begin_read()?;
    let meta = txn.open_table(META)?;
    let Some(value) = meta.get("head")? else {
        return Ok(None);
    };
    let bytes = value.value();
    anyhow::ensure!(bytes.len() == 40, "the state's head record is damaged");
    let id = ObjectId::from_bytes(bytes[..32].try_into().expect("32 bytes"));
    let sequence = u64::from_be_bytes(bytes[32..].try_into().expect("8 bytes"));
    Ok(Some((id, sequence)))
}

/// Records the newest head seen.
///
/// # Errors
/// Database errors.
pub fn set_known_head(db: &Database, id: &ObjectId, sequence: u64) -> anyhow::Result<()> {
    let mut value = [0_u8; 40];
    value[..32].copy_from_slice(id.as_bytes());
    value[32..].copy_from_slice(&sequence.to_be_bytes());
    let txn = db.begin_write()?;
    txn.open_table(META)?.insert("head", value.as_slice())?;
    txn.commit()?;
    Ok(())
}

/// A table of the committed state, or `None` if no transaction made it yet.
///
/// # Errors
/// Database errors other than the table's absence.
pub fn optional_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    table: TableDefinition<K, V>,
) -> anyhow::Result<Option<redb::ReadOnlyTable<K, V>>> {
    match txn.open_table(table) {
        Ok(table) => Ok(Some(table)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(error) => Err(error.into()),
    }
}

/// Whether `table` (keyed by object id, from [`optional_table`]) holds `id`; a
/// table that is not there, or a failed lookup, holds nothing.
pub fn holds<V: redb::Value + 'static>(
    table: Option<&redb::ReadOnlyTable<&'static [u8; 32], V>>,
    id: &ObjectId,
) -> bool {
    table.is_some_and(|t| t.get(id.as_bytes()).is_ok_and(|v| v.is_some()))
}

/// What the name of every reference table starts with.
const REFS_PREFIX: &str = "refs/";

/// A set's reference table `table` (0 or 1): id → (), the ids its tree needs.
pub fn refs_table_name(set: &str, table: u8) -> String {
    format!("{REFS_PREFIX}{set}/{table}")
}

/// The set whose reference table is named `name`, if it is one.
pub fn set_of_refs_table(name: &str) -> Option<&str> {
    let (set, _) = name.strip_prefix(REFS_PREFIX)?.rsplit_once('/')?;
    Some(set)
}

/// The sets that have reference tables: every set scanned since its data was
/// last forgotten, committed or not.
///
/// # Errors
/// Database errors.
pub fn scanned_sets(db: &Database) -> anyhow::Result<std::collections::BTreeSet<String>> {
    let txn = db.begin_read()?;
    Ok(refs_table_names(txn.list_tables()?)
        .iter()
        .filter_map(|name| set_of_refs_table(name))
        .map(str::to_string)
        .collect())
}

/// The names of the reference tables among `tables`.
fn refs_table_names(tables: impl Iterator<Item = redb::UntypedTableHandle>) -> Vec<String> {
    tables
        .map(|table| table.name().to_string())
        .filter(|name| set_of_refs_table(name).is_some())
        .collect()
}

/// The reference table named `name` (from [`refs_table_name`]).
pub fn refs_table(name: &str) -> TableDefinition<'_, &'static [u8; 32], ()> {
    TableDefinition::new(name)
}

/// What this client last committed of a set.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SetHead {
    /// The root tree (hex).
    pub root: String,
    /// When its scan started (seconds since the epoch).
    pub time: i64,
    /// The paths it backs up.
    pub paths: Vec<String>,
    /// Which reference table (0 or 1) holds what the root needs.
    pub table: u8,
}

/// Every set this client has committed.
///
/// # Errors
/// Database errors and damaged records.
pub fn set_heads(db: &Database) -> anyhow::Result<std::collections::BTreeMap<String, SetHead>> {
    let txn = db.begin_read()?;
    let table = txn.open_table(SETS)?;
    let mut heads = std::collections::BTreeMap::new();
    for item in table.iter()? {
        let (name, value) = item?;
        let head: SetHead = serde_json::from_slice(value.value())
            .with_context(|| format!("the state's record of set `{}` is damaged", name.value()))?;
        heads.insert(name.value().to_string(), head);
    }
    Ok(heads)
}

/// Records what was committed of a set.
///
/// # Errors
/// Database errors.
pub fn set_set_head(txn: &redb::WriteTransaction, set: &str, head: &SetHead) -> anyhow::Result<()> {
    let value = serde_json::to_vec(head)?;
    txn.open_table(SETS)?.insert(set, value.as_slice())?;
    Ok(())
}

/// The snapshot whose references the sets' current tables add up to.
///
/// # Errors
/// Database errors.
pub fn refs_head(db: &Database) -> anyhow::Result<Option<ObjectId>> {
    let txn = db.begin_read()?;
    let meta = txn.open_table(META)?;
    let Some(value) = meta.get("refs-head")? else {
        return Ok(None);
    };
    // Anything but an id (an older layout) means: unknown, send a whole list.
    Ok(<[u8; 32]>::try_from(value.value())
        .ok()
        .map(ObjectId::from_bytes))
}

/// Records (or with `None` forgets) the snapshot the sets' tables describe.
///
/// # Errors
/// Database errors.
pub fn set_refs_head(txn: &redb::WriteTransaction, head: Option<&ObjectId>) -> anyhow::Result<()> {
    let mut meta = txn.open_table(META)?;
    match head {
        Some(id) => {
            meta.insert("refs-head", id.as_bytes().as_slice())?;
        }
        None => {
            meta.remove("refs-head")?;
        }
    }
    Ok(())
}

/// `META` key: how many ids `known` held after it was last pruned (big-endian).
const KNOWN_AFTER_PRUNING: &str = "known-after-pruning";

/// `known` is pruned only once it holds this many ids (a few MB of state).
pub const PRUNE_KNOWN_FROM: u64 = 65_536;

/// Drops from `known` every id that no reference table names (of any set, the
/// committed tree's table and the other one alike), once `known` holds at least
/// `from` ids and twice as many as after its last pruning: each id added pays
/// for a constant share of the walk, and the table stays within about twice what
/// the sets' trees need instead of growing with every version of every file.
/// Returns the ids held before and after, when it pruned.
///
/// An id dropped may still be in the store, kept by an older snapshot. Should
/// its content come back (a file put back as it was), it is sealed into the
/// spool again, and the upload's query finds it stored: it is not sent twice.
/// Call it between runs, not during one.
///
/// # Errors
/// Database errors; nothing is dropped then.
pub fn prune_known(db: &Database, from: u64) -> anyhow::Result<Option<(u64, u64)>> {
    let txn = db.begin_write()?;
    let pruned = {
        let mut meta = txn.open_table(META)?;
        let last = meta
            .get(KNOWN_AFTER_PRUNING)?
            .and_then(|v| <[u8; 8]>::try_from(v.value()).ok())
            .map_or(0, u64::from_be_bytes);
        let mut known = txn.open_table(KNOWN)?;
        let before = known.len()?;
        if before < from.max(last.saturating_mul(2)) {
            None
        } else {
            let names = refs_table_names(txn.list_tables()?);
            let tables = names
                .iter()
                .map(|name| txn.open_table(refs_table(name)))
                .collect::<Result<Vec<_>, _>>()?;
            let mut failed = None;
            known.retain(|id, ()| {
                // After a failure nothing is dropped: keep the rest as it is.
                failed.is_some()
                    || tables.iter().any(|table| match table.get(id) {
                        Ok(found) => found.is_some(),
                        Err(error) => {
                            failed.get_or_insert(error);
                            true
                        }
                    })
            })?;
            if let Some(error) = failed {
                // The transaction is dropped unfinished: nothing is dropped.
                return Err(error.into());
            }
            let after = known.len()?;
            meta.insert(KNOWN_AFTER_PRUNING, after.to_be_bytes().as_slice())?;
            Some((before, after))
        }
    };
    if pruned.is_some() {
        txn.commit()?;
    }
    Ok(pruned)
}

/// Forgets every id the store was known to hold, and when `known` was last
/// pruned, in the caller's transaction.
///
/// # Errors
/// Database errors.
pub fn clear_known(txn: &redb::WriteTransaction) -> anyhow::Result<()> {
    txn.delete_table(KNOWN)?;
    txn.open_table(KNOWN)?;
    txn.open_table(META)?.remove(KNOWN_AFTER_PRUNING)?;
    Ok(())
}

/// Bytes and objects in the spool.
///
/// # Errors
/// Database errors.
pub fn spool_size(db: &Database) -> anyhow::Result<(u64, u64)> {
    let txn = db.begin_read()?;
    let objects = txn.open_table(crate::spool::SPOOL_AT)?.len()?;
    // The live bytes of each spool file add up to the spool's (a few rows).
    let mut bytes = 0;
    for item in txn.open_table(crate::spool::SPOOL_FILES)?.iter()? {
        bytes += item?.1.value();
    }
    Ok((bytes, objects))
}

/// Deletes the file index of every set, so that the next backups read every
/// file again (a spooled object was lost: the files that need it must be
/// sealed anew).
///
/// # Errors
/// Database errors.
pub fn forget_all_indexes(txn: &redb::WriteTransaction) -> anyhow::Result<()> {
    let names: Vec<String> = txn
        .list_tables()?
        .map(|t| t.name().to_string())
        .filter(|name| name.starts_with(&index_name("")))
        .collect();
    for name in names {
        txn.delete_table(index_table(&name))?;
    }
    Ok(())
}

/// What the index remembers of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// Length in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime: i128,
    /// Change time, nanoseconds since the epoch.
    pub ctime: i128,
    /// Inode.
    pub inode: u64,
    /// Device.
    pub device: u64,
    /// Mode (type and permissions).
    pub mode: u32,
    /// The content as the tree references it.
    pub content: Content,
    /// Every chunk id of the content (for lists: the ids inside them), which the
    /// snapshot must keep.
    pub chunks: Vec<ObjectId>,
}

impl IndexEntry {
    /// Whether the file's metadata says it is unchanged.
    pub fn same_file(&self, other: &Self) -> bool {
        self.size == other.size
            && self.mtime == other.mtime
            && self.ctime == other.ctime
            && self.inode == other.inode
            && self.device == other.device
            && self.mode == other.mode
    }

    /// The entry's bytes in the index.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.chunks.len() * 32);
        put_varint(&mut out, self.size);
        out.extend_from_slice(&self.mtime.to_be_bytes());
        out.extend_from_slice(&self.ctime.to_be_bytes());
        put_varint(&mut out, self.inode);
        put_varint(&mut out, self.device);
        put_varint(&mut out, u64::from(self.mode));
        let content = self.content.to_bytes();
        put_varint(&mut out, content.len() as u64);
        out.extend_from_slice(&content);
        let chunks = match &self.content {
            // Inline content is its own chunk list.
            Content::Inline(_) => &[][..],
            Content::Lists(_) => &self.chunks,
        };
        put_varint(&mut out, chunks.len() as u64);
        for id in chunks {
            out.extend_from_slice(id.as_bytes());
        }
        out
    }

    /// Decodes an index entry.
    ///
    /// # Errors
    /// [`FormatError`] for a damaged entry.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let mut reader = Reader::new(bytes, "index entry");
        let size = reader.varint()?;
        let mut time = || -> Result<i128, FormatError> {
            let mut raw = [0_u8; 16];
            for byte in &mut raw {
                *byte = reader.byte()?;
            }
            Ok(i128::from_be_bytes(raw))
        };
        let mtime = time()?;
        let ctime = time()?;
        let inode = reader.varint()?;
        let device = reader.varint()?;
        let mode = reader.varint()? as u32;
        let len = reader.varint()? as usize;
        let mut content_bytes = Vec::with_capacity(len.min(bytes.len()));
        for _ in 0..len {
            content_bytes.push(reader.byte()?);
        }
        let content = Content::from_bytes(&content_bytes)?;
        let count = reader.varint()?;
        let mut chunks = Vec::new();
        for _ in 0..count {
            chunks.push(reader.id()?);
        }
        reader.end()?;
        if let Content::Inline(ids) = &content {
            chunks.clone_from(ids);
        }
        Ok(Self {
            size,
            mtime,
            ctime,
            inode,
            device,
            mode,
            content,
            chunks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_keeps_what_a_reference_table_names_and_is_pruned_when_it_doubles() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path()).unwrap();
        let id = |n: u32| {
            let mut bytes = [0_u8; 32];
            bytes[..4].copy_from_slice(&n.to_be_bytes());
            bytes
        };
        let add_known = |range: std::ops::Range<u32>| {
            let txn = db.begin_write().unwrap();
            {
                let mut known = txn.open_table(KNOWN).unwrap();
                for n in range {
                    known.insert(&id(n), ()).unwrap();
                }
            }
            txn.commit().unwrap();
        };
        let known = || -> Vec<u32> {
            let txn = db.begin_read().unwrap();
            let table = txn.open_table(KNOWN).unwrap();
            table
                .iter()
                .unwrap()
                .map(|item| {
                    let bytes = *item.unwrap().0.value();
                    u32::from_be_bytes(bytes[..4].try_into().unwrap())
                })
                .collect()
        };
        // Set `a`: its committed tree needs 0..10, the tree being built 20..25;
        // set `b` (never committed) 5..15.
        let txn = db.begin_write().unwrap();
        for (name, range) in [
            (refs_table_name("a", 0), 0..10),
            (refs_table_name("a", 1), 20..25),
            (refs_table_name("b", 0), 5..15),
        ] {
            let mut table = txn.open_table(refs_table(&name)).unwrap();
            for n in range {
                table.insert(&id(n), ()).unwrap();
            }
        }
        txn.commit().unwrap();
        add_known(0..40);
        // Below the threshold nothing happens.
        assert_eq!(prune_known(&db, 41).unwrap(), None);
        assert_eq!(known().len(), 40);
        assert_eq!(prune_known(&db, 40).unwrap(), Some((40, 20)));
        let expected: Vec<u32> = (0..15).chain(20..25).collect();
        assert_eq!(known(), expected);
        // The next pruning waits until the table has doubled again.
        add_known(100..119);
        assert_eq!(prune_known(&db, 0).unwrap(), None);
        assert_eq!(known().len(), 39);
        add_known(119..120);
        assert_eq!(prune_known(&db, 0).unwrap(), Some((40, 20)));
        assert_eq!(known(), expected);
        // Forgotten, `known` is pruned again from the threshold alone.
        let txn = db.begin_write().unwrap();
        clear_known(&txn).unwrap();
        txn.commit().unwrap();
        assert!(known().is_empty());
        add_known(100..130);
        assert_eq!(prune_known(&db, 31).unwrap(), None);
        assert_eq!(prune_known(&db, 30).unwrap(), Some((30, 0)));
    }

    #[test]
    fn index_entries_round_trip() {
        let id = |n| ObjectId::from_bytes([n; 32]);
        for content in [
            Content::empty(),
            Content::Inline(vec![id(1), id(2)]),
            Content::Lists(vec![id(3)]),
        ] {
            let chunks = match &content {
                Content::Inline(ids) => ids.clone(),
                Content::Lists(_) => vec![id(4), id(5), id(6)],
            };
            let entry = IndexEntry {
                size: 123_456,
                mtime: -5_000_000_123,
                ctime: 1_790_000_000_000_000_001,
                inode: 77,
                device: 2049,
                mode: 0o100_644,
                content,
                chunks,
            };
            assert_eq!(IndexEntry::decode(&entry.encode()).unwrap(), entry);
            let bytes = entry.encode();
            assert!(IndexEntry::decode(&bytes[..bytes.len() - 1]).is_err());
        }
    }

    #[test]
    fn the_newest_head_persists() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = open(dir.path()).unwrap();
            assert_eq!(known_head(&db).unwrap(), None);
            set_known_head(&db, &ObjectId::from_bytes([9; 32]), 7).unwrap();
        }
        let db = open(dir.path()).unwrap();
        assert_eq!(
            known_head(&db).unwrap(),
            Some((ObjectId::from_bytes([9; 32]), 7))
        );
        assert_eq!(spool_size(&db).unwrap(), (0, 0));
    }
}
