//! The spool: sealed objects waiting for upload.
//!
//! Sealed bytes are appended to spool files (`spool/` in the state directory,
//! each up to [`FILE_BYTES`]) and found through the state database's `spool-at`
//! table: id → file, offset, length and a CRC-32 of the bytes. The location
//! commits in the same transaction as the index entries that need the object.
//! The database never carries the bytes themselves: a B-tree of 32 KiB values is
//! written and read several times over (copy-on-write pages, a small page cache),
//! while a file is written once and read once.
//!
//! Order: a file's bytes are synced before any transaction that names them
//! commits ([`Spool::sync`]), so every location the database holds is on disk. A
//! crash leaves at most unnamed bytes after the last named object; every run
//! appends to a new file, and files that no location names are deleted when the
//! spool is opened. Files whose objects all went to the store are deleted as the
//! store confirms them; a file with less than a quarter of its bytes still
//! waiting is copied into a fresh one when the spool is opened.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use homing_crypto::ObjectId;
use redb::{
    Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle, WriteTransaction,
};

use crate::state;

/// Where each spooled object is: id → [`Location`] (its 24-byte encoding).
pub const SPOOL_AT: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("spool-at");
/// The bytes of each spool file that spooled objects still use: file → bytes.
pub const SPOOL_FILES: TableDefinition<u64, u64> = TableDefinition::new("spool-files");
/// The table of spool versions before 0.2, which held the sealed bytes
/// themselves; its objects move to files when the spool is opened.
const OLD_SPOOL: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("spool");

/// A spool file is closed at this size and the next object starts a new one, so
/// that files empty out and are deleted while uploads go on.
pub const FILE_BYTES: u64 = 64 << 20;

/// Where a spooled object's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// The spool file's number.
    pub file: u64,
    /// Offset of the first byte in it.
    pub offset: u64,
    /// Length.
    pub len: u32,
    /// CRC-32 of the bytes: damage on the laptop's disk is found before the
    /// bytes go to the store, where nobody could read them back.
    pub crc: u32,
}

impl Location {
    /// The table's encoding: four big-endian integers.
    pub fn encode(&self) -> [u8; 24] {
        let mut out = [0_u8; 24];
        out[..8].copy_from_slice(&self.file.to_be_bytes());
        out[8..16].copy_from_slice(&self.offset.to_be_bytes());
        out[16..20].copy_from_slice(&self.len.to_be_bytes());
        out[20..].copy_from_slice(&self.crc.to_be_bytes());
        out
    }

    /// Decodes [`Location::encode`]; `None` for any other length.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; 24] = bytes.try_into().ok()?;
        let u64_at = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8"));
        let u32_at = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4"));
        Some(Self {
            file: u64_at(0),
            offset: u64_at(8),
            len: u32_at(16),
            crc: u32_at(20),
        })
    }
}

/// The spool could not be written or synced (a full or failing disk): the set's
/// backup stops on it, keeping what was committed before.
#[derive(Debug, thiserror::Error)]
#[error("cannot {what} {path}")]
pub struct WriteFailed {
    what: &'static str,
    path: String,
    #[source]
    source: std::io::Error,
}

impl WriteFailed {
    fn new(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self {
            what,
            path: path.display().to_string(),
            source,
        }
    }
}

/// A spooled object whose bytes are not what was spooled (or are gone).
#[derive(Debug, thiserror::Error)]
#[error("spooled object {id} is damaged in spool file {file}: {why}")]
pub struct Damaged {
    /// The object.
    pub id: ObjectId,
    /// The path of the file it was in.
    pub file: String,
    /// That file's number.
    pub spool_file: u64,
    /// The whole file is gone (every object in it is lost).
    pub gone: bool,
    /// What is wrong.
    pub why: String,
}

/// The file being appended to.
#[derive(Debug)]
struct Writer {
    number: u64,
    file: File,
    len: u64,
    synced: bool,
}

/// The spool files of one state directory. One per process at a time (the state
/// database's lock sees to that).
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    writer: Option<Writer>,
    /// The next file number.
    next: u64,
    readers: HashMap<u64, File>,
}

