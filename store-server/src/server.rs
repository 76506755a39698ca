//! The store server: TLS 1.3 with client certificates from the store's CA, one
//! protocol session per connection, and the object store behind it.
//!
//! The account of a connection is its certificate's common name; nothing a client
//! sends can name another account. Revocation takes effect while the server runs:
//! the CRL is re-read when it changes, new handshakes of a revoked certificate
//! fail, and open sessions of it are closed before their next request.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use homing_crypto::ObjectId;
use homing_transfer::proto::{
    ClientMessage, FrameDecoder, MAX_FRAME_PAYLOAD, MAX_IDS_PER_FRAME, MAX_SNAPSHOTS_PER_FRAME,
    ObjectState, PROTOCOL_VERSION, ProtocolError, ServerMessage, SnapshotEntry, WireError,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use crate::StoreError;
use crate::backend::Backend;
use crate::ca::Ca;
use crate::objects::{Change, Holding, ObjectStore, PutOutcome};

/// The ALPN name of protocol version 1.
pub const ALPN: &[u8] = b"homing/1";
/// Sessions served at once; a client past its handshake waits for a place.
pub const MAX_CONNECTIONS: usize = 256;
/// Connections in their TLS handshake at once; more wait in the kernel's accept
/// queue. Kept apart from sessions, so that idle connections that never finish a
/// handshake cannot keep clients that do out for longer than the timeout.
pub const MAX_HANDSHAKES: usize = 2048;
/// Time a client has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection silent for this long is closed. Clients send no keep-alives (they
/// cost bytes on metered links); they reconnect, with TLS session resumption.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Connections one source may hold at once (handshakes and sessions): a laptop
/// needs one or two; a misbehaving peer cannot take every place. A source is an
/// IPv4 address, or an IPv6 /64.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 32;

/// How often the server applies retention and collects garbage.
const GC_INTERVAL: Duration = Duration::from_secs(3600);
/// How long an unneeded object waits before it is deleted by default: an upload
/// whose commit is on its way is not taken from under it, and an initial backup
/// over a thin link can take days.
pub const DEFAULT_GC_GRACE: u64 = 7 * 24 * 3600;
/// How long an upload in progress may lie untouched before it is dropped.
const PARTIAL_MAX_AGE: u64 = 7 * 24 * 3600;

/// Bytes of whole objects batched before they are stored together.
const MAX_BATCH: usize = 8 * 1024 * 1024;
/// Whole objects batched before they are stored together (tiny objects count too).
const MAX_BATCH_OBJECTS: usize = 4096;
/// Replies held before they are written, per connection.
const MAX_PENDING_OUTPUT: usize = 1024 * 1024;
/// Room made for each read of a connection's input.
const READ_SIZE: usize = 256 * 1024;
/// How long a connection waits for input before it gives back its batch memory.
const QUIET: Duration = Duration::from_secs(2);
/// The most ids one commit may reference (32 MiB of ids).
pub const MAX_COMMIT_IDS: usize = 1 << 20;

/// Everything that can stop the server from starting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A certificate, key or CRL file could not be read or parsed.
    #[error("cannot load {}: {message}", path.display())]
    Credentials {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration failed: {0}")]
    Tls(String),
    /// The CA's register could not be read.
    #[error(transparent)]
    Ca(#[from] crate::ca::CaError),
    /// The object store could not be prepared.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A running store: the object store, its TLS configuration and the revoked serials.
pub struct Server<B> {
    dir: PathBuf,
    store: ObjectStore<B>,
    /// One ticket key set for the server's life: reloading the CRL must not throw
    /// away every laptop's ticket (each would pay a full handshake again).
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
    tls: RwLock<TlsState>,
    crl_changed: Mutex<Option<SystemTime>>,
    /// Seconds an unneeded object waits before the hourly collection deletes it.
    gc_grace: u64,
    /// Connections (in handshake or in session) per source ([`source_of`]).
    sources: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// The source a connection from `peer` counts against: an IPv4 address (an
/// IPv4-mapped IPv6 address is one), or the /64 of an IPv6 address. A host is
/// given a whole /64 and may use any address in it, so counted per address, one
/// peer could take every place.
fn source_of(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(_) => peer,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & (u128::MAX << 64))),
        },
    }
}

/// One connection's place in its source address's share; given back on drop.
struct SourceShare {
    sources: Arc<Mutex<HashMap<IpAddr, usize>>>,
    source: IpAddr,
}

