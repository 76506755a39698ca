//! What a snapshot is made of, before sealing: directory trees, chunk-id lists of
//! large files, and the snapshot manifest. The formats are documented in
//! `docs/format.md` ("Trees and manifests").
//!
//! A tree lists one directory: names, kinds, metadata, and for each file the ids of
//! its content. Trees of subdirectories are referenced by id, so an unchanged
//! subtree keeps its id (Merkle-style) and costs nothing. A large file's id list is
//! cut into *list objects* at content-defined points (after an id whose first byte
//! is a multiple of [`LIST_CUT_MODULUS`]), so a one-chunk change re-sends one list
//! piece and the short list of pieces, never the whole list.
//!
//! Everything here is plaintext that only ever leaves the machine sealed.

use std::collections::BTreeMap;

use homing_crypto::ObjectId;
use serde::{Deserialize, Serialize};

/// First bytes of a tree's plaintext.
pub const TREE_MAGIC: &[u8; 4] = b"HTR1";
/// First bytes of a list object's plaintext.
pub const LIST_MAGIC: &[u8; 4] = b"HIL1";

/// A file whose content has at most this many chunks keeps its ids in the tree.
pub const INLINE_IDS: usize = 64;
/// A list piece ends after an id whose first byte is a multiple of this (about 64
/// ids, 2 KiB, on average) ...
pub const LIST_CUT_MODULUS: u8 = 64;
/// ... or at this many ids.
pub const LIST_MAX_IDS: usize = 1024;

/// A plaintext that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed {what}: {message}")]
pub struct FormatError {
    /// Tree, list or manifest.
    pub what: &'static str,
    /// What is wrong.
    pub message: String,
}

fn malformed(what: &'static str, message: impl Into<String>) -> FormatError {
    FormatError {
        what,
        message: message.into(),
    }
}

/// How a file's content is referenced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// The chunk ids, in order.
    Inline(Vec<ObjectId>),
    /// The ids of list objects whose concatenated ids are the chunk ids.
    Lists(Vec<ObjectId>),
}

impl Content {
    /// No content (an empty file).
    pub fn empty() -> Self {
        Self::Inline(Vec::new())
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let (form, ids) = match self {
            Self::Inline(ids) => (0, ids),
            Self::Lists(ids) => (1, ids),
        };
        out.push(form);
        put_varint(out, ids.len() as u64);
        for id in ids {
            out.extend_from_slice(id.as_bytes());
        }
    }

    fn decode(reader: &mut Reader<'_>) -> Result<Self, FormatError> {
        let form = reader.byte()?;
        let count = reader.count(32)?;
        let mut ids = Vec::with_capacity(count);
        for _ in 0..count {
            ids.push(reader.id()?);
        }
        match form {
            0 => Ok(Self::Inline(ids)),
            1 => Ok(Self::Lists(ids)),
            other => Err(malformed(reader.what, format!("content form {other}"))),
        }
    }

    /// Encodes the content alone (the index stores it this way).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Decodes what [`Content::to_bytes`] wrote.
    ///
    /// # Errors
    /// [`FormatError`] for bytes that do not decode.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FormatError> {
        let mut reader = Reader::new(bytes, "content");
        let content = Self::decode(&mut reader)?;
        reader.end()?;
        Ok(content)
    }

    /// The ids a snapshot must keep for this content (chunks or lists).
    pub fn ids(&self) -> &[ObjectId] {
        match self {
            Self::Inline(ids) | Self::Lists(ids) => ids,
        }
    }
}

/// Cuts a file's chunk ids into list pieces (see the module documentation).
pub fn split_ids(ids: &[ObjectId]) -> Vec<&[ObjectId]> {
    let mut pieces = Vec::new();
    let mut start = 0;
    for (at, id) in ids.iter().enumerate() {
        let len = at + 1 - start;
        if id.as_bytes()[0] % LIST_CUT_MODULUS == 0 || len == LIST_MAX_IDS {
            pieces.push(&ids[start..=at]);
            start = at + 1;
        }
    }
    if start < ids.len() {
        pieces.push(&ids[start..]);
    }
    pieces
}

/// The plaintext of a list object.
pub fn encode_list(ids: &[ObjectId]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + ids.len() * 32);
    out.extend_from_slice(LIST_MAGIC);
    put_varint(&mut out, ids.len() as u64);
    for id in ids {
        out.extend_from_slice(id.as_bytes());
    }
    out
}

