//! Errors of the store: one enum, with the account, object or path each concerns.

use std::io;
use std::path::PathBuf;

use homing_crypto::ObjectId;

use crate::backend::BackendError;

/// Everything the object store can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The segment storage failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The index (redb) failed.
    #[error("the store's index failed: {0}")]
    Index(#[source] Box<redb::Error>),
    /// A file of the store (partial upload, directory) could not be used.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The system's error.
        source: io::Error,
    },
    /// An account name that is not allowed.
    #[error(
        "invalid account name {0:?}: use 1 to 64 lower-case letters, digits, '.', '_' or '-', not starting with '.'"
    )]
    InvalidAccount(String),
    /// No such account.
    #[error("no account named {0:?}; create it with `homing-store account add`")]
    UnknownAccount(String),
    /// The account exists already.
    #[error("an account named {0:?} exists already")]
    AccountExists(String),
    /// The account is disabled.
    #[error("account {0:?} is disabled")]
    AccountDisabled(String),
    /// Storing the object would exceed the account's hard quota.
    #[error("account {account:?} is full: {used} of {limit} bytes used, {wanted} more wanted")]
    StoreFull {
        /// The account.
        account: String,
        /// Bytes stored.
        used: u64,
        /// The hard quota.
        limit: u64,
        /// Bytes the refused object needs.
        wanted: u64,
    },
    /// An object larger than any Homing writes.
    #[error("object {id}: {len} bytes exceed the limit of {limit}")]
    TooLarge {
        /// The object.
        id: ObjectId,
        /// Its announced length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// A piece that does not continue the stored part of an upload.
    #[error("object {id}: the store holds {held} bytes of it; resume there")]
    OffsetMismatch {
        /// The object.
        id: ObjectId,
        /// Bytes held.
        held: u32,
    },
    /// A piece whose announced total differs from the upload's, or reaches past it.
    #[error("object {id}: announced as {expected} bytes, now as {got}")]
    LengthMismatch {
        /// The object.
        id: ObjectId,
        /// The total announced first.
        expected: u64,
        /// The total (or end) announced now.
        got: u64,
    },
    /// No such object in the account.
    #[error("object {id} is not in account {account:?}")]
    ObjectMissing {
        /// The account.
        account: String,
        /// The object.
        id: ObjectId,
    },
    /// A commit whose parent is not the account's head (another client committed,
    /// or the client's view is stale).
    #[error("the commit does not follow account {account:?}'s head")]
    StaleParent {
        /// The account.
        account: String,
        /// The account's head.
        head: Option<ObjectId>,
    },
    /// A commit that references objects the account does not hold.
    #[error("the commit references {count} objects that account {account:?} does not hold")]
    MissingReferences {
        /// The account.
        account: String,
        /// How many are missing.
        count: usize,
        /// Some of them (at most 1000).
        ids: Vec<ObjectId>,
    },
    /// A commit that contradicts the account's history (a delta that removes an
    /// id its parent does not reference).
    #[error("account {account:?}: invalid commit: {message}")]
    InvalidCommit {
        /// The account.
        account: String,
        /// What is wrong.
        message: String,
    },
    /// An object's bytes no longer match the checksum taken when it was stored.
    #[error(
        "object {id} of account {account:?} is damaged (segment {segment:016x}, offset {offset}): its bytes changed since they were stored"
    )]
    Corrupt {
        /// The account.
        account: String,
        /// The object.
        id: ObjectId,
        /// Its segment.
        segment: u64,
        /// Its offset there.
        offset: u64,
    },
}

impl StoreError {
    /// Whether the request may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Backend(e) => e.is_retryable(),
            Self::Io { .. } | Self::Index(_) => true,
            _ => false,
        }
    }
}

/// Converts any redb error.
pub(crate) fn index(error: impl Into<redb::Error>) -> StoreError {
    StoreError::Index(Box::new(error.into()))
}
