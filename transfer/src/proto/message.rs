//! The messages of protocol version 1, and their payload encodings.
//!
//! Encodings are canonical: a message decodes from exactly one byte string (varints
//! in their shortest form, no trailing bytes), so decoding then encoding any frame
//! that decodes gives back the same bytes. `docs/protocol.md` has the tables.

use homing_crypto::ObjectId;

use super::ProtocolError;
use super::frame::{Frame, begin_frame, end_frame};
use super::wire::{Reader, put_varint, varint_len};

/// The protocol versions this build speaks.
pub const PROTOCOL_VERSION: u16 = 2;

/// The largest piece of an object one `Put` or `Object` frame carries. A client on
/// a thin link sends smaller pieces: a cut link loses at most the piece in flight.
pub const MAX_PIECE: usize = 256 * 1024;

/// The most ids one `Query`, `CommitIds` or `MissingReferences` carries (16 000 ×
/// 32 bytes = 500 KiB, which leaves room in a frame for the rest).
pub const MAX_IDS_PER_FRAME: usize = 16_000;

/// The largest sealed snapshot manifest a `Commit` carries.
pub const MAX_MANIFEST: usize = 256 * 1024;

/// The most entries one `Snapshots` reply carries (at most 52 bytes each); a longer
/// list comes in pages (`List { from }`, `more`).
pub const MAX_SNAPSHOTS_PER_FRAME: usize = 8_000;

/// Message type bytes. Client messages have the high bit clear, server messages set.
mod kind {
    pub(super) const HELLO: u8 = 0x01;
    pub(super) const QUERY: u8 = 0x02;
    pub(super) const PUT: u8 = 0x03;
    pub(super) const COMMIT_IDS: u8 = 0x04;
    pub(super) const COMMIT: u8 = 0x05;
    pub(super) const LIST: u8 = 0x06;
    pub(super) const GET: u8 = 0x07;
    pub(super) const USAGE: u8 = 0x08;
    pub(super) const BYE: u8 = 0x09;
    pub(super) const COMMIT_REMOVED: u8 = 0x0a;

    pub(super) const WELCOME: u8 = 0x81;
    pub(super) const PRESENT: u8 = 0x82;
    pub(super) const STORED: u8 = 0x83;
    pub(super) const REFUSED: u8 = 0x84;
    pub(super) const COMMITTED: u8 = 0x85;
    pub(super) const SNAPSHOTS: u8 = 0x86;
    pub(super) const OBJECT: u8 = 0x87;
    pub(super) const USAGE_REPORT: u8 = 0x88;
    pub(super) const ERROR: u8 = 0xff;
}

/// What a client sends.
///
/// Requests (`Hello`, `Query`, `Commit`, `List`, `Get`, `Usage`) get exactly one
/// reply each, in the order of the requests, so they can be pipelined without ids;
/// an `Error` replaces the reply of a request that failed. Uploads are answered per
/// object, by id, outside that order: `Stored` when the piece that completes an
/// object has made it durable, `Refused` when any piece of it fails. `CommitIds`,
/// `CommitRemoved` and `Bye` get no reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage<'a> {
    /// First frame of a connection: the versions the client speaks. Reply: `Welcome`.
    Hello {
        /// Oldest version spoken.
        min_version: u16,
        /// Newest version spoken.
        max_version: u16,
    },
    /// Which of these objects does the store hold? Reply: `Present`.
    Query {
        /// At most [`MAX_IDS_PER_FRAME`] ids.
        ids: Vec<ObjectId>,
    },
    /// A piece of an object. Answered by `Stored` once the object is complete, or
    /// by `Refused` if the piece fails.
    Put {
        /// The object.
        id: ObjectId,
        /// Its whole sealed length.
        total: u32,
        /// Where this piece starts: where the store's copy ends.
        offset: u32,
        /// At most [`MAX_PIECE`] bytes.
        data: &'a [u8],
    },
    /// Ids the next `Commit` references: all of them, or for a delta commit
    /// those the parent does not reference. In as many frames as needed. No reply.
    CommitIds {
        /// At most [`MAX_IDS_PER_FRAME`] ids.
        ids: Vec<ObjectId>,
    },
    /// Ids the parent references and the next (delta) `Commit` no longer does. In
    /// as many frames as needed. No reply.
    CommitRemoved {
        /// At most [`MAX_IDS_PER_FRAME`] ids.
        ids: Vec<ObjectId>,
    },
    /// Commit a snapshot whose manifest is `manifest`, on top of `parent`, referencing
    /// the ids sent since the last commit. Reply: `Committed` or an error.
    Commit {
        /// The manifest's object id.
        manifest_id: ObjectId,
        /// The head the client saw, which this snapshot follows (none for the first).
        parent: Option<ObjectId>,
        /// Whether the ids sent are a delta against the parent's (`CommitIds`
        /// added, `CommitRemoved` removed) rather than the whole list; a thin link
        /// sends a few ids per snapshot instead of every id of the backup.
        delta: bool,
        /// The sealed manifest, at most [`MAX_MANIFEST`] bytes.
        manifest: &'a [u8],
    },
    /// List the snapshots with a sequence number of at least `from`, and the head.
    /// Reply: `Snapshots`.
    List {
        /// The first sequence number wanted (0 or 1 for all).
        from: u64,
    },
    /// Read part of an object. Reply: `Object`.
    Get {
        /// The object.
        id: ObjectId,
        /// First byte wanted.
        offset: u32,
        /// Bytes wanted, at most [`MAX_PIECE`].
        len: u32,
    },
    /// Usage and quota. Reply: `UsageReport`.
    Usage,
    /// The client is done; the server closes the connection.
    Bye,
}