impl SourceShare {
    fn take(sources: &Arc<Mutex<HashMap<IpAddr, usize>>>, peer: IpAddr) -> Option<Self> {
        let source = source_of(peer);
        let mut counts = sources.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(source).or_insert(0);
        if *count >= MAX_CONNECTIONS_PER_SOURCE {
            return None;
        }
        *count += 1;
        Some(Self {
            sources: Arc::clone(sources),
            source,
        })
    }
}

impl Drop for SourceShare {
    fn drop(&mut self) {
        let mut counts = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

struct TlsState {
    acceptor: TlsAcceptor,
    revoked: Arc<HashSet<String>>,
}

impl<B: Backend + 'static> Server<B> {
    /// Prepares a server for the store in `dir`.
    ///
    /// # Errors
    /// If the certificates, key or CRL cannot be loaded.
    pub fn new(dir: &Path, store: ObjectStore<B>) -> Result<Self, ServerError> {
        let ticketer = rustls::crypto::aws_lc_rs::Ticketer::new()
            .map_err(|e| ServerError::Tls(e.to_string()))?;
        let state = load_tls(dir, &ticketer)?;
        // Leftovers of a crash; safe now, before any session can start an upload.
        store.remove_stray_partials()?;
        Ok(Self {
            dir: dir.to_path_buf(),
            store,
            ticketer,
            tls: RwLock::new(state),
            crl_changed: Mutex::new(crl_stamp(dir)),
            gc_grace: DEFAULT_GC_GRACE,
            sources: Arc::default(),
        })
    }

    /// The object store it serves (for tests that inject faults into its backend).
    pub fn store(&self) -> &ObjectStore<B> {
        &self.store
    }

    /// Sets how long an unneeded object waits before the hourly collection
    /// deletes it (default [`DEFAULT_GC_GRACE`]).
    #[must_use]
    pub fn with_gc_grace(mut self, seconds: u64) -> Self {
        self.gc_grace = seconds;
        self
    }

    /// Serves connections from `listener` until `shutdown` completes; then stops
    /// accepting and returns. Sessions in progress are not waited for: when the
    /// process ends they are cut, and clients resume their uploads on reconnecting.
    ///
    /// Needs tokio's multi-threaded runtime: store calls run in `block_in_place`.
    ///
    /// # Errors
    /// If accepting fails for good.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> io::Result<()> {
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let sessions = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let watcher = tokio::spawn(Arc::clone(&self).watch_revocations());
        let collector = tokio::spawn(Arc::clone(&self).collect_garbage());
        tokio::pin!(shutdown);
        let result = loop {
            let permit = tokio::select! {
                () = &mut shutdown => break Ok(()),
                permit = Arc::clone(&handshakes).acquire_owned() => permit.expect("the semaphore is never closed"),
            };
            let (tcp, peer) = tokio::select! {
                () = &mut shutdown => break Ok(()),
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    // Out of file descriptors and the like: wait, then go on.
                    Err(error) if is_transient(&error) => {
                        tracing::warn!(%error, "accept failed; retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    Err(error) => break Err(error),
                },
            };
            // One source cannot take every place: past its share, its new
            // connections are closed at once.
            let Some(share) = SourceShare::take(&self.sources, peer.ip()) else {
                tracing::debug!(%peer, "too many connections from this source");
                drop(tcp);
                continue;
            };
            let (server, sessions) = (Arc::clone(&self), Arc::clone(&sessions));
            tokio::spawn(async move {
                let _share = share;
                if let Err(error) = server.session(tcp, peer, permit, sessions).await {
                    tracing::info!(%peer, %error, "session ended");
                }
            });
        };
        watcher.abort();
        collector.abort();
        result
    }

    /// Applies retention and collects garbage every [`GC_INTERVAL`], drops uploads
    /// abandoned for [`PARTIAL_MAX_AGE`] and compacts segments that are mostly dead
    /// space, on a blocking thread.
    async fn collect_garbage(self: Arc<Self>) {
        let mut tick = tokio::time::interval(GC_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let server = Arc::clone(&self);
            let done = tokio::task::spawn_blocking(move || {
                let now = unix_now();
                let report = server.store.collect_garbage(now, server.gc_grace, false)?;
                let expired = server.store.expire_partials(now, PARTIAL_MAX_AGE)?;
                tracing::info!(
                    forgotten = report.snapshots_forgotten.len(),
                    deleted = report.objects_deleted,
                    bytes = report.bytes_freed,
                    waiting = report.objects_waiting,
                    segments = report.segments_deleted,
                    disk_freed = report.segment_bytes_freed,
                    partials = expired,
                    "garbage collected"
                );
                let compacted = server.store.compact()?;
                tracing::info!(
                    segments = compacted.segments_compacted,
                    moved = compacted.bytes_moved,
                    disk_freed = compacted.segment_bytes_freed,
                    damaged_left = compacted.damaged_left,
                    "segments compacted"
                );
                Ok::<_, StoreError>(())
            })
            .await;
            match done {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::error!(%error, "garbage collection failed"),
                Err(error) => tracing::error!(%error, "garbage collection panicked"),
            }
        }
    }

    /// Re-reads the CRL when it changes, every two seconds.
    async fn watch_revocations(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tick.tick().await;
            self.reload_if_revoked();
        }
    }