impl Spool {
    /// Opens the spool of the state directory `state_dir` (whose database is
    /// `db`): deletes files nothing names, moves objects of an old-format spool
    /// into files, and compacts files mostly uploaded.
    ///
    /// # Errors
    /// Directory, file and database errors.
    pub fn open(db: &Database, state_dir: &Path) -> anyhow::Result<Self> {
        let dir = state_dir.join("spool");
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(&dir)
            .with_context(|| format!("cannot create the spool directory {}", dir.display()))?;
        let files: HashMap<u64, u64> = {
            let txn = db.begin_read()?;
            let table = txn.open_table(SPOOL_FILES)?;
            table
                .iter()?
                .map(|item| item.map(|(k, v)| (k.value(), v.value())))
                .collect::<Result<_, _>>()?
        };
        let mut next = files.keys().max().map_or(1, |n| n + 1);
        let mut sizes = HashMap::new();
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?
        {
            let entry = entry?;
            let Some(number) = entry
                .file_name()
                .to_str()
                .and_then(|name| u64::from_str_radix(name, 16).ok())
            else {
                continue;
            };
            next = next.max(number + 1);
            match files.get(&number) {
                Some(&live) if live > 0 => {
                    sizes.insert(number, entry.metadata()?.len());
                }
                // Named by nothing (a crash before its first commit) or emptied.
                _ => remove(&entry.path())?,
            }
        }
        let mut spool = Self {
            dir,
            writer: None,
            next,
            readers: HashMap::new(),
        };
        // Rows of emptied files are dropped. A file that still held objects and
        // is gone (deleted by hand, a disk that lost it) takes its objects with
        // it: they leave the spool at once, and every index is forgotten so
        // that the files that need them are read and sealed again.
        let missing: Vec<u64> = files
            .iter()
            .filter(|&(n, &live)| live > 0 && !sizes.contains_key(n))
            .map(|(n, _)| *n)
            .collect();
        if files.values().any(|&live| live == 0) || !missing.is_empty() {
            let txn = db.begin_write()?;
            let lost = objects_in(&txn, &missing)?;
            spool.lose(&txn, &lost)?;
            {
                let mut table = txn.open_table(SPOOL_FILES)?;
                for (number, live) in &files {
                    if *live == 0 || missing.contains(number) {
                        table.remove(number)?;
                    }
                }
            }
            if !lost.is_empty() {
                tracing::warn!(
                    objects = lost.len(),
                    files = ?missing.iter().map(|n| spool.path(*n)).collect::<Vec<_>>(),
                    "spool files are missing: their objects are sealed again from the files"
                );
            }
            txn.commit()?;
        }
        spool.migrate(db)?;
        let sparse: Vec<u64> = sizes
            .iter()
            .filter(|&(number, &size)| files.get(number).is_some_and(|&live| live * 4 < size))
            .map(|(number, _)| *number)
            .collect();
        if !sparse.is_empty() {
            spool.compact(db, &sparse)?;
        }
        Ok(spool)
    }

    fn path(&self, number: u64) -> PathBuf {
        self.dir.join(format!("{number:016x}"))
    }

    /// Drops the writer after a write to its file or a sync of it failed: part of
    /// an object may be in the file past what any location says, and what it held
    /// unsynced may be lost whatever a later sync says, so the next object goes to
    /// a new file.
    fn writer_failed(&mut self, what: &'static str, error: std::io::Error) -> anyhow::Error {
        let number = self.writer.take().expect("the writer that failed").number;
        WriteFailed::new(what, &self.path(number), error).into()
    }

    /// Appends an object's bytes and records where they are, in `txn`, with
    /// its priority `class`. The caller checks that the object is not spooled
    /// yet.
    ///
    /// # Errors
    /// File and database errors.
    pub fn append(
        &mut self,
        txn: &WriteTransaction,
        id: &ObjectId,
        bytes: &[u8],
        class: u8,
    ) -> anyhow::Result<()> {
        self.place(txn, id, bytes)?;
        txn.open_table(state::SPOOL_CLASS)?
            .insert(id.as_bytes(), class)?;
        Ok(())
    }

    /// Writes `bytes` at the end of the current file and points `id` at them
    /// in `txn` (its class, if any, is left as it is).
    fn place(&mut self, txn: &WriteTransaction, id: &ObjectId, bytes: &[u8]) -> anyhow::Result<()> {
        let location = self.write(bytes)?;
        txn.open_table(SPOOL_AT)?
            .insert(id.as_bytes(), location.encode().as_slice())?;
        let mut files = txn.open_table(SPOOL_FILES)?;
        let live = files.get(location.file)?.map_or(0, |v| v.value());
        files.insert(location.file, live + u64::from(location.len))?;
        Ok(())
    }