/// Whether the store holds an object, as `Present` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectState {
    /// Stored whole.
    Stored,
    /// Not stored at all.
    Missing,
    /// The first bytes are stored (a cut upload): resume at this offset.
    /// `Partial(0)` travels as `Missing`, its meaning.
    Partial(u32),
}

/// One snapshot, as `Snapshots` lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// The manifest's object id.
    pub id: ObjectId,
    /// The store's commit counter for the account, 1 for the first snapshot.
    pub sequence: u64,
    /// When the store committed it, in seconds since the Unix epoch.
    pub committed_at: u64,
}

/// What a server sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMessage<'a> {
    /// Reply to `Hello`: the version chosen and the largest frame payload the server
    /// accepts from the client (the client never sends more; it accepts up to
    /// [`MAX_FRAME_PAYLOAD`](super::MAX_FRAME_PAYLOAD) itself).
    Welcome {
        /// The version both speak.
        version: u16,
        /// The server's frame payload limit.
        max_frame: u32,
    },
    /// Reply to `Query`, one state per id asked, in order.
    Present {
        /// The states.
        states: Vec<ObjectState>,
    },
    /// An object is stored whole and durably (answers its uploading pieces).
    Stored {
        /// The object.
        id: ObjectId,
    },
    /// A piece of an upload failed (answers its uploading pieces). The store holds
    /// what `Query` now reports: a piece refused before it was taken leaves the
    /// bytes held before it (`OffsetMismatch` says how many); a failed completion
    /// keeps the whole upload held, and an empty piece at `total` completes it.
    Refused {
        /// The object.
        id: ObjectId,
        /// Why.
        error: WireError,
    },
    /// Reply to `Commit`: the new head.
    Committed {
        /// The new head (the manifest's id).
        head: ObjectId,
        /// Its sequence number.
        sequence: u64,
    },
    /// Reply to `List`.
    Snapshots {
        /// The current head, if any snapshot exists.
        head: Option<ObjectId>,
        /// Kept snapshots from the sequence asked for, oldest first, at most
        /// [`MAX_SNAPSHOTS_PER_FRAME`].
        entries: Vec<SnapshotEntry>,
        /// Whether more follow: ask again from the last sequence + 1.
        more: bool,
    },
    /// Reply to `Get`.
    Object {
        /// The object.
        id: ObjectId,
        /// Its whole sealed length.
        total: u32,
        /// Where this piece starts.
        offset: u32,
        /// The bytes.
        data: &'a [u8],
    },
    /// Reply to `Usage`; limits of 0 mean none.
    UsageReport {
        /// Bytes stored for the account.
        used: u64,
        /// Objects stored.
        objects: u64,
        /// Snapshots kept.
        snapshots: u64,
        /// Soft quota in bytes.
        soft_limit: u64,
        /// Hard quota in bytes.
        hard_limit: u64,
    },
    /// A request failed; the reply in its place.
    Error(WireError),
}