    fn reload_if_revoked(&self) {
        let stamp = crl_stamp(&self.dir);
        let mut seen = self.crl_changed.lock().unwrap_or_else(|p| p.into_inner());
        if *seen == stamp {
            return;
        }
        match load_tls(&self.dir, &self.ticketer) {
            Ok(state) => {
                tracing::info!(revoked = state.revoked.len(), "revocation list reloaded");
                *self.tls.write().unwrap_or_else(|p| p.into_inner()) = state;
                *seen = stamp;
            }
            Err(error) => {
                tracing::error!(%error, "cannot reload the revocation list; keeping the old one")
            }
        }
    }

    fn is_revoked(&self, serial: &str) -> bool {
        self.tls
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .revoked
            .contains(serial)
    }

    async fn session(
        self: &Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        handshake: tokio::sync::OwnedSemaphorePermit,
        sessions: Arc<Semaphore>,
    ) -> Result<(), SessionError> {
        tcp.set_nodelay(true)?;
        self.reload_if_revoked();
        let acceptor = self
            .tls
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .acceptor
            .clone();
        let mut tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
            .await
            .map_err(|_| SessionError::Timeout("handshake"))??;
        drop(handshake);
        let _session = sessions
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let client = {
            let (_, connection) = tls.get_ref();
            let certificate = connection
                .peer_certificates()
                .and_then(|c| c.first())
                .ok_or(SessionError::NoCertificate)?;
            Client::from_certificate(certificate)?
        };
        tracing::info!(%peer, account = %client.account, serial = %client.serial, "session started");
        let mut session = Session {
            client,
            greeted: false,
            commit_ids: Vec::new(),
            commit_removed: Vec::new(),
            batch: Batch::default(),
            spare: None,
        };
        let mut decoder = FrameDecoder::new(MAX_FRAME_PAYLOAD);
        let mut output = Vec::new();
        // The batch being stored on a blocking thread while this task reads on.
        let mut storing: Option<Storing> = None;
        loop {
            // The batch fills while input is at hand or a batch is being stored;
            // it goes to be stored when the input runs dry (or it is full).
            let gathering = storing.is_none() && !session.batch.is_empty();
            let quiet = storing.is_none() && session.batch.is_empty();
            // A connection that has waited a while for its client gives back its
            // batch memory; one that is busy keeps it (fresh memory for every
            // batch costs page faults and zeroing).
            let holding = session.spare.is_some() || decoder.capacity() >= MAX_BATCH;
            let read = tokio::select! {
                answers = async { storing.as_mut().expect("guarded by the condition").await },
                    if storing.is_some() =>
                {
                    storing = None;
                    session.stored(answers?, &mut output);
                    // What piled up meanwhile goes to be stored while these answers travel.
                    self.dispatch(&mut session, &mut decoder, &mut storing);
                    write_out(&mut tls, &mut output).await?;
                    continue;
                }
                read = tokio::time::timeout(
                    if quiet && holding {
                        QUIET
                    } else if quiet {
                        IDLE_TIMEOUT
                    } else if gathering {
                        Duration::ZERO
                    } else {
                        Duration::MAX
                    },
                    // Batched objects stay where they were read, in the decoder's
                    // buffer, until it is handed over with them.
                    tls.read_buf(if session.batch.is_empty() {
                        decoder.input(READ_SIZE)
                    } else {
                        decoder.input_keeping(READ_SIZE)
                    }),
                ) => match read {
                    Ok(read) => read,
                    // The input ran dry: the batch goes to be stored now.
                    Err(_) if gathering => {
                        self.dispatch(&mut session, &mut decoder, &mut storing);
                        continue;
                    }
                    Err(_) if holding => {
                        session.spare = None;
                        session.batch.release();
                        decoder.shrink(READ_SIZE);
                        continue;
                    }
                    Err(_) => return Err(SessionError::Timeout("idle")),
                },
            };
            let read = match read {
                Ok(read) => read,
                Err(error) => {
                    // The input broke off (a client whose budget ran out
                    // half-closes mid-record), but what arrived whole is
                    // stored, and answered if the client still listens.
                    self.settle(&mut session, &decoder, &mut storing, &mut output)
                        .await?;
                    let _ = write_out(&mut tls, &mut output).await;
                    return Err(error.into());
                }
            };
            if read == 0 {
                self.settle(&mut session, &decoder, &mut storing, &mut output)
                    .await?;
                write_out(&mut tls, &mut output).await?;
                return Ok(());
            }
            let mut close = false;
            loop {
                if self.is_revoked(&session.client.serial) {
                    return Err(SessionError::Revoked);
                }
                // The frame by place, so that a whole object can be batched where
                // it lies; and its message.
                let frame = decoder.next_frame_at().and_then(|at| {
                    at.map(|at| ClientMessage::decode(decoder.frame(&at)).map(|m| (at, m)))
                        .transpose()
                });
                let (at, message) = match frame {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(error) => {
                        // Objects sent before are stored and answered first.
                        self.settle(&mut session, &decoder, &mut storing, &mut output)
                            .await?;
                        reply_malformed(&mut output, &error);
                        close = true;
                        break;
                    }
                };
                // Whole objects in one piece gather in a batch that is stored with
                // one segment sync and one index transaction (group commit), on a
                // blocking thread while this task reads and decrypts the next ones;
                // any other message first waits for every batch, so that replies
                // keep their order.
                if let ClientMessage::Put {
                    id,
                    total,
                    offset: 0,
                    data,
                } = &message
                    && data.len() == *total as usize
                    && session.greeted
                {
                    // The object's bytes end its frame; they are not copied, and
                    // the buffer that holds them goes to be stored with them.
                    let (id, bytes) = (*id, at.payload.end - data.len()..at.payload.end);
                    if session.batch.is_empty() {
                        decoder.reserve_exact(BATCH_ROOM);
                    }
                    session.batch.push(id, bytes);
                    if session.batch.bytes() >= MAX_BATCH
                        || session.batch.len() >= MAX_BATCH_OBJECTS
                    {
                        // One batch is stored at a time: a full one waits for it.
                        if let Some(previous) = storing.take() {
                            session.stored(previous.await?, &mut output);
                        }
                        self.dispatch(&mut session, &mut decoder, &mut storing);
                    }
                    continue;
                }
                self.settle(&mut session, &decoder, &mut storing, &mut output)
                    .await?;
                // Store calls sync files; they run on this worker thread without
                // holding up the others.
                let flow =
                    tokio::task::block_in_place(|| self.handle(&mut session, message, &mut output));
                if flow == Flow::Close {
                    close = true;
                    break;
                }
                // Replies to a read full of requests (Gets, say) go out as they pile
                // up, so that one connection never holds more than about a MiB.
                if output.len() >= MAX_PENDING_OUTPUT {
                    write_out(&mut tls, &mut output).await?;
                }
            }
            if close {
                self.settle(&mut session, &decoder, &mut storing, &mut output)
                    .await?;
                write_out(&mut tls, &mut output).await?;
                // A client that stopped reading cannot hold its place by it.
                let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.shutdown()).await;
                return Ok(());
            }
            write_out(&mut tls, &mut output).await?;
        }
    }

    /// Starts storing the session's batch on a blocking thread, if it holds any:
    /// the decoder hands over the buffer the objects were read into and goes on
    /// in the spare one.
    fn dispatch(
        self: &Arc<Self>,
        session: &mut Session,
        decoder: &mut FrameDecoder,
        storing: &mut Option<Storing>,
    ) {
        debug_assert!(storing.is_none(), "one batch is stored at a time");
        if session.batch.is_empty() {
            return;
        }
        let mut next = session.spare.take().unwrap_or_default();
        let buffer = decoder.swap_buffer(std::mem::take(&mut next.data));
        let mut batch = std::mem::replace(&mut session.batch, next);
        batch.data = buffer;
        let server = Arc::clone(self);
        let account = session.client.account.clone();
        *storing = Some(tokio::task::spawn_blocking(move || {
            let mut answers = Vec::new();
            server.store_batch(&account, &batch, &batch.data, &mut answers);
            (answers, batch)
        }));
    }

    /// Waits for the batch being stored, then stores what is left in the session's
    /// batch, answering both: afterwards every object received has its answer in
    /// `out`.
    async fn settle(
        &self,
        session: &mut Session,
        decoder: &FrameDecoder,
        storing: &mut Option<Storing>,
        out: &mut Vec<u8>,
    ) -> Result<(), SessionError> {
        if let Some(previous) = storing.take() {
            session.stored(previous.await?, out);
        }
        if !session.batch.is_empty() {
            // Still in the decoder's buffer: stored from there.
            tokio::task::block_in_place(|| {
                self.store_batch(
                    &session.client.account,
                    &session.batch,
                    decoder.framed(),
                    out,
                );
            });
            session.batch.clear();
        }
        Ok(())
    }

    /// Stores the batched whole objects, whose bytes lie in `data`, and answers
    /// each: Stored or Refused.
    fn store_batch(&self, account: &str, batch: &Batch, data: &[u8], out: &mut Vec<u8>) {
        let objects: Vec<(ObjectId, &[u8])> = batch.objects(data).collect();
        match self.store.put_whole(account, &objects) {
            Ok(results) => {
                for ((id, _), result) in objects.iter().zip(results) {
                    match result {
                        Ok(_) => ServerMessage::Stored { id: *id }.encode(out),
                        Err(error) => ServerMessage::Refused {
                            id: *id,
                            error: wire_error(&error),
                        }
                        .encode(out),
                    }
                }
            }
            // Nothing of the batch was stored: every object is refused alike.
            Err(error) => {
                let error = wire_error(&error);
                for (id, _) in &objects {
                    ServerMessage::Refused {
                        id: *id,
                        error: error.clone(),
                    }
                    .encode(out);
                }
            }
        }
    }

    fn handle(&self, session: &mut Session, message: ClientMessage<'_>, out: &mut Vec<u8>) -> Flow {
        let account = session.client.account.clone();
        if !session.greeted {
            return match message {
                ClientMessage::Hello {
                    min_version,
                    max_version,
                } if (min_version..=max_version).contains(&PROTOCOL_VERSION) => {
                    if let Err(error) = self.store.account(&account) {
                        ServerMessage::Error(wire_error(&error)).encode(out);
                        return Flow::Close;
                    }
                    session.greeted = true;
                    ServerMessage::Welcome {
                        version: PROTOCOL_VERSION,
                        max_frame: MAX_FRAME_PAYLOAD as u32,
                    }
                    .encode(out);
                    Flow::Continue
                }
                ClientMessage::Hello { .. } => {
                    ServerMessage::Error(WireError::VersionMismatch {
                        min: PROTOCOL_VERSION,
                        max: PROTOCOL_VERSION,
                    })
                    .encode(out);
                    Flow::Close
                }
                _ => {
                    ServerMessage::Error(WireError::Malformed {
                        message: "the first message must be Hello".into(),
                    })
                    .encode(out);
                    Flow::Close
                }
            };
        }
        match message {
            ClientMessage::Hello { .. } => {
                ServerMessage::Error(WireError::Malformed {
                    message: "Hello was sent twice".into(),
                })
                .encode(out);
                return Flow::Close;
            }
            ClientMessage::Query { ids } => {
                let states: Result<Vec<ObjectState>, StoreError> = ids
                    .iter()
                    .map(|id| {
                        self.store.holding(&account, id).map(|h| match h {
                            Holding::Stored => ObjectState::Stored,
                            Holding::Missing => ObjectState::Missing,
                            Holding::Partial(held) => ObjectState::Partial(held),
                        })
                    })
                    .collect();
                match states {
                    Ok(states) => ServerMessage::Present { states }.encode(out),
                    Err(error) => ServerMessage::Error(wire_error(&error)).encode(out),
                }
            }
            ClientMessage::Put {
                id,
                total,
                offset,
                data,
            } => {
                let last = u64::from(offset) + data.len() as u64 == u64::from(total);
                match self.store.put_piece(&account, &id, total, offset, data) {
                    // One Stored per upload: for its last piece, even when the object
                    // was stored already (by another client of the same account).
                    Ok(PutOutcome::Stored) if last => ServerMessage::Stored { id }.encode(out),
                    Ok(_) => {}
                    Err(error) => ServerMessage::Refused {
                        id,
                        error: wire_error(&error),
                    }
                    .encode(out),
                }
            }
            ClientMessage::CommitIds { ids } => {
                if session.commit_ids.len() + ids.len() > MAX_COMMIT_IDS {
                    ServerMessage::Error(WireError::Malformed {
                        message: format!("a commit may reference at most {MAX_COMMIT_IDS} ids"),
                    })
                    .encode(out);
                    return Flow::Close;
                }
                session.commit_ids.extend(ids);
            }
            ClientMessage::CommitRemoved { ids } => {
                if session.commit_removed.len() + ids.len() > MAX_COMMIT_IDS {
                    ServerMessage::Error(WireError::Malformed {
                        message: format!("a commit may remove at most {MAX_COMMIT_IDS} ids"),
                    })
                    .encode(out);
                    return Flow::Close;
                }
                session.commit_removed.extend(ids);
            }
            ClientMessage::Commit {
                manifest_id,
                parent,
                delta,
                manifest,
            } => {
                let references = std::mem::take(&mut session.commit_ids);
                let removed = std::mem::take(&mut session.commit_removed);
                // A commit on a stale head is refused before its manifest is stored:
                // the client must build a new one. (Commit checks again, atomically.)
                let result = self
                    .store
                    .head(&account)
                    .and_then(|head| {
                        if head == parent {
                            Ok(())
                        } else {
                            Err(StoreError::StaleParent {
                                account: account.clone(),
                                head,
                            })
                        }
                    })
                    .and_then(|()| {
                        u32::try_from(manifest.len()).map_err(|_| StoreError::TooLarge {
                            id: manifest_id,
                            len: manifest.len() as u64,
                            limit: u64::from(u32::MAX),
                        })
                    })
                    .and_then(|len| {
                        self.store
                            .put_piece(&account, &manifest_id, len, 0, manifest)
                    })
                    .and_then(|_| {
                        self.store.commit(
                            &account,
                            &manifest_id,
                            parent.as_ref(),
                            &Change {
                                delta,
                                added: &references,
                                removed: &removed,
                            },
                            unix_now(),
                        )
                    });
                match result {
                    Ok(sequence) => ServerMessage::Committed {
                        head: manifest_id,
                        sequence,
                    }
                    .encode(out),
                    Err(error) => ServerMessage::Error(wire_error(&error)).encode(out),
                }
            }
            ClientMessage::List { from } => {
                match self
                    .store
                    .snapshots(&account, from, MAX_SNAPSHOTS_PER_FRAME)
                {
                    Ok(page) => ServerMessage::Snapshots {
                        head: page.head,
                        entries: page
                            .entries
                            .iter()
                            .map(|s| SnapshotEntry {
                                id: s.id,
                                sequence: s.sequence,
                                committed_at: s.committed_at,
                            })
                            .collect(),
                        more: page.more,
                    }
                    .encode(out),
                    Err(error) => ServerMessage::Error(wire_error(&error)).encode(out),
                }
            }
            ClientMessage::Get { id, offset, len } => {
                match self.store.read(&account, &id, offset, len) {
                    Ok((total, data)) => ServerMessage::Object {
                        id,
                        total,
                        offset,
                        data: &data,
                    }
                    .encode(out),
                    Err(error) => ServerMessage::Error(wire_error(&error)).encode(out),
                }
            }
            ClientMessage::Usage => {
                let usage = self
                    .store
                    .account(&account)
                    .and_then(|info| Ok((info, self.store.snapshot_count(&account)?)));
                match usage {
                    Ok((info, snapshots)) => ServerMessage::UsageReport {
                        used: info.used,
                        objects: info.objects,
                        snapshots,
                        soft_limit: info.soft_limit,
                        hard_limit: info.hard_limit,
                    }
                    .encode(out),
                    Err(error) => ServerMessage::Error(wire_error(&error)).encode(out),
                }
            }
            ClientMessage::Bye => return Flow::Close,
        }
        Flow::Continue
    }
}