    /// Writes `bytes` at the end of the current file (a new one when it is
    /// full) and says where.
    fn write(&mut self, bytes: &[u8]) -> anyhow::Result<Location> {
        let len = u32::try_from(bytes.len()).context("an object larger than 4 GiB")?;
        if self
            .writer
            .as_ref()
            .is_some_and(|w| w.len > 0 && w.len + u64::from(len) > FILE_BYTES)
        {
            // The closed file's bytes are synced now: the next transaction may
            // commit with only the new file's synced.
            self.sync()?;
            self.writer = None;
        }
        if self.writer.is_none() {
            let number = self.next;
            self.next += 1;
            let path = self.path(number);
            let file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&path)
                .map_err(|e| WriteFailed::new("create the spool file", &path, e))?;
            // The file's name is durable before any transaction names it.
            File::open(&self.dir)
                .and_then(|dir| dir.sync_all())
                .map_err(|e| WriteFailed::new("sync the directory", &self.dir, e))?;
            self.writer = Some(Writer {
                number,
                file,
                len: 0,
                synced: true,
            });
        }
        let writer = self.writer.as_mut().expect("just opened");
        let location = Location {
            file: writer.number,
            offset: writer.len,
            len,
            crc: crc32fast::hash(bytes),
        };
        if let Err(error) = writer.file.write_all(bytes) {
            return Err(self.writer_failed("write to the spool file", error));
        }
        writer.len += u64::from(len);
        writer.synced = false;
        Ok(location)
    }

    /// Makes what was appended durable; call before committing a transaction
    /// that names it.
    ///
    /// # Errors
    /// The file cannot be synced.
    pub fn sync(&mut self) -> anyhow::Result<()> {
        if let Some(writer) = self.writer.as_mut()
            && !writer.synced
        {
            if let Err(error) = writer.file.sync_data() {
                return Err(self.writer_failed("sync the spool file", error));
            }
            writer.synced = true;
        }
        Ok(())
    }

    /// The bytes of a spooled object at `location`, checked against its CRC.
    /// Reads through the file's own offset: a spool serves one thread.
    ///
    /// # Errors
    /// [`Damaged`] (as an IO error) when the bytes are short or do not match.
    pub fn read(&mut self, id: &ObjectId, location: &Location) -> std::io::Result<Vec<u8>> {
        let path = self.path(location.file);
        let damaged = |gone: bool, why: String| {
            std::io::Error::other(Damaged {
                id: *id,
                file: path.display().to_string(),
                spool_file: location.file,
                gone,
                why,
            })
        };
        // Few files are open at once: uploads read them in order.
        if !self.readers.contains_key(&location.file) && self.readers.len() >= 8 {
            self.readers.clear();
        }
        // A file that is gone is damage; any other failure (permissions, too
        // many open files, an IO error) is an error of its own, which drops
        // nothing.
        let failed = |what: &str, e: std::io::Error| {
            std::io::Error::new(e.kind(), format!("cannot {what} {}: {e}", path.display()))
        };
        let file = match self.readers.entry(location.file) {
            std::collections::hash_map::Entry::Occupied(file) => file.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => {
                let file = File::open(&path).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        damaged(true, "the file is gone".into())
                    } else {
                        failed("open", e)
                    }
                })?;
                slot.insert(file)
            }
        };
        // Read into spare capacity (read_to_end does not zero it first).
        let mut bytes = Vec::with_capacity(location.len as usize);
        file.seek(SeekFrom::Start(location.offset))
            .and_then(|_| Read::take(&mut *file, u64::from(location.len)).read_to_end(&mut bytes))
            .map_err(|e| failed("read", e))?;
        if bytes.len() != location.len as usize {
            return Err(damaged(
                false,
                format!(
                    "cannot read: {} of {} bytes are there",
                    bytes.len(),
                    location.len
                ),
            ));
        }
        if crc32fast::hash(&bytes) != location.crc {
            return Err(damaged(false, "its checksum does not match".into()));
        }
        Ok(bytes)
    }

    /// Takes `ids` out of the spool in `txn`; returns the bytes freed and the
    /// files that no longer hold anything (delete them with
    /// [`Spool::delete_emptied`] once `txn` committed).
    ///
    /// # Errors
    /// Database errors.
    pub fn release(
        &mut self,
        txn: &WriteTransaction,
        ids: &[ObjectId],
    ) -> anyhow::Result<(u64, Vec<u64>)> {
        let mut freed = 0;
        let mut emptied = Vec::new();
        let mut at = txn.open_table(SPOOL_AT)?;
        let mut classes = txn.open_table(state::SPOOL_CLASS)?;
        let mut files = txn.open_table(SPOOL_FILES)?;
        for id in ids {
            let Some(location) = at
                .remove(id.as_bytes())?
                .and_then(|v| Location::decode(v.value()))
            else {
                continue;
            };
            classes.remove(id.as_bytes())?;
            freed += u64::from(location.len);
            let live = files.get(location.file)?.map_or(0, |v| v.value());
            let left = live.saturating_sub(u64::from(location.len));
            if left == 0
                && self
                    .writer
                    .as_ref()
                    .is_none_or(|w| w.number != location.file)
            {
                files.remove(location.file)?;
                emptied.push(location.file);
            } else {
                files.insert(location.file, left)?;
            }
        }
        Ok((freed, emptied))
    }

    /// Takes objects that were lost (damaged, or their file is gone) out of the
    /// spool in `txn`, and forgets every set's file index, so that the files
    /// that need them are read and sealed again. Returns as [`Spool::release`].
    ///
    /// # Errors
    /// Database errors.
    pub fn lose(
        &mut self,
        txn: &WriteTransaction,
        lost: &[ObjectId],
    ) -> anyhow::Result<(u64, Vec<u64>)> {
        if lost.is_empty() {
            return Ok((0, Vec::new()));
        }
        let released = self.release(txn, lost)?;
        state::forget_all_indexes(txn)?;
        Ok(released)
    }

    /// Deletes spool files [`Spool::release`] emptied.
    ///
    /// # Errors
    /// A file that cannot be deleted.
    pub fn delete_emptied(&mut self, files: &[u64]) -> anyhow::Result<()> {
        for number in files {
            self.readers.remove(number);
            remove(&self.path(*number))?;
        }
        Ok(())
    }

    /// Moves the objects of the old spool table into files.
    fn migrate(&mut self, db: &Database) -> anyhow::Result<()> {
        let exists = db
            .begin_read()?
            .list_tables()?
            .any(|table| table.name() == OLD_SPOOL.name());
        if !exists {
            return Ok(());
        }
        let txn = db.begin_write()?;
        {
            // Each object keeps its class (or its lack of one) in `spool-class`.
            let old = txn.open_table(OLD_SPOOL)?;
            for item in old.iter()? {
                let (id, bytes) = item?;
                self.place(&txn, &ObjectId::from_bytes(*id.value()), bytes.value())?;
            }
        }
        txn.delete_table(OLD_SPOOL)?;
        self.sync()?;
        txn.commit()?;
        Ok(())
    }

    /// Copies the objects still waiting in `sparse` files into the current file
    /// and deletes those files.
    fn compact(&mut self, db: &Database, sparse: &[u64]) -> anyhow::Result<()> {
        let txn = db.begin_write()?;
        let mut moving = Vec::new();
        {
            let at = txn.open_table(SPOOL_AT)?;
            for item in at.iter()? {
                let (id, value) = item?;
                if let Some(location) = Location::decode(value.value())
                    && sparse.contains(&location.file)
                {
                    moving.push((ObjectId::from_bytes(*id.value()), location));
                }
            }
        }
        let mut lost = Vec::new();
        for (id, location) in &moving {
            match self.read(id, location) {
                // The object moves; its class stays as it is.
                Ok(bytes) => self.place(&txn, id, &bytes)?,
                // A damaged object is dropped here as an upload would drop it;
                // the next backup finds it missing and reads its files again.
                Err(error) if error.get_ref().is_some_and(|e| e.is::<Damaged>()) => {
                    tracing::warn!("{error}");
                    lost.push(*id);
                }
                Err(error) => return Err(error.into()),
            }
        }
        self.release(&txn, &lost)?;
        {
            let mut files = txn.open_table(SPOOL_FILES)?;
            for number in sparse {
                files.remove(number)?;
            }
        }
        if !lost.is_empty() {
            // Nothing may believe the store has them, and the index must not
            // skip the files that need them.
            state::forget_all_indexes(&txn)?;
        }
        self.sync()?;
        txn.commit()?;
        self.delete_emptied(sparse)?;
        tracing::info!(
            files = sparse.len(),
            objects = moving.len(),
            "compacted the spool"
        );
        Ok(())
    }
}