/// Errors the server reports, typed so that the client can tell the user what
/// happened and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The account's hard quota would be exceeded.
    #[error("the store is full for this account: {used} of {limit} bytes used")]
    StoreFull {
        /// Bytes stored.
        used: u64,
        /// The hard quota.
        limit: u64,
    },
    /// The certificate does not allow this (revoked, disabled account, ...).
    #[error("not authorised")]
    NotAuthorised,
    /// No such object in this account.
    #[error("object {id} is not in the store")]
    ObjectMissing {
        /// The object.
        id: ObjectId,
    },
    /// No common protocol version.
    #[error("no common protocol version: the store speaks {min} to {max}")]
    VersionMismatch {
        /// Oldest version the server speaks.
        min: u16,
        /// Newest version the server speaks.
        max: u16,
    },
    /// A `Put` piece does not continue the store's copy; resume at `held`.
    #[error("object {id}: the store holds {held} bytes; resume there")]
    OffsetMismatch {
        /// The object.
        id: ObjectId,
        /// Bytes the store holds.
        held: u32,
    },
    /// A commit references objects the store does not hold.
    #[error("the commit references {} objects the store does not hold", ids.len())]
    MissingReferences {
        /// Some of the missing ids (at most a frame's worth).
        ids: Vec<ObjectId>,
    },
    /// A commit's parent is not the current head.
    #[error("the commit does not follow the store's head")]
    StaleParent {
        /// The store's head.
        head: Option<ObjectId>,
    },
    /// The request broke the protocol.
    #[error("protocol violation: {message}")]
    Malformed {
        /// What was wrong.
        message: String,
    },
    /// The server failed (disk error, ...); the request may succeed later.
    #[error("the store failed: {message}")]
    Internal {
        /// What failed.
        message: String,
    },
}

mod code {
    pub(super) const STORE_FULL: u64 = 1;
    pub(super) const NOT_AUTHORISED: u64 = 2;
    pub(super) const OBJECT_MISSING: u64 = 3;
    pub(super) const VERSION_MISMATCH: u64 = 4;
    pub(super) const OFFSET_MISMATCH: u64 = 5;
    pub(super) const MISSING_REFERENCES: u64 = 6;
    pub(super) const STALE_PARENT: u64 = 7;
    pub(super) const MALFORMED: u64 = 8;
    pub(super) const INTERNAL: u64 = 9;
}

/// Longest text an error message may carry on the wire.
const MAX_MESSAGE: usize = 1024;

impl<'a> ClientMessage<'a> {
    /// Appends the frame of a `Put` of `len` data bytes up to where its data
    /// begins: this header followed by the data is the frame [`encode`](Self::encode)
    /// makes of the same `Put`. A sender hands the data to its connection from where
    /// it lies instead of copying it into the frame first.
    ///
    /// # Panics
    /// If `len` exceeds [`MAX_PIECE`] (a bug in the caller).
    pub fn encode_put_header(
        id: &ObjectId,
        total: u32,
        offset: u32,
        len: usize,
        out: &mut Vec<u8>,
    ) {
        assert!(len <= MAX_PIECE, "a piece exceeds MAX_PIECE");
        let payload =
            ObjectId::LEN + varint_len(u64::from(total)) + varint_len(u64::from(offset)) + len;
        out.push(kind::PUT);
        put_varint(out, payload as u64);
        out.extend_from_slice(id.as_bytes());
        put_varint(out, u64::from(total));
        put_varint(out, u64::from(offset));
    }

