//! The connection to the store as commands use it: a small runtime, the TLS
//! client, and the checks on the store's history (rollback and fork detection).

use anyhow::{Context, bail};
use homing_crypto::{KeyRing, ObjectId, ObjectKind};
use homing_transfer::client::{self, ClientError, Connection};
use homing_transfer::open_object;
use homing_transfer::stream::{Meter, Rate, Unmetered};
use redb::Database;

use crate::config::StoreConfig;
use crate::state;
use crate::tree::Manifest;

/// A connection to the store and the runtime that drives it.
pub struct Remote {
    runtime: tokio::runtime::Runtime,
    connection: Option<Connection>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("connection", &self.connection)
            .finish_non_exhaustive()
    }
}

impl Remote {
    /// Connects to the configured store.
    ///
    /// # Errors
    /// Unreadable credentials, an unreachable store, a refused certificate.
    pub fn connect(store: &StoreConfig) -> anyhow::Result<Self> {
        Self::connect_metered(
            store,
            std::sync::Arc::new(Unmetered),
            Rate::unlimited(),
            None,
        )
    }

    /// Connects with every byte charged to `meter` and limited to `rate`.
    ///
    /// # Errors
    /// As [`Remote::connect`]; a store that cannot be reached at all is a
    /// [`StoreUnreachable`].
    pub fn connect_metered(
        store: &StoreConfig,
        meter: std::sync::Arc<dyn Meter>,
        rate: Rate,
        send_buffer: Option<u32>,
    ) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the network runtime")?;
        if !store.certificate.exists() && store.key.exists() {
            bail!(
                "this client has its key but no certificate yet ({} is missing): have the \
                 request from `homing init --csr` signed with `homing-store ca sign`, then run \
                 `homing enroll --cert PREFIX.crt --ca PREFIX-ca.crt`",
                store.certificate.display()
            );
        }
        let tls = tls_config(store)?;
        let connection = runtime
            .block_on(Connection::connect_with_send_buffer(
                &store.address,
                &store.server_name,
                tls,
                meter,
                rate,
                send_buffer,
            ))
            .map_err(|error| explain_connect(error, store))?;
        Ok(Self {
            runtime,
            connection: Some(connection),
        })
    }

    /// Runs `f` against the connection.
    ///
    /// # Errors
    /// Whatever `f` returns.
    pub fn run<T, F>(&mut self, f: F) -> Result<T, ClientError>
    where
        F: AsyncFnOnce(&mut Connection) -> Result<T, ClientError>,
    {
        let connection = self.connection.as_mut().expect("connected");
        self.runtime.block_on(f(connection))
    }

    /// Bytes sent and received so far, TLS included.
    pub fn traffic(&self) -> (u64, u64) {
        self.connection.as_ref().map_or((0, 0), |c| {
            let traffic = c.traffic();
            (traffic.sent(), traffic.received())
        })
    }

    /// Fetches and opens a snapshot manifest.
    ///
    /// # Errors
    /// A missing or tampered manifest, naming its id.
    pub fn manifest(&mut self, keys: &KeyRing, id: ObjectId) -> anyhow::Result<Manifest> {
        let sealed = self
            .run(async |c| c.get(id).await)
            .with_context(|| format!("cannot fetch snapshot {id}"))?;
        let plain = open_object(keys, ObjectKind::Snapshot, &id, &sealed).with_context(|| {
            format!("snapshot {id} does not authenticate: it was damaged or is not ours")
        })?;
        Manifest::decode(&plain).with_context(|| format!("snapshot {id}"))
    }

    /// Says goodbye.
    pub fn close(mut self) {
        if let Some(connection) = self.connection.take() {
            let _ = self.runtime.block_on(connection.close());
        }
    }
}

/// The TLS settings for `store`, kept for the life of the process (as long as
/// the credential files do not change): rustls keeps its session tickets in them,
/// so the daemon's later runs resume their TLS session instead of paying a full
/// handshake each time.
fn tls_config(store: &StoreConfig) -> anyhow::Result<std::sync::Arc<rustls::ClientConfig>> {
    type Key = Vec<(std::path::PathBuf, Option<std::time::SystemTime>)>;
    static CACHE: std::sync::Mutex<Option<(Key, std::sync::Arc<rustls::ClientConfig>)>> =
        std::sync::Mutex::new(None);
    let key: Key = [&store.ca, &store.certificate, &store.key]
        .into_iter()
        .map(|p| {
            let modified = std::fs::metadata(p).and_then(|m| m.modified()).ok();
            (p.clone(), modified)
        })
        .collect();
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((cached, config)) = cache.as_ref()
        && *cached == key
    {
        return Ok(std::sync::Arc::clone(config));
    }
    let config = client::tls_config(&store.ca, &store.certificate, &store.key)?;
    *cache = Some((key, std::sync::Arc::clone(&config)));
    Ok(config)
}