/// Decodes a list object's plaintext.
///
/// # Errors
/// [`FormatError`] for bytes that do not decode.
pub fn decode_list(bytes: &[u8]) -> Result<Vec<ObjectId>, FormatError> {
    let mut reader = Reader::new(bytes, "list");
    reader.magic(LIST_MAGIC)?;
    let count = reader.count(32)?;
    let mut ids = Vec::with_capacity(count);
    for _ in 0..count {
        ids.push(reader.id()?);
    }
    reader.end()?;
    Ok(ids)
}

/// What a directory entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A subdirectory and the id of its tree.
    Dir(ObjectId),
    /// A regular file.
    File {
        /// Its length in bytes.
        size: u64,
        /// Hard links: (device, inode) of a file with more than one link, so that
        /// restore links the names again; `None` for a single link.
        link: Option<(u64, u64)>,
        /// Its content.
        content: Content,
    },
    /// A symbolic link and its target (raw bytes).
    Symlink(Vec<u8>),
    /// A named pipe.
    Fifo,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The name (raw bytes: any name the OS allows, not only UTF-8).
    pub name: Vec<u8>,
    /// Permission bits (including set-uid, set-gid, sticky).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time: seconds since the epoch.
    pub mtime: i64,
    /// Modification time: nanoseconds.
    pub mtime_nanos: u32,
    /// What it is.
    pub kind: Kind,
}

impl Entry {
    /// The ids this entry makes a snapshot keep (subtree, content or lists).
    pub fn ids(&self) -> &[ObjectId] {
        match &self.kind {
            Kind::Dir(id) => std::slice::from_ref(id),
            Kind::File { content, .. } => content.ids(),
            Kind::Symlink(_) | Kind::Fifo => &[],
        }
    }
}

/// Encodes a directory's entries (sorted by name by the caller).
pub fn encode_tree(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + entries.len() * 80);
    out.extend_from_slice(TREE_MAGIC);
    put_varint(&mut out, entries.len() as u64);
    for entry in entries {
        put_bytes(&mut out, &entry.name);
        let tag = match entry.kind {
            Kind::Dir(_) => 0,
            Kind::File { .. } => 1,
            Kind::Symlink(_) => 2,
            Kind::Fifo => 3,
        };
        out.push(tag);
        put_varint(&mut out, u64::from(entry.mode));
        put_varint(&mut out, u64::from(entry.uid));
        put_varint(&mut out, u64::from(entry.gid));
        put_varint(&mut out, zigzag(entry.mtime));
        put_varint(&mut out, u64::from(entry.mtime_nanos));
        match &entry.kind {
            Kind::Dir(id) => out.extend_from_slice(id.as_bytes()),
            Kind::File {
                size,
                link,
                content,
            } => {
                put_varint(&mut out, *size);
                match link {
                    None => out.push(0),
                    Some((device, inode)) => {
                        out.push(1);
                        put_varint(&mut out, *device);
                        put_varint(&mut out, *inode);
                    }
                }
                content.encode(&mut out);
            }
            Kind::Symlink(target) => put_bytes(&mut out, target),
            Kind::Fifo => {}
        }
    }
    out
}