    /// Appends this message as one frame to `out`.
    ///
    /// # Panics
    /// If a list or piece exceeds its documented limit, or a delta `Commit` has no
    /// parent (a bug in the caller).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let kind = match self {
            Self::Hello { .. } => kind::HELLO,
            Self::Query { .. } => kind::QUERY,
            Self::Put { .. } => kind::PUT,
            Self::CommitIds { .. } => kind::COMMIT_IDS,
            Self::CommitRemoved { .. } => kind::COMMIT_REMOVED,
            Self::Commit { .. } => kind::COMMIT,
            Self::List { .. } => kind::LIST,
            Self::Get { .. } => kind::GET,
            Self::Usage => kind::USAGE,
            Self::Bye => kind::BYE,
        };
        let at = begin_frame(out, kind);
        match self {
            Self::Hello {
                min_version,
                max_version,
            } => {
                assert!(min_version <= max_version, "an empty version range");
                put_varint(out, u64::from(*min_version));
                put_varint(out, u64::from(*max_version));
            }
            Self::Query { ids } | Self::CommitIds { ids } | Self::CommitRemoved { ids } => {
                put_ids(out, ids);
            }
            Self::Put {
                id,
                total,
                offset,
                data,
            } => {
                assert!(data.len() <= MAX_PIECE, "a piece exceeds MAX_PIECE");
                out.extend_from_slice(id.as_bytes());
                put_varint(out, u64::from(*total));
                put_varint(out, u64::from(*offset));
                out.extend_from_slice(data);
            }
            Self::Commit {
                manifest_id,
                parent,
                delta,
                manifest,
            } => {
                assert!(
                    manifest.len() <= MAX_MANIFEST,
                    "a manifest exceeds MAX_MANIFEST"
                );
                assert!(!*delta || parent.is_some(), "a delta Commit needs a parent");
                out.extend_from_slice(manifest_id.as_bytes());
                put_optional_id(out, parent.as_ref());
                out.push(u8::from(*delta));
                out.extend_from_slice(manifest);
            }
            Self::List { from } => put_varint(out, *from),
            Self::Usage | Self::Bye => {}
            Self::Get { id, offset, len } => {
                assert!(
                    *len as usize <= MAX_PIECE,
                    "a Get asks for more than MAX_PIECE"
                );
                out.extend_from_slice(id.as_bytes());
                put_varint(out, u64::from(*offset));
                put_varint(out, u64::from(*len));
            }
        }
        end_frame(out, at);
    }

    /// Decodes a client message from a frame.
    ///
    /// # Errors
    /// An unknown type (including a server type), or a malformed payload.
    pub fn decode(frame: Frame<'a>) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(frame.payload);
        let message = match frame.kind {
            kind::HELLO => {
                let (min_version, max_version) = (r.u16()?, r.u16()?);
                if min_version > max_version {
                    return Err(ProtocolError::Malformed("Hello's version range is empty"));
                }
                Self::Hello {
                    min_version,
                    max_version,
                }
            }
            kind::QUERY => Self::Query {
                ids: get_ids(&mut r)?,
            },
            kind::PUT => {
                let id = r.id()?;
                let total = r.u32()?;
                let offset = r.u32()?;
                let data = r.rest();
                check_piece(total, offset, data.len())?;
                Self::Put {
                    id,
                    total,
                    offset,
                    data,
                }
            }
            kind::COMMIT_IDS => Self::CommitIds {
                ids: get_ids(&mut r)?,
            },
            kind::COMMIT_REMOVED => Self::CommitRemoved {
                ids: get_ids(&mut r)?,
            },
            kind::COMMIT => {
                let manifest_id = r.id()?;
                let parent = get_optional_id(&mut r)?;
                let delta = match r.byte()? {
                    0 => false,
                    1 => true,
                    _ => {
                        return Err(ProtocolError::Malformed(
                            "Commit's delta flag is not 0 or 1",
                        ));
                    }
                };
                if delta && parent.is_none() {
                    return Err(ProtocolError::Malformed("a delta Commit without a parent"));
                }
                let manifest = r.rest();
                if manifest.len() > MAX_MANIFEST {
                    return Err(ProtocolError::Malformed("a manifest exceeds MAX_MANIFEST"));
                }
                Self::Commit {
                    manifest_id,
                    parent,
                    delta,
                    manifest,
                }
            }
            kind::LIST => Self::List { from: r.varint()? },
            kind::GET => {
                let id = r.id()?;
                let offset = r.u32()?;
                let len = r.u32()?;
                if len as usize > MAX_PIECE {
                    return Err(ProtocolError::Malformed("Get asks for more than MAX_PIECE"));
                }
                Self::Get { id, offset, len }
            }
            kind::USAGE => Self::Usage,
            kind::BYE => Self::Bye,
            other => return Err(ProtocolError::UnknownType(other)),
        };
        r.finish()?;
        Ok(message)
    }
}