/// Writes the pending replies; a client that stops reading for [`IDLE_TIMEOUT`] is
/// cut off, so that it cannot hold a connection slot for ever.
async fn write_out(
    tls: &mut tokio_rustls::server::TlsStream<TcpStream>,
    output: &mut Vec<u8>,
) -> Result<(), SessionError> {
    if output.is_empty() {
        return Ok(());
    }
    tokio::time::timeout(IDLE_TIMEOUT, async {
        tls.write_all(output).await?;
        tls.flush().await
    })
    .await
    .map_err(|_| SessionError::Timeout("writing replies"))??;
    output.clear();
    Ok(())
}

/// What a session knows of its client.
struct Client {
    account: String,
    serial: String,
}

impl Client {
    fn from_certificate(certificate: &CertificateDer<'_>) -> Result<Self, SessionError> {
        let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref())
            .map_err(|_| SessionError::BadCertificate("it does not parse"))?;
        let account = parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or(SessionError::BadCertificate("it has no common name"))?
            .to_string();
        crate::objects::check_account_name(&account)
            .map_err(|_| SessionError::BadCertificate("its common name is not an account name"))?;
        let serial = parsed
            .tbs_certificate
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Self { account, serial })
    }
}

/// One connection's protocol state.
struct Session {
    client: Client,
    greeted: bool,
    commit_ids: Vec<ObjectId>,
    /// Ids the next delta commit removes.
    commit_removed: Vec<ObjectId>,
    /// Whole objects waiting to be stored together.
    batch: Batch,
    /// The memory of the last batch stored, for the next one.
    spare: Option<Batch>,
}