/// Decodes a tree's plaintext.
///
/// # Errors
/// [`FormatError`] for bytes that do not decode, names that are empty, contain `/`
/// or NUL, are `.` or `..`, or are not in strictly ascending order.
pub fn decode_tree(bytes: &[u8]) -> Result<Vec<Entry>, FormatError> {
    let mut reader = Reader::new(bytes, "tree");
    reader.magic(TREE_MAGIC)?;
    let count = reader.count(8)?;
    let mut entries: Vec<Entry> = Vec::with_capacity(count);
    for _ in 0..count {
        let name = reader.bytes()?.to_vec();
        if name.is_empty()
            || name == b"."
            || name == b".."
            || name.contains(&b'/')
            || name.contains(&0)
        {
            return Err(malformed("tree", "an entry name that is not a plain name"));
        }
        if entries.last().is_some_and(|last| last.name >= name) {
            return Err(malformed("tree", "entries out of order"));
        }
        let tag = reader.byte()?;
        let mode = reader.u32()?;
        let uid = reader.u32()?;
        let gid = reader.u32()?;
        let mtime = unzigzag(reader.varint()?);
        let mtime_nanos = reader.u32()?;
        if mtime_nanos >= 1_000_000_000 {
            return Err(malformed("tree", "nanoseconds out of range"));
        }
        let kind = match tag {
            0 => Kind::Dir(reader.id()?),
            1 => {
                let size = reader.varint()?;
                let link = match reader.byte()? {
                    0 => None,
                    1 => Some((reader.varint()?, reader.varint()?)),
                    _ => return Err(malformed("tree", "bad link flag")),
                };
                let content = Content::decode(&mut reader)?;
                Kind::File {
                    size,
                    link,
                    content,
                }
            }
            2 => Kind::Symlink(reader.bytes()?.to_vec()),
            3 => Kind::Fifo,
            other => return Err(malformed("tree", format!("entry kind {other}"))),
        };
        entries.push(Entry {
            name,
            mode,
            uid,
            gid,
            mtime,
            mtime_nanos,
            kind,
        });
    }
    reader.end()?;
    Ok(entries)
}

/// A snapshot manifest (sealed as a snapshot object; JSON inside).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version (1).
    pub version: u32,
    /// The backup set's name.
    pub set: String,
    /// The host that made it.
    pub host: String,
    /// When the scan started, seconds since the epoch.
    pub time: i64,
    /// The paths backed up (absolute).
    pub paths: Vec<String>,
    /// The tree of `/`, holding the paths backed up and the directories leading to
    /// them.
    #[serde(with = "hex_id")]
    pub root: ObjectId,
    /// One more than the previous snapshot's (this client's chain), 1 for the first.
    pub sequence: u64,
    /// The previous snapshot (the head this one follows).
    #[serde(with = "hex_opt_id")]
    pub previous: Option<ObjectId>,
    /// Figures of the run that made it.
    pub summary: ManifestSummary,
    /// The other sets of this client as last committed: with them a snapshot is
    /// the whole picture, and whichever snapshots retention keeps, every set's
    /// state at their times is kept with them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub others: BTreeMap<String, OtherSet>,
}

/// Another set's newest committed tree, as a manifest carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtherSet {
    /// Its root tree.
    #[serde(with = "hex_id")]
    pub root: ObjectId,
    /// When its scan started, seconds since the epoch.
    pub time: i64,
    /// The paths it backs up.
    pub paths: Vec<String>,
}

impl Manifest {
    /// The root of `set` in this snapshot (its own set when `None`).
    ///
    /// # Errors
    /// A set the snapshot does not hold, naming those it does.
    pub fn root_of(&self, set: Option<&str>) -> Result<ObjectId, String> {
        match set {
            None => Ok(self.root),
            Some(name) if name == self.set => Ok(self.root),
            Some(name) => self.others.get(name).map(|o| o.root).ok_or_else(|| {
                let mut names: Vec<&str> = vec![self.set.as_str()];
                names.extend(self.others.keys().map(String::as_str));
                format!(
                    "this snapshot has no set `{name}`; it has: {}",
                    names.join(", ")
                )
            }),
        }
    }

    /// Every (set, root) of this snapshot, its own first.
    pub fn roots(&self) -> Vec<(&str, ObjectId)> {
        std::iter::once((self.set.as_str(), self.root))
            .chain(self.others.iter().map(|(n, o)| (n.as_str(), o.root)))
            .collect()
    }
}

/// Figures a manifest records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestSummary {
    /// Files in the snapshot.
    pub files: u64,
    /// Directories in the snapshot.
    pub dirs: u64,
    /// Bytes of file contents in the snapshot.
    pub bytes: u64,
}

impl Manifest {
    /// The manifest's plaintext.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a manifest serialises")
    }

    /// Decodes a manifest's plaintext.
    ///
    /// # Errors
    /// [`FormatError`] for bytes that do not decode or an unknown version.
    pub fn decode(bytes: &[u8]) -> Result<Self, FormatError> {
        let manifest: Self =
            serde_json::from_slice(bytes).map_err(|e| malformed("manifest", e.to_string()))?;
        if manifest.version != 1 {
            return Err(malformed(
                "manifest",
                format!("version {} (this build reads 1)", manifest.version),
            ));
        }
        Ok(manifest)
    }
}