impl<'a> ServerMessage<'a> {
    /// Appends this message as one frame to `out`.
    ///
    /// # Panics
    /// If a list or piece exceeds its documented limit (a bug in the caller).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let kind = match self {
            Self::Welcome { .. } => kind::WELCOME,
            Self::Present { .. } => kind::PRESENT,
            Self::Stored { .. } => kind::STORED,
            Self::Refused { .. } => kind::REFUSED,
            Self::Committed { .. } => kind::COMMITTED,
            Self::Snapshots { .. } => kind::SNAPSHOTS,
            Self::Object { .. } => kind::OBJECT,
            Self::UsageReport { .. } => kind::USAGE_REPORT,
            Self::Error(_) => kind::ERROR,
        };
        let at = begin_frame(out, kind);
        match self {
            Self::Welcome { version, max_frame } => {
                put_varint(out, u64::from(*version));
                put_varint(out, u64::from(*max_frame));
            }
            Self::Present { states } => put_states(out, states),
            Self::Stored { id } => out.extend_from_slice(id.as_bytes()),
            Self::Refused { id, error } => {
                out.extend_from_slice(id.as_bytes());
                put_error(out, error);
            }
            Self::Committed { head, sequence } => {
                out.extend_from_slice(head.as_bytes());
                put_varint(out, *sequence);
            }
            Self::Snapshots {
                head,
                entries,
                more,
            } => {
                assert!(
                    entries.len() <= MAX_SNAPSHOTS_PER_FRAME,
                    "too many snapshots for one frame"
                );
                assert!(!(*more && entries.is_empty()), "an empty page with more");
                put_optional_id(out, head.as_ref());
                out.push(u8::from(*more));
                put_varint(out, entries.len() as u64);
                for entry in entries {
                    out.extend_from_slice(entry.id.as_bytes());
                    put_varint(out, entry.sequence);
                    put_varint(out, entry.committed_at);
                }
            }
            Self::Object {
                id,
                total,
                offset,
                data,
            } => {
                assert!(data.len() <= MAX_PIECE, "a piece exceeds MAX_PIECE");
                out.extend_from_slice(id.as_bytes());
                put_varint(out, u64::from(*total));
                put_varint(out, u64::from(*offset));
                out.extend_from_slice(data);
            }
            Self::UsageReport {
                used,
                objects,
                snapshots,
                soft_limit,
                hard_limit,
            } => {
                for value in [used, objects, snapshots, soft_limit, hard_limit] {
                    put_varint(out, *value);
                }
            }
            Self::Error(error) => put_error(out, error),
        }
        end_frame(out, at);
    }

    /// Decodes a server message from a frame.
    ///
    /// # Errors
    /// An unknown type (including a client type), or a malformed payload.
    pub fn decode(frame: Frame<'a>) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(frame.payload);
        let message = match frame.kind {
            kind::WELCOME => Self::Welcome {
                version: r.u16()?,
                max_frame: r.u32()?,
            },
            kind::PRESENT => Self::Present {
                states: get_states(&mut r)?,
            },
            kind::STORED => Self::Stored { id: r.id()? },
            kind::REFUSED => Self::Refused {
                id: r.id()?,
                error: get_error(&mut r)?,
            },
            kind::COMMITTED => Self::Committed {
                head: r.id()?,
                sequence: r.varint()?,
            },
            kind::SNAPSHOTS => {
                let head = get_optional_id(&mut r)?;
                let more = match r.byte()? {
                    0 => false,
                    1 => true,
                    _ => return Err(ProtocolError::Malformed("a flag is neither 0 nor 1")),
                };
                // An entry is at least an id and two one-byte varints.
                let count = r.count(ObjectId::LEN + 2)?;
                if count > MAX_SNAPSHOTS_PER_FRAME {
                    return Err(ProtocolError::Malformed(
                        "more snapshots than a frame may carry",
                    ));
                }
                if more && count == 0 {
                    return Err(ProtocolError::Malformed(
                        "an empty page cannot have more after it",
                    ));
                }
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    entries.push(SnapshotEntry {
                        id: r.id()?,
                        sequence: r.varint()?,
                        committed_at: r.varint()?,
                    });
                }
                Self::Snapshots {
                    head,
                    entries,
                    more,
                }
            }
            kind::OBJECT => {
                let id = r.id()?;
                let total = r.u32()?;
                let offset = r.u32()?;
                let data = r.rest();
                check_piece(total, offset, data.len())?;
                Self::Object {
                    id,
                    total,
                    offset,
                    data,
                }
            }
            kind::USAGE_REPORT => Self::UsageReport {
                used: r.varint()?,
                objects: r.varint()?,
                snapshots: r.varint()?,
                soft_limit: r.varint()?,
                hard_limit: r.varint()?,
            },
            kind::ERROR => Self::Error(get_error(&mut r)?),
            other => return Err(ProtocolError::UnknownType(other)),
        };
        r.finish()?;
        Ok(message)
    }
}