impl Session {
    /// Takes the answers of a batch that was stored, and keeps its memory.
    fn stored(&mut self, (answers, batch): (Vec<u8>, Batch), out: &mut Vec<u8>) {
        out.extend_from_slice(&answers);
        self.keep(batch);
    }

    /// Keeps a stored batch's memory for a later one, emptied: its objects are
    /// answered, and must never be stored or answered again.
    fn keep(&mut self, mut batch: Batch) {
        batch.clear();
        self.spare = Some(batch);
    }
}

/// A batch being stored: its answers, and the batch back for its memory.
type Storing = tokio::task::JoinHandle<(Vec<u8>, Batch)>;

/// Room a batch needs in the buffer beyond what it held when the batch began:
/// its object bytes (up to `MAX_BATCH` and the object that passes it), its
/// frames' headers (up to 48 bytes each), and what arrives after its last object
/// (a frame and a read). Reserved at once when a batch starts: growing by
/// doubling would copy the batch and leave up to twice that reserved. Only the
/// pages written are ever backed by memory.
const BATCH_ROOM: usize =
    MAX_BATCH + 48 * MAX_BATCH_OBJECTS + 2 * MAX_FRAME_PAYLOAD + 2 * READ_SIZE;

/// Whole objects received and not yet stored: where their bytes lie in the buffer
/// they were decrypted into, which is never copied. While a batch gathers, that is
/// the frame decoder's own buffer (and `data` is empty); the decoder hands it over
/// when the batch goes to be stored, and the batch brings it back as the memory of
/// a later one.
#[derive(Debug, Default)]
struct Batch {
    data: Vec<u8>,
    /// Each object's id and where its bytes lie in the buffer.
    objects: Vec<(ObjectId, Range<usize>)>,
    bytes: usize,
}