mod hex_id {
    use homing_crypto::ObjectId;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(id: &ObjectId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&id.to_string())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectId, D::Error> {
        let text = String::deserialize(d)?;
        ObjectId::from_hex(&text).ok_or_else(|| serde::de::Error::custom("not an object id"))
    }
}

mod hex_opt_id {
    use homing_crypto::ObjectId;
    use serde::{Deserialize, Deserializer, Serializer};

    #[expect(clippy::ref_option, reason = "serde's `with` hands a reference")]
    pub(super) fn serialize<S: Serializer>(id: &Option<ObjectId>, s: S) -> Result<S::Ok, S::Error> {
        match id {
            Some(id) => s.serialize_some(&id.to_string()),
            None => s.serialize_none(),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<ObjectId>, D::Error> {
        let text = Option::<String>::deserialize(d)?;
        text.map(|text| {
            ObjectId::from_hex(&text).ok_or_else(|| serde::de::Error::custom("not an object id"))
        })
        .transpose()
    }
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

/// A cursor over plaintext bytes that never trusts a length it reads.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Self { bytes, what }
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], FormatError> {
        if self.bytes.len() < len {
            return Err(malformed(self.what, "truncated"));
        }
        let (head, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(head)
    }

    fn magic(&mut self, magic: &[u8; 4]) -> Result<(), FormatError> {
        if self.take(4)? != magic {
            return Err(malformed(self.what, "wrong magic"));
        }
        Ok(())
    }

    pub(crate) fn byte(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn varint(&mut self) -> Result<u64, FormatError> {
        let mut value = 0_u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(malformed(self.what, "integer overflow"));
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                // One encoding per value: a trailing zero byte would make two
                // trees of the same content differ (and their ids).
                if byte == 0 && shift > 0 {
                    return Err(malformed(
                        self.what,
                        "an integer in more bytes than it needs",
                    ));
                }
                return Ok(value);
            }
        }
        Err(malformed(self.what, "integer too long"))
    }

    fn u32(&mut self) -> Result<u32, FormatError> {
        u32::try_from(self.varint()?).map_err(|_| malformed(self.what, "value out of range"))
    }

    /// A count of items of at least `min_len` bytes each, checked against the bytes
    /// left so that no allocation follows a claimed length.
    fn count(&mut self, min_len: usize) -> Result<usize, FormatError> {
        let count = self.varint()?;
        if count > (self.bytes.len() / min_len) as u64 {
            return Err(malformed(self.what, "a count larger than the bytes left"));
        }
        Ok(count as usize)
    }

    fn bytes(&mut self) -> Result<&'a [u8], FormatError> {
        let len = self.count(1)?;
        self.take(len)
    }

    pub(crate) fn id(&mut self) -> Result<ObjectId, FormatError> {
        let bytes: [u8; 32] = self.take(32)?.try_into().expect("32 bytes");
        Ok(ObjectId::from_bytes(bytes))
    }

    pub(crate) fn end(&self) -> Result<(), FormatError> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(malformed(self.what, "trailing bytes"))
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn id(n: u8) -> ObjectId {
        ObjectId::from_bytes([n; 32])
    }