/// The spooled objects that no set's reference table names (neither the
/// references of its last commit nor those of its last scan): after a set is
/// forgotten, what only it needed. Another set's next scan seals again what it
/// finds it needs.
///
/// # Errors
/// Database errors.
pub fn referenced_by_no_set(txn: &WriteTransaction) -> anyhow::Result<Vec<ObjectId>> {
    let names: Vec<String> = txn
        .list_tables()?
        .map(|t| t.name().to_string())
        .filter(|name| state::set_of_refs_table(name).is_some())
        .collect();
    let mut tables = Vec::with_capacity(names.len());
    for name in &names {
        tables.push(txn.open_table(state::refs_table(name))?);
    }
    let mut unneeded = Vec::new();
    for item in txn.open_table(SPOOL_AT)?.iter()? {
        let (id, _) = item?;
        let id = id.value();
        let mut needed = false;
        for table in &tables {
            if table.get(id)?.is_some() {
                needed = true;
                break;
            }
        }
        if !needed {
            unneeded.push(ObjectId::from_bytes(*id));
        }
    }
    Ok(unneeded)
}

/// The ids whose bytes are in any of `numbers`' files, in `txn`.
///
/// # Errors
/// Database errors.
pub fn objects_in(txn: &WriteTransaction, numbers: &[u64]) -> anyhow::Result<Vec<ObjectId>> {
    let mut ids = Vec::new();
    if numbers.is_empty() {
        return Ok(ids);
    }
    for item in txn.open_table(SPOOL_AT)?.iter()? {
        let (id, value) = item?;
        if Location::decode(value.value()).is_some_and(|l| numbers.contains(&l.file)) {
            ids.push(ObjectId::from_bytes(*id.value()));
        }
    }
    Ok(ids)
}