fn check_piece(total: u32, offset: u32, len: usize) -> Result<(), ProtocolError> {
    if len > MAX_PIECE {
        return Err(ProtocolError::Malformed("a piece exceeds MAX_PIECE"));
    }
    if u64::from(offset) + len as u64 > u64::from(total) {
        return Err(ProtocolError::Malformed(
            "a piece reaches past the object's end",
        ));
    }
    Ok(())
}

fn put_ids(out: &mut Vec<u8>, ids: &[ObjectId]) {
    assert!(ids.len() <= MAX_IDS_PER_FRAME, "too many ids for one frame");
    put_varint(out, ids.len() as u64);
    for id in ids {
        out.extend_from_slice(id.as_bytes());
    }
}

fn get_ids(r: &mut Reader<'_>) -> Result<Vec<ObjectId>, ProtocolError> {
    let count = r.count(ObjectId::LEN)?;
    if count > MAX_IDS_PER_FRAME {
        return Err(ProtocolError::Malformed("more ids than a frame may carry"));
    }
    (0..count).map(|_| r.id()).collect()
}

fn put_optional_id(out: &mut Vec<u8>, id: Option<&ObjectId>) {
    match id {
        None => out.push(0),
        Some(id) => {
            out.push(1);
            out.extend_from_slice(id.as_bytes());
        }
    }
}

fn get_optional_id(r: &mut Reader<'_>) -> Result<Option<ObjectId>, ProtocolError> {
    match r.byte()? {
        0 => Ok(None),
        1 => Ok(Some(r.id()?)),
        _ => Err(ProtocolError::Malformed(
            "an optional id's flag is neither 0 nor 1",
        )),
    }
}

/// States: the count, a bitmap of stored objects (bit i of byte i/8, low bit first),
/// then the partial uploads as (index, offset) pairs in increasing index order.
fn put_states(out: &mut Vec<u8>, states: &[ObjectState]) {
    assert!(
        states.len() <= MAX_IDS_PER_FRAME,
        "too many states for one frame"
    );
    put_varint(out, states.len() as u64);
    let mut bitmap = vec![0_u8; states.len().div_ceil(8)];
    for (i, state) in states.iter().enumerate() {
        if *state == ObjectState::Stored {
            bitmap[i / 8] |= 1 << (i % 8);
        }
    }
    out.extend_from_slice(&bitmap);
    let partial: Vec<(usize, u32)> = states
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match s {
            ObjectState::Partial(offset) if *offset > 0 => Some((i, *offset)),
            _ => None,
        })
        .collect();
    put_varint(out, partial.len() as u64);
    for (i, offset) in partial {
        put_varint(out, i as u64);
        put_varint(out, u64::from(offset));
    }
}