    fn entry_strategy() -> impl Strategy<Value = Entry> {
        let name = proptest::collection::vec(1_u8..=255, 1..20).prop_filter("plain names", |n| {
            !n.contains(&b'/') && n != b"." && n != b".."
        });
        let ids = proptest::collection::vec(any::<[u8; 32]>(), 0..5)
            .prop_map(|v| v.into_iter().map(ObjectId::from_bytes).collect::<Vec<_>>());
        let kind = prop_oneof![
            any::<[u8; 32]>().prop_map(|b| Kind::Dir(ObjectId::from_bytes(b))),
            (
                any::<u64>(),
                any::<Option<(u64, u64)>>(),
                ids,
                any::<bool>()
            )
                .prop_map(|(size, link, ids, lists)| Kind::File {
                    size,
                    link,
                    content: if lists {
                        Content::Lists(ids)
                    } else {
                        Content::Inline(ids)
                    },
                }),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Kind::Symlink),
            Just(Kind::Fifo),
        ];
        (
            name,
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<i64>(),
            0_u32..1_000_000_000,
            kind,
        )
            .prop_map(|(name, mode, uid, gid, mtime, mtime_nanos, kind)| Entry {
                name,
                mode,
                uid,
                gid,
                mtime,
                mtime_nanos,
                kind,
            })
    }

    proptest! {
        #[test]
        fn trees_round_trip(mut entries in proptest::collection::vec(entry_strategy(), 0..12)) {
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            entries.dedup_by(|a, b| a.name == b.name);
            let bytes = encode_tree(&entries);
            prop_assert_eq!(decode_tree(&bytes).unwrap(), entries);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_tree(&bytes);
            let _ = decode_list(&bytes);
            let _ = Content::from_bytes(&bytes);
            let _ = Manifest::decode(&bytes);
        }

        #[test]
        fn truncated_trees_are_refused(
            mut entries in proptest::collection::vec(entry_strategy(), 1..6),
            cut in any::<prop::sample::Index>(),
        ) {
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            entries.dedup_by(|a, b| a.name == b.name);
            let bytes = encode_tree(&entries);
            let cut = cut.index(bytes.len());
            prop_assert!(decode_tree(&bytes[..cut]).is_err());
        }

        #[test]
        fn split_lists_concatenate_to_the_ids(raw in proptest::collection::vec(any::<[u8; 32]>(), 0..3000)) {
            let ids: Vec<ObjectId> = raw.into_iter().map(ObjectId::from_bytes).collect();
            let pieces = split_ids(&ids);
            prop_assert!(pieces.iter().all(|p| !p.is_empty() && p.len() <= LIST_MAX_IDS));
            let joined: Vec<ObjectId> = pieces.concat();
            prop_assert_eq!(joined, ids.clone());
            for piece in pieces {
                prop_assert_eq!(decode_list(&encode_list(piece)).unwrap(), piece.to_vec());
            }
        }
    }

    #[test]
    fn a_changed_id_changes_one_or_two_list_pieces() {
        let ids: Vec<ObjectId> = (0..6400_u32)
            .map(|n| ObjectId::from_bytes(*blake3::hash(&n.to_le_bytes()).as_bytes()))
            .collect();
        let before: Vec<Vec<ObjectId>> = split_ids(&ids).into_iter().map(<[_]>::to_vec).collect();
        let mut changed = ids.clone();
        changed[3200] = id(7);
        let after: Vec<Vec<ObjectId>> =
            split_ids(&changed).into_iter().map(<[_]>::to_vec).collect();
        let new = after.iter().filter(|p| !before.contains(p)).count();
        assert!(new <= 2, "{new} pieces changed");
        assert!(
            before.len() > 50 && before.len() < 200,
            "{} pieces",
            before.len()
        );
    }

    #[test]
    fn bad_names_and_order_are_refused() {
        let file = |name: &[u8]| Entry {
            name: name.to_vec(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nanos: 0,
            kind: Kind::Fifo,
        };
        for bad in [&b".."[..], b".", b"a/b", b"", b"a\0b"] {
            assert!(decode_tree(&encode_tree(&[file(bad)])).is_err(), "{bad:?}");
        }
        assert!(decode_tree(&encode_tree(&[file(b"b"), file(b"a")])).is_err());
        assert!(decode_tree(&encode_tree(&[file(b"a"), file(b"a")])).is_err());
        assert!(decode_tree(&encode_tree(&[file(b"a"), file(b"b")])).is_ok());
    }

    #[test]
    fn manifests_round_trip_and_refuse_other_versions() {
        let manifest = Manifest {
            version: 1,
            set: "home".into(),
            host: "laptop".into(),
            time: 1_790_000_000,
            paths: vec!["/home/me".into()],
            root: id(1),
            sequence: 3,
            previous: Some(id(2)),
            summary: ManifestSummary::default(),
            others: BTreeMap::from([(
                "docs".to_string(),
                OtherSet {
                    root: id(4),
                    time: 1_789_000_000,
                    paths: vec!["/home/me/docs".into()],
                },
            )]),
        };
        assert_eq!(manifest.root_of(Some("docs")), Ok(id(4)));
        assert_eq!(manifest.root_of(None), Ok(id(1)));
        assert!(manifest.root_of(Some("music")).is_err());
        assert_eq!(Manifest::decode(&manifest.encode()).unwrap(), manifest);
        let other = Manifest {
            version: 2,
            ..manifest
        };
        assert!(Manifest::decode(&other.encode()).is_err());
    }
}