impl Batch {
    fn push(&mut self, id: ObjectId, bytes: Range<usize>) {
        self.bytes += bytes.len();
        self.objects.push((id, bytes));
    }

    /// The objects, read from `data`, the buffer they lie in.
    fn objects<'a>(&'a self, data: &'a [u8]) -> impl Iterator<Item = (ObjectId, &'a [u8])> {
        self.objects
            .iter()
            .map(move |(id, bytes)| (*id, &data[bytes.clone()]))
    }

    fn len(&self) -> usize {
        self.objects.len()
    }

    fn bytes(&self) -> usize {
        self.bytes
    }

    fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    fn clear(&mut self) {
        self.data.clear();
        self.objects.clear();
        self.bytes = 0;
    }

    /// Gives back the memory of an empty batch.
    fn release(&mut self) {
        if self.is_empty() {
            *self = Self::default();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Close,
}

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("no client certificate")]
    NoCertificate,
    #[error("unusable client certificate: {0}")]
    BadCertificate(&'static str),
    #[error("the client's certificate was revoked")]
    Revoked,
    #[error("storing a batch of objects failed: {0}")]
    Storing(#[from] tokio::task::JoinError),
}

fn reply_malformed(out: &mut Vec<u8>, error: &ProtocolError) {
    ServerMessage::Error(WireError::Malformed {
        message: error.to_string(),
    })
    .encode(out);
}

/// What the client is told about a store error: typed where the client can act.
fn wire_error(error: &StoreError) -> WireError {
    match error {
        StoreError::StoreFull { used, limit, .. } => WireError::StoreFull {
            used: *used,
            limit: *limit,
        },
        StoreError::UnknownAccount(_)
        | StoreError::AccountDisabled(_)
        | StoreError::InvalidAccount(_) => WireError::NotAuthorised,
        StoreError::ObjectMissing { id, .. } => WireError::ObjectMissing { id: *id },
        StoreError::OffsetMismatch { id, held } => WireError::OffsetMismatch {
            id: *id,
            held: *held,
        },
        StoreError::MissingReferences { ids, .. } => WireError::MissingReferences {
            ids: ids.iter().take(MAX_IDS_PER_FRAME).copied().collect(),
        },
        StoreError::StaleParent { head, .. } => WireError::StaleParent { head: *head },
        StoreError::TooLarge { .. }
        | StoreError::InvalidCommit { .. }
        | StoreError::LengthMismatch { .. }
        | StoreError::AccountExists(_) => WireError::Malformed {
            message: error.to_string(),
        },
        // Damage, disk and index failures: the client may try again later.
        _ => WireError::Internal {
            message: error.to_string(),
        },
    }
}

/// The TLS configuration the server uses for the store in `dir`: TLS 1.3 only,
/// client certificates from the store's CA checked against its CRL, ALPN
/// `homing/1`, session tickets. Public for benchmarks that need the same TLS.
///
/// # Errors
/// If the certificates, key or CRL cannot be loaded.
pub fn tls_config(
    dir: &Path,
    ticketer: &Arc<dyn rustls::server::ProducesTickets>,
) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    let load_error = |path: &Path| {
        let path = path.to_path_buf();
        move |e: rustls::pki_types::pem::Error| ServerError::Credentials {
            path,
            message: e.to_string(),
        }
    };
    let ca_path = dir.join("ca/ca.crt");
    let crl_path = dir.join("ca/crl.pem");
    let cert_path = dir.join("server.crt");
    let key_path = dir.join("server.key");
    let ca = CertificateDer::from_pem_file(&ca_path).map_err(load_error(&ca_path))?;
    let crl =
        CertificateRevocationListDer::from_pem_file(&crl_path).map_err(load_error(&crl_path))?;
    let chain = CertificateDer::pem_file_iter(&cert_path)
        .map_err(load_error(&cert_path))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(load_error(&cert_path))?;
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(load_error(&key_path))?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).map_err(|e| ServerError::Tls(e.to_string()))?;
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .with_crls([crl])
        .build()
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    let mut config =
        rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| ServerError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // Tickets let a reconnecting laptop resume without a full handshake.
    config.ticketer = Arc::clone(ticketer);
    // One ticket per handshake is enough for the next connection; each carries the
    // client's certificate, so more would cost thin links bytes for nothing.
    config.send_tls13_tickets = 1;
    Ok(Arc::new(config))
}