/// The store cannot be reached from here now (refused, unreachable, timed out):
/// a roaming laptop's normal state, not a fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreUnreachable(String);

fn explain_connect(error: ClientError, store: &StoreConfig) -> anyhow::Error {
    use std::io::ErrorKind;
    let unreachable = match &error {
        ClientError::Timeout => true,
        // Refused, unreachable, timed out, or a name that does not resolve away
        // from home; not a store that answered and hung up (a revoked
        // certificate), nor what TLS refuses.
        ClientError::Io(e) => {
            matches!(
                e.kind(),
                ErrorKind::ConnectionRefused
                    | ErrorKind::TimedOut
                    | ErrorKind::HostUnreachable
                    | ErrorKind::NetworkUnreachable
                    | ErrorKind::AddrNotAvailable
                    | ErrorKind::NotFound
            )
        }
        ClientError::Resolve { .. } => true,
        _ => false,
    };
    let hint = match &error {
        ClientError::Credentials { .. } => "",
        ClientError::Closed => {
            "; the store closed the connection: is this client's certificate revoked, expired or from another CA?"
        }
        ClientError::Io(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            "; is `homing-store serve` running there?"
        }
        _ => "",
    };
    let message = format!(
        "cannot reach the store at {} ({}): {error}{hint}",
        store.address, store.server_name
    );
    if unreachable {
        anyhow::Error::new(StoreUnreachable(message))
    } else {
        anyhow::anyhow!(message)
    }
}

/// The store's head and its sequence number in this client's chain, after
/// checking it against the newest head this client has seen: a store that serves
/// an older head (rollback) or a different history (fork) is refused, and nothing
/// is changed because of it.
///
/// # Errors
/// Rollback and fork errors, connection errors, manifests that do not open.
pub fn checked_head(
    remote: &mut Remote,
    keys: &KeyRing,
    db: &Database,
) -> anyhow::Result<Option<(ObjectId, u64)>> {
    let list = remote
        .run(async |c| c.list().await)
        .context("cannot list the store's snapshots")?;
    let known = state::known_head(db)?;
    let Some(head) = list.head else {
        if let Some((id, sequence)) = known {
            bail!(
                "rollback: the store has no snapshots, but this client saw snapshot {id} \
                 (number {sequence}) there; the store was reset or replaced by an old \
                 copy. Nothing was changed. If the store really was started afresh, \
                 remove the state directory's state.redb to accept it."
            );
        }
        return Ok(None);
    };
    let manifest = remote.manifest(keys, head)?;
    if let Some((known_id, known_sequence)) = known {
        if manifest.sequence < known_sequence {
            bail!(
                "rollback: the store's newest snapshot is {head} (number {}), older than \
                 snapshot {known_id} (number {known_sequence}) that this client saw \
                 there. The store was restored from an old copy or is not the one it \
                 was. Nothing was changed.",
                manifest.sequence
            );
        }
        // Walk back to the sequence number seen: it must be the snapshot seen.
        // The snapshot seen is usually the head or its parent, named by the
        // head's own manifest; older manifests are fetched only when others
        // committed in between (retention may have dropped them: then say so).
        let mut at = (head, manifest.sequence, manifest.previous);
        while at.1 > known_sequence {
            let Some(previous) = at.2 else { break };
            if previous == known_id {
                at = (known_id, known_sequence, None);
                break;
            }
            let earlier = match remote.manifest(keys, previous) {
                Ok(earlier) => earlier,
                Err(error)
                    if error.chain().any(|cause| {
                        matches!(
                            cause.downcast_ref::<ClientError>(),
                            Some(ClientError::Refused {
                                error: homing_transfer::proto::WireError::ObjectMissing { .. },
                                ..
                            })
                        )
                    }) =>
                {
                    bail!(
                        "cannot tell whether the store's history contains snapshot {known_id} \
                         (number {known_sequence}), which this client saw: snapshot {previous} \
                         between them is no longer in the store (retention?). If the store is \
                         the one you trust, remove the state directory's state.redb to accept \
                         its history."
                    );
                }
                Err(error) => {
                    return Err(error.context(format!(
                        "cannot check the store's history back to snapshot {known_id}"
                    )));
                }
            };
            at = (previous, earlier.sequence, earlier.previous);
        }
        if at.1 == known_sequence && at.0 != known_id {
            bail!(
                "fork: the store's history does not contain snapshot {known_id} (number \
                 {known_sequence}) that this client saw; it has {} instead. Nothing was \
                 changed.",
                at.0
            );
        }
    }
    state::set_known_head(db, &head, manifest.sequence)?;
    Ok(Some((head, manifest.sequence)))
}