fn get_states(r: &mut Reader<'_>) -> Result<Vec<ObjectState>, ProtocolError> {
    let count = r.varint()?;
    if count > MAX_IDS_PER_FRAME as u64 {
        return Err(ProtocolError::Malformed("more states than a query may ask"));
    }
    let count = count as usize;
    let bitmap = r.take(count.div_ceil(8))?;
    if !count.is_multiple_of(8) && bitmap.last().is_some_and(|b| b >> (count % 8) != 0) {
        return Err(ProtocolError::Malformed("bits set past the last state"));
    }
    let mut states: Vec<ObjectState> = (0..count)
        .map(|i| {
            if bitmap[i / 8] & (1 << (i % 8)) != 0 {
                ObjectState::Stored
            } else {
                ObjectState::Missing
            }
        })
        .collect();
    let partials = r.count(2)?;
    let mut previous = None;
    for _ in 0..partials {
        let index = r.varint()?;
        let offset = r.u32()?;
        if previous.is_some_and(|p| index <= p) || index >= count as u64 {
            return Err(ProtocolError::Malformed(
                "partial indexes out of order or range",
            ));
        }
        if offset == 0 {
            return Err(ProtocolError::Malformed(
                "a partial upload of 0 bytes is sent as missing",
            ));
        }
        previous = Some(index);
        let state = &mut states[index as usize];
        if *state == ObjectState::Stored {
            return Err(ProtocolError::Malformed(
                "an object both stored and partial",
            ));
        }
        *state = ObjectState::Partial(offset);
    }
    Ok(states)
}

fn put_error(out: &mut Vec<u8>, error: &WireError) {
    let text = |out: &mut Vec<u8>, message: &str| {
        let mut end = message.len().min(MAX_MESSAGE);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        put_varint(out, end as u64);
        out.extend_from_slice(&message.as_bytes()[..end]);
    };
    match error {
        WireError::StoreFull { used, limit } => {
            put_varint(out, code::STORE_FULL);
            put_varint(out, *used);
            put_varint(out, *limit);
        }
        WireError::NotAuthorised => put_varint(out, code::NOT_AUTHORISED),
        WireError::ObjectMissing { id } => {
            put_varint(out, code::OBJECT_MISSING);
            out.extend_from_slice(id.as_bytes());
        }
        WireError::VersionMismatch { min, max } => {
            put_varint(out, code::VERSION_MISMATCH);
            put_varint(out, u64::from(*min));
            put_varint(out, u64::from(*max));
        }
        WireError::OffsetMismatch { id, held } => {
            put_varint(out, code::OFFSET_MISMATCH);
            out.extend_from_slice(id.as_bytes());
            put_varint(out, u64::from(*held));
        }
        WireError::MissingReferences { ids } => {
            put_varint(out, code::MISSING_REFERENCES);
            put_ids(out, ids);
        }
        WireError::StaleParent { head } => {
            put_varint(out, code::STALE_PARENT);
            put_optional_id(out, head.as_ref());
        }
        WireError::Malformed { message } => {
            put_varint(out, code::MALFORMED);
            text(out, message);
        }
        WireError::Internal { message } => {
            put_varint(out, code::INTERNAL);
            text(out, message);
        }
    }
}

fn get_error(r: &mut Reader<'_>) -> Result<WireError, ProtocolError> {
    let text = |r: &mut Reader<'_>| -> Result<String, ProtocolError> {
        let bytes = r.bytes()?;
        if bytes.len() > MAX_MESSAGE {
            return Err(ProtocolError::Malformed("error message too long"));
        }
        String::from_utf8(bytes.to_vec())
            .map_err(|_| ProtocolError::Malformed("error message is not UTF-8"))
    };
    Ok(match r.varint()? {
        code::STORE_FULL => WireError::StoreFull {
            used: r.varint()?,
            limit: r.varint()?,
        },
        code::NOT_AUTHORISED => WireError::NotAuthorised,
        code::OBJECT_MISSING => WireError::ObjectMissing { id: r.id()? },
        code::VERSION_MISMATCH => WireError::VersionMismatch {
            min: r.u16()?,
            max: r.u16()?,
        },
        code::OFFSET_MISMATCH => WireError::OffsetMismatch {
            id: r.id()?,
            held: r.u32()?,
        },
        code::MISSING_REFERENCES => WireError::MissingReferences { ids: get_ids(r)? },
        code::STALE_PARENT => WireError::StaleParent {
            head: get_optional_id(r)?,
        },
        code::MALFORMED => WireError::Malformed { message: text(r)? },
        code::INTERNAL => WireError::Internal { message: text(r)? },
        _ => return Err(ProtocolError::Malformed("unknown error code")),
    })
}