fn load_tls(
    dir: &Path,
    ticketer: &Arc<dyn rustls::server::ProducesTickets>,
) -> Result<TlsState, ServerError> {
    let config = tls_config(dir, ticketer)?;
    let revoked = Ca::open(dir)?
        .issued()?
        .into_iter()
        .filter(|i| i.revoked)
        .map(|i| i.serial)
        .collect();
    Ok(TlsState {
        acceptor: TlsAcceptor::from(config),
        revoked: Arc::new(revoked),
    })
}

fn crl_stamp(dir: &Path) -> Option<SystemTime> {
    std::fs::metadata(dir.join("ca/crl.pem"))
        .and_then(|m| m.modified())
        .ok()
}

fn is_transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    ) || error
        .raw_os_error()
        .is_some_and(|code| code == 23 || code == 24) // ENFILE, EMFILE
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take_all(sources: &Arc<Mutex<HashMap<IpAddr, usize>>>, peers: &[&str]) -> Vec<SourceShare> {
        peers
            .iter()
            .map(|peer| SourceShare::take(sources, peer.parse().unwrap()).unwrap())
            .collect()
    }

    #[test]
    fn an_ipv6_peer_has_one_share_for_its_whole_64() {
        let sources = Arc::default();
        let addresses: Vec<String> = (0..MAX_CONNECTIONS_PER_SOURCE)
            .map(|n| format!("2001:db8:1:2:{n:x}::{n:x}"))
            .collect();
        let held = take_all(
            &sources,
            &addresses.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        // Any other address of that /64 is refused; the next /64 is not.
        assert!(SourceShare::take(&sources, "2001:db8:1:2:ffff::1".parse().unwrap()).is_none());
        let other = SourceShare::take(&sources, "2001:db8:1:3::1".parse().unwrap());
        assert!(other.is_some());
        // A connection that ends gives its place back to the /64.
        drop(held);
        assert!(SourceShare::take(&sources, "2001:db8:1:2:ffff::1".parse().unwrap()).is_some());
    }

    #[test]
    fn ipv4_addresses_count_alone_and_mapped_ones_as_ipv4() {
        let sources = Arc::default();
        let held = take_all(&sources, &["192.0.2.7"; MAX_CONNECTIONS_PER_SOURCE]);
        assert!(SourceShare::take(&sources, "::ffff:192.0.2.7".parse().unwrap()).is_none());
        assert!(SourceShare::take(&sources, "192.0.2.8".parse().unwrap()).is_some());
        assert_eq!(held.len(), MAX_CONNECTIONS_PER_SOURCE);
    }
}