fn remove(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error).with_context(|| format!("cannot delete {}", path.display())),
    }
}

/// Whether the spool holds `id`, in `txn`.
///
/// # Errors
/// Database errors.
pub fn contains(txn: &WriteTransaction, id: &ObjectId) -> anyhow::Result<bool> {
    Ok(txn.open_table(SPOOL_AT)?.get(id.as_bytes())?.is_some())
}

/// Where `id` is in the spool, if it is there.
///
/// # Errors
/// Database errors.
pub fn locate(
    table: &impl ReadableTable<&'static [u8; 32], &'static [u8]>,
    id: &ObjectId,
) -> anyhow::Result<Option<Location>> {
    Ok(table
        .get(id.as_bytes())?
        .and_then(|v| Location::decode(v.value())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ObjectId {
        ObjectId::from_bytes([n; 32])
    }

    fn bytes(n: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(7) ^ n).collect()
    }

    fn spooled(db: &Database, spool: &mut Spool, objects: &[(u8, usize)]) {
        let txn = db.begin_write().unwrap();
        for &(n, len) in objects {
            spool.append(&txn, &id(n), &bytes(n, len), 1).unwrap();
        }
        spool.sync().unwrap();
        txn.commit().unwrap();
    }

    fn read_back(db: &Database, spool: &mut Spool, n: u8) -> std::io::Result<Vec<u8>> {
        let txn = db.begin_read().unwrap();
        let table = txn.open_table(SPOOL_AT).unwrap();
        let location = locate(&table, &id(n)).unwrap().expect("spooled");
        spool.read(&id(n), &location)
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir.join("spool"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn release(db: &Database, spool: &mut Spool, ns: &[u8]) -> u64 {
        let ids: Vec<ObjectId> = ns.iter().map(|n| id(*n)).collect();
        let txn = db.begin_write().unwrap();
        let (freed, emptied) = spool.release(&txn, &ids).unwrap();
        txn.commit().unwrap();
        spool.delete_emptied(&emptied).unwrap();
        freed
    }

    #[test]
    fn objects_read_back_and_files_go_when_their_objects_leave() {
        let dir = tempfile::tempdir().unwrap();
        let db = state::open(dir.path()).unwrap();
        let mut spool = Spool::open(&db, dir.path()).unwrap();
        // Two files: the second object does not fit beside the first.
        let big = FILE_BYTES as usize - 100;
        spooled(&db, &mut spool, &[(1, big), (2, 1000), (3, 2000)]);
        assert_eq!(files(dir.path()).len(), 2);
        for (n, len) in [(1, big), (2, 1000), (3, 2000)] {
            assert_eq!(read_back(&db, &mut spool, n).unwrap(), bytes(n, len));
        }
        assert_eq!(state::spool_size(&db).unwrap(), ((big + 3000) as u64, 3));
        // The first file empties and goes; the current one stays while written.
        assert_eq!(release(&db, &mut spool, &[1]), big as u64);
        assert_eq!(files(dir.path()).len(), 1);
        assert_eq!(release(&db, &mut spool, &[2, 3, 9]), 3000);
        assert_eq!(files(dir.path()).len(), 1);
        assert_eq!(state::spool_size(&db).unwrap(), (0, 0));
        // Reopened, the empty file goes too.
        drop(spool);
        let _spool = Spool::open(&db, dir.path()).unwrap();
        assert!(files(dir.path()).is_empty());
    }

    #[test]
    fn bytes_no_transaction_named_are_deleted_on_opening() {
        let dir = tempfile::tempdir().unwrap();
        let db = state::open(dir.path()).unwrap();
        let mut spool = Spool::open(&db, dir.path()).unwrap();
        spooled(&db, &mut spool, &[(1, 5000)]);
        // A crash: appended, never committed.
        let txn = db.begin_write().unwrap();
        spool.append(&txn, &id(2), &bytes(2, 7000), 1).unwrap();
        drop(txn);
        drop(spool);
        std::fs::write(
            dir.path().join("spool/00000000000000ff"),
            b"left by a crash",
        )
        .unwrap();
        let mut spool = Spool::open(&db, dir.path()).unwrap();
        // The named object is whole; the orphan file is gone; the unnamed tail
        // stays dead weight in its file until the file empties.
        assert_eq!(read_back(&db, &mut spool, 1).unwrap(), bytes(1, 5000));
        assert_eq!(files(dir.path()), vec!["0000000000000001".to_string()]);
        assert_eq!(state::spool_size(&db).unwrap(), (5000, 1));
        // New objects go to a new file, never after a tail a crash left.
        spooled(&db, &mut spool, &[(3, 100)]);
        assert_eq!(files(dir.path()).len(), 2);
        assert_eq!(read_back(&db, &mut spool, 3).unwrap(), bytes(3, 100));
    }

    #[test]
    fn a_damaged_object_is_named_and_not_handed_out() {
        let dir = tempfile::tempdir().unwrap();
        let db = state::open(dir.path()).unwrap();
        let mut spool = Spool::open(&db, dir.path()).unwrap();
        spooled(&db, &mut spool, &[(1, 3000), (2, 3000)]);
        let path = dir.path().join("spool/0000000000000001");
        let mut raw = std::fs::read(&path).unwrap();
        raw[3100] ^= 1;
        std::fs::write(&path, &raw).unwrap();
        assert_eq!(read_back(&db, &mut spool, 1).unwrap(), bytes(1, 3000));
        let error = read_back(&db, &mut spool, 2).unwrap_err();
        let damaged = error.get_ref().unwrap().downcast_ref::<Damaged>().unwrap();
        assert_eq!(damaged.id, id(2));
        assert!(error.to_string().contains("checksum"), "{error}");
        // A cut file is damage too.
        std::fs::write(&path, &raw[..4000]).unwrap();
        let error = read_back(&db, &mut spool, 2).unwrap_err();
        assert!(error.to_string().contains("cannot read"), "{error}");
    }

    #[test]
    fn a_mostly_uploaded_file_is_compacted_on_opening() {
        let dir = tempfile::tempdir().unwrap();
        let db = state::open(dir.path()).unwrap();
        let mut spool = Spool::open(&db, dir.path()).unwrap();
        let objects: Vec<(u8, usize)> = (1..=10).map(|n| (n, 10_000)).collect();
        spooled(&db, &mut spool, &objects);
        release(&db, &mut spool, &[1, 2, 3, 4, 5, 6, 7, 8]);
        drop(spool);
        assert_eq!(files(dir.path()), vec!["0000000000000001".to_string()]);
        let mut spool = Spool::open(&db, dir.path()).unwrap();
        // The two objects left moved to a new file; the old one is gone.
        assert_eq!(files(dir.path()), vec!["0000000000000002".to_string()]);
        assert_eq!(
            std::fs::metadata(dir.path().join("spool/0000000000000002"))
                .unwrap()
                .len(),
            20_000
        );
        for n in [9, 10] {
            assert_eq!(read_back(&db, &mut spool, n).unwrap(), bytes(n, 10_000));
        }
        assert_eq!(state::spool_size(&db).unwrap(), (20_000, 2));
        // Moved objects keep their class.
        let txn = db.begin_read().unwrap();
        let class = txn.open_table(state::SPOOL_CLASS).unwrap();
        assert_eq!(class.get(id(9).as_bytes()).unwrap().unwrap().value(), 1);
    }

    #[test]
    fn a_spool_file_that_is_gone_takes_its_objects_and_the_indexes_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = state::open(dir.path()).unwrap();
        let mut spool = Spool::open(&db, dir.path()).unwrap();
        spooled(&db, &mut spool, &[(1, 3000), (2, 4000)]);
        drop(spool);
        let txn = db.begin_write().unwrap();
        txn.open_table(state::index_table(&state::index_name("home")))
            .unwrap()
            .insert(b"a".as_slice(), b"entry".as_slice())
            .unwrap();
        txn.commit().unwrap();
        let mut spool = Spool::open(&db, dir.path()).unwrap();
        spooled(&db, &mut spool, &[(3, 500)]);
        drop(spool);
        std::fs::remove_file(dir.path().join("spool/0000000000000001")).unwrap();
        let mut spool = Spool::open(&db, dir.path()).unwrap();
        // Only the object of the file that is there is left, counted right.
        assert_eq!(state::spool_size(&db).unwrap(), (500, 1));
        assert_eq!(read_back(&db, &mut spool, 3).unwrap(), bytes(3, 500));
        let txn = db.begin_read().unwrap();
        assert!(
            txn.open_table(SPOOL_AT)
                .unwrap()
                .get(id(1).as_bytes())
                .unwrap()
                .is_none()
        );
        assert!(
            txn.open_table(state::SPOOL_CLASS)
                .unwrap()
                .get(id(2).as_bytes())
                .unwrap()
                .is_none()
        );
        // The files that needed them are read again.
        assert!(!txn.list_tables().unwrap().any(|t| t.name() == "index/home"));
    }

    #[test]
    fn a_spool_of_the_old_format_moves_into_files() {
        let dir = tempfile::tempdir().unwrap();
        let db = state::open(dir.path()).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut old = txn.open_table(OLD_SPOOL).unwrap();
            old.insert(id(1).as_bytes(), bytes(1, 3000).as_slice())
                .unwrap();
            old.insert(id(2).as_bytes(), bytes(2, 4000).as_slice())
                .unwrap();
            txn.open_table(state::SPOOL_CLASS)
                .unwrap()
                .insert(id(2).as_bytes(), 0)
                .unwrap();
        }
        txn.commit().unwrap();
        let mut spool = Spool::open(&db, dir.path()).unwrap();
        assert_eq!(read_back(&db, &mut spool, 1).unwrap(), bytes(1, 3000));
        assert_eq!(read_back(&db, &mut spool, 2).unwrap(), bytes(2, 4000));
        assert_eq!(state::spool_size(&db).unwrap(), (7000, 2));
        let txn = db.begin_read().unwrap();
        let class = txn.open_table(state::SPOOL_CLASS).unwrap();
        assert_eq!(class.get(id(2).as_bytes()).unwrap().unwrap().value(), 0);
        // An object without a class keeps none: it goes with any link.
        assert!(class.get(id(1).as_bytes()).unwrap().is_none());
        assert!(!txn.list_tables().unwrap().any(|t| t.name() == "spool"));
    }

    #[test]
    fn locations_round_trip() {
        let location = Location {
            file: 7,
            offset: u64::MAX - 3,
            len: 123_456,
            crc: 0xdead_beef,
        };
        assert_eq!(Location::decode(&location.encode()), Some(location));
        assert_eq!(Location::decode(&[0; 23]), None);
    }
}
