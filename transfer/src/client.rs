//! The client side of the wire protocol over TLS: connect, ask what the store has,
//! upload with resume, commit, list, fetch.
//!
//! Every byte of the connection, TLS records and handshake included, passes through
//! one [`MeteredStream`] *under* TLS, so the meter sees what the link carries.
//! Requests are pipelined: queries go out in as many frames as needed before the
//! first answer is read, uploads keep up to [`UPLOAD_WINDOW`] bytes in flight and
//! fetches up to [`FETCH_WINDOW`]; nothing waits for an answer per object.
//!
//! Resume: an object the store holds in part (`Partial(n)`) continues at byte `n`,
//! and a piece the store refuses with `OffsetMismatch { held }` continues at
//! `held`. The caller must hand the *same sealed bytes* each time (the spool keeps
//! them until the store says `Stored`): sealing draws a fresh nonce, so a re-sealed
//! object would not continue the stored prefix.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use homing_crypto::ObjectId;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::proto::{
    ClientMessage, FrameDecoder, MAX_FRAME_PAYLOAD, MAX_IDS_PER_FRAME, MAX_PIECE, ObjectState,
    PROTOCOL_VERSION, ProtocolError, ServerMessage, SnapshotEntry, WireError,
};
use crate::stream::{BudgetExhausted, Meter, MeteredStream, Rate, Traffic};

/// ALPN name of protocol version 1.
pub const ALPN: &[u8] = b"homing/1";

/// Upload bytes sent and not yet answered, at most.
pub const UPLOAD_WINDOW: usize = 4 << 20;

/// Fetch bytes asked for and not yet received, at most.
pub const FETCH_WINDOW: usize = 4 << 20;

/// How long a reply may take before the connection counts as dead.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// How long an upload the meter stopped waits for the answers to what already
/// left (they say which objects the store holds; the rest is asked again).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What went wrong talking to the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// A credentials file could not be read or parsed.
    #[error("cannot load {what} from {path}: {message}")]
    Credentials {
        /// Which file: CA certificate, client certificate, client key.
        what: &'static str,
        /// Its path.
        path: String,
        /// Why.
        message: String,
    },
    /// The connection failed (including TLS: refused certificates end up here).
    #[error("connection to the store failed: {0}")]
    Io(#[from] io::Error),
    /// The caller could not hand over an object to upload (`load` failed):
    /// nothing is wrong with the connection.
    #[error("cannot load object {id} for the upload: {source}")]
    Load {
        /// The object.
        id: ObjectId,
        /// Why.
        source: io::Error,
    },
    /// The caller could not take note of an object the store holds (`stored`
    /// failed).
    #[error("cannot record that the store holds object {id}: {source}")]
    Record {
        /// The object.
        id: ObjectId,
        /// Why.
        source: io::Error,
    },
    /// An object longer than the protocol can carry.
    #[error("object {id} is {len} bytes, more than an object may be")]
    TooLarge {
        /// The object.
        id: ObjectId,
        /// Its length.
        len: usize,
    },
    /// The store's address does not resolve (no name server, or a name known
    /// only at home).
    #[error("cannot resolve the store's address {address}: {source}")]
    Resolve {
        /// The address as configured.
        address: String,
        /// Why.
        source: io::Error,
    },
    /// The store did not answer in time.
    #[error("the store did not answer within {} s", REPLY_TIMEOUT.as_secs())]
    Timeout,
    /// The store closed the connection.
    #[error("the store closed the connection")]
    Closed,
    /// The store broke the protocol.
    #[error("the store broke the protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// The store answered with something this request does not expect.
    #[error("unexpected answer from the store: {0}")]
    Unexpected(String),
    /// The store refused a request; the reason is typed.
    #[error("{0}")]
    Store(WireError),
    /// The store refused part of an upload.
    #[error("the store refused object {id}: {error}")]
    Refused {
        /// The object.
        id: ObjectId,
        /// Why.
        error: WireError,
    },
}

/// TLS settings of a client: trust only the store's CA, present the account's
/// certificate, TLS 1.3 only, session resumption through rustls' memory cache.
///
/// # Errors
/// [`ClientError::Credentials`] naming the file that is missing or malformed.
pub fn tls_config(
    ca: &Path,
    certificate: &Path,
    key: &Path,
) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let fail = |what: &'static str, path: &Path, message: String| ClientError::Credentials {
        what,
        path: path.display().to_string(),
        message,
    };
    let mut roots = rustls::RootCertStore::empty();
    let ca_certificate = CertificateDer::from_pem_file(ca)
        .map_err(|e| fail("the store's CA certificate", ca, e.to_string()))?;
    roots
        .add(ca_certificate)
        .map_err(|e| fail("the store's CA certificate", ca, e.to_string()))?;
    let chain = CertificateDer::pem_file_iter(certificate)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| fail("the client certificate", certificate, e.to_string()))?;
    if chain.is_empty() {
        return Err(fail(
            "the client certificate",
            certificate,
            "no certificate in the file".into(),
        ));
    }
    let private_key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| fail("the client key", key, e.to_string()))?;
    let mut config =
        rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, private_key)
            .map_err(|e| fail("the client key", key, e.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// The store's usage report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Bytes stored for the account.
    pub used: u64,
    /// Objects stored.
    pub objects: u64,
    /// Snapshots kept.
    pub snapshots: u64,
    /// Soft quota in bytes (0: none).
    pub soft_limit: u64,
    /// Hard quota in bytes (0: none).
    pub hard_limit: u64,
}

/// The store's snapshot list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotList {
    /// The current head.
    pub head: Option<ObjectId>,
    /// Kept snapshots, oldest first.
    pub entries: Vec<SnapshotEntry>,
}

/// What an upload sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UploadSummary {
    /// Objects the store now holds whole because of this upload.
    pub objects: u64,
    /// Object bytes sent (resumed objects count only what was sent).
    pub bytes: u64,
    /// Objects that continued a partial upload.
    pub resumed: u64,
}

/// One object to upload: its id, the bytes the store holds already, its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// The object.
    pub id: ObjectId,
    /// Bytes the store holds (from `Query`).
    pub held: u32,
}

type Tls = TlsStream<MeteredStream<TcpStream>>;

/// An answer to a `Get`: the piece (id, total, offset, bytes) or the store's error.
type Answer = Result<(ObjectId, u32, u32, Vec<u8>), WireError>;

/// Checks that an answer is the piece of `id` at `offset` that was asked for.
fn piece_of(answer: Answer, id: ObjectId, offset: u32) -> Result<(u32, Vec<u8>), ClientError> {
    match answer {
        Ok((got, total, at, data)) if got == id && at == offset => Ok((total, data)),
        Ok((got, _, at, _)) => Err(ClientError::Unexpected(format!(
            "asked for {id} at {offset}, got {got} at {at}"
        ))),
        Err(error) => Err(ClientError::Refused { id, error }),
    }
}

/// A connection to the store, greeted and ready for requests.
pub struct Connection {
    tls: Tls,
    decoder: FrameDecoder,
    buffer: Vec<u8>,
    /// Frames to send; object data goes between them (`pieces`).
    out: Vec<u8>,
    /// Object data to send from where it lies: before the byte of `out` at the
    /// position, the range of the object's bytes.
    pieces: Vec<(usize, Arc<Vec<u8>>, std::ops::Range<usize>)>,
    traffic: Arc<Traffic>,
    piece: usize,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("sent", &self.traffic.sent())
            .field("received", &self.traffic.received())
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Connects to `address`, checks the store's certificate for `server_name`,
    /// and exchanges `Hello`/`Welcome`.
    ///
    /// # Errors
    /// [`ClientError::Io`] for connection and TLS failures (a store that refuses the
    /// certificate closes the connection: [`ClientError::Closed`]),
    /// [`ClientError::Store`] with `VersionMismatch` when no version is common.
    pub async fn connect(
        address: &str,
        server_name: &str,
        tls: Arc<rustls::ClientConfig>,
        meter: Arc<dyn Meter>,
        rate: Rate,
    ) -> Result<Self, ClientError> {
        Self::connect_with_send_buffer(address, server_name, tls, meter, rate, None).await
    }

    /// [`Connection::connect`] with the socket's send buffer set to `send_buffer`
    /// bytes: on a capped link the meter charges what the kernel accepts, so a
    /// small buffer keeps what is charged close to what has left (a cut or a
    /// spent budget then strands little in the buffer).
    ///
    /// # Errors
    /// As [`Connection::connect`].
    pub async fn connect_with_send_buffer(
        address: &str,
        server_name: &str,
        tls: Arc<rustls::ClientConfig>,
        meter: Arc<dyn Meter>,
        rate: Rate,
        send_buffer: Option<u32>,
    ) -> Result<Self, ClientError> {
        let mut last = None;
        let mut tcp = None;
        let targets =
            tokio::net::lookup_host(address)
                .await
                .map_err(|source| ClientError::Resolve {
                    address: address.to_string(),
                    source,
                })?;
        for target in targets {
            let socket = if target.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            if let Some(bytes) = send_buffer {
                socket.set_send_buffer_size(bytes)?;
            }
            match socket.connect(target).await {
                Ok(stream) => {
                    tcp = Some(stream);
                    break;
                }
                Err(error) => last = Some(error),
            }
        }
        let tcp: TcpStream = match tcp {
            Some(tcp) => tcp,
            None => {
                return Err(match last {
                    Some(error) => ClientError::Io(error),
                    None => ClientError::Resolve {
                        address: address.to_string(),
                        source: io::Error::new(io::ErrorKind::NotFound, "no address"),
                    },
                });
            }
        };
        tcp.set_nodelay(true)?;
        let metered = MeteredStream::new(tcp, meter, rate);
        let traffic = metered.traffic();
        let name = ServerName::try_from(server_name.to_owned()).map_err(|_| {
            ClientError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("`{server_name}` is not a valid server name"),
            ))
        })?;
        let tls = tokio::time::timeout(
            REPLY_TIMEOUT,
            tokio_rustls::TlsConnector::from(tls).connect(name, metered),
        )
        .await
        .map_err(|_| ClientError::Timeout)??;
        let mut connection = Self {
            tls,
            decoder: FrameDecoder::new(MAX_FRAME_PAYLOAD),
            buffer: vec![0; 64 * 1024],
            out: Vec::new(),
            pieces: Vec::new(),
            traffic,
            piece: MAX_PIECE,
        };
        ClientMessage::Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
        }
        .encode(&mut connection.out);
        connection.flush().await?;
        // TLS 1.3 client authentication fails after the client's side of the
        // handshake ends: the Welcome is what shows that the store accepted us.
        let max_frame = connection
            .receive(|message| match message {
                ServerMessage::Welcome { max_frame, .. } => Ok(max_frame),
                other => Err(other),
            })
            .await?;
        // A piece and its frame header must fit the store's frame limit.
        let room = (max_frame as usize).saturating_sub(64);
        connection.piece = MAX_PIECE.min(room).max(1);
        Ok(connection)
    }

    /// Bytes this connection sent and received, TLS included.
    pub fn traffic(&self) -> Arc<Traffic> {
        Arc::clone(&self.traffic)
    }

    async fn flush(&mut self) -> Result<(), ClientError> {
        let Self {
            tls, out, pieces, ..
        } = self;
        if !pieces.is_empty() {
            // The frames and the object data between them, in one gathering write
            // after another: TLS copies each byte once, into its record.
            let mut slices = Vec::with_capacity(pieces.len() * 2 + 1);
            let mut at = 0;
            for (position, data, range) in pieces.iter() {
                if *position > at {
                    slices.push(io::IoSlice::new(&out[at..*position]));
                    at = *position;
                }
                if !range.is_empty() {
                    slices.push(io::IoSlice::new(&data[range.clone()]));
                }
            }
            if at < out.len() {
                slices.push(io::IoSlice::new(&out[at..]));
            }
            let mut rest = &mut slices[..];
            while !rest.is_empty() {
                let written = tls.write_vectored(rest).await?;
                if written == 0 {
                    return Err(io::Error::from(io::ErrorKind::WriteZero).into());
                }
                io::IoSlice::advance_slices(&mut rest, written);
            }
            out.clear();
            self.pieces.clear();
        } else if !out.is_empty() {
            tls.write_all(out).await?;
            out.clear();
        }
        self.tls.flush().await?;
        Ok(())
    }

    /// Bytes waiting to be sent.
    fn queued(&self) -> usize {
        self.out.len()
            + self
                .pieces
                .iter()
                .map(|(_, _, range)| range.len())
                .sum::<usize>()
    }

    /// Reads the next message and hands it to `accept`; an `Err(message)` from
    /// `accept` becomes [`ClientError::Store`] for an `Error` reply and
    /// [`ClientError::Unexpected`] otherwise.
    async fn receive<T>(
        &mut self,
        accept: impl FnOnce(ServerMessage<'_>) -> Result<T, ServerMessage<'_>>,
    ) -> Result<T, ClientError> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                let message = ServerMessage::decode(frame)?;
                return match accept(message) {
                    Ok(value) => Ok(value),
                    Err(ServerMessage::Error(error)) => Err(ClientError::Store(error)),
                    Err(other) => Err(ClientError::Unexpected(format!("{other:?}"))),
                };
            }
            let read = tokio::time::timeout(REPLY_TIMEOUT, self.tls.read(&mut self.buffer))
                .await
                .map_err(|_| ClientError::Timeout)??;
            if read == 0 {
                return Err(ClientError::Closed);
            }
            self.decoder.push(&self.buffer[..read]);
        }
    }

    /// Which of `ids` the store holds, in order. Asked in as many frames as needed,
    /// all sent before the first answer is read.
    ///
    /// # Errors
    /// Connection failures and store errors.
    pub async fn query(&mut self, ids: &[ObjectId]) -> Result<Vec<ObjectState>, ClientError> {
        for batch in ids.chunks(MAX_IDS_PER_FRAME) {
            ClientMessage::Query {
                ids: batch.to_vec(),
            }
            .encode(&mut self.out);
        }
        self.flush().await?;
        let mut states = Vec::with_capacity(ids.len());
        for batch in ids.chunks(MAX_IDS_PER_FRAME) {
            let answer = self
                .receive(|message| match message {
                    ServerMessage::Present { states } => Ok(states),
                    other => Err(other),
                })
                .await?;
            if answer.len() != batch.len() {
                return Err(ClientError::Unexpected(format!(
                    "{} states for {} ids",
                    answer.len(),
                    batch.len()
                )));
            }
            states.extend(answer);
        }
        Ok(states)
    }

    /// Uploads `pending` objects, each continuing at the offset the store holds,
    /// with up to [`UPLOAD_WINDOW`] bytes unanswered. `load` gives an object's
    /// sealed bytes (the same bytes every time); `stored` is called once per object
    /// as soon as the store says it holds it durably, so that the caller can let go
    /// of it even if a later object fails.
    ///
    /// # Errors
    /// The first refusal ([`ClientError::Refused`]; `StoreFull` among them) or
    /// failure of `load` ([`ClientError::Io`]) after the answers to everything
    /// already sent have been read, or a connection failure. Objects reported to
    /// `stored` before are safe either way.
    pub async fn upload<L, S>(
        &mut self,
        pending: &[Pending],
        mut load: L,
        mut stored: S,
    ) -> Result<UploadSummary, ClientError>
    where
        L: FnMut(&ObjectId) -> io::Result<Vec<u8>>,
        S: FnMut(&ObjectId) -> io::Result<()>,
    {
        let mut summary = UploadSummary::default();
        let mut queue: VecDeque<Pending> = pending.iter().copied().collect();
        // Unanswered objects: bytes sent for each (to shrink the window) and
        // whether it was re-sent after an offset mismatch (once is enough).
        let mut in_flight: HashMap<ObjectId, (usize, bool)> = HashMap::new();
        let mut window = 0_usize;
        let mut first_error: Option<ClientError> = None;
        let mut retried: HashMap<ObjectId, u32> = HashMap::new();
        loop {
            // Send while there is room and nothing failed.
            while first_error.is_none() && window < UPLOAD_WINDOW {
                let Some(next) = queue.pop_front() else { break };
                if in_flight.contains_key(&next.id) {
                    // Already on its way (listed twice).
                    continue;
                }
                // A failure to load (or an object too large) stops the sending,
                // but the answers to what is on its way are still read: the
                // connection stays usable.
                let bytes = match load(&next.id) {
                    Ok(bytes) => bytes,
                    Err(source) => {
                        first_error = Some(ClientError::Load {
                            id: next.id,
                            source,
                        });
                        break;
                    }
                };
                let Ok(total) = u32::try_from(bytes.len()) else {
                    first_error = Some(ClientError::TooLarge {
                        id: next.id,
                        len: bytes.len(),
                    });
                    break;
                };
                let start = (next.held as usize).min(bytes.len());
                if start > 0 {
                    summary.resumed += 1;
                }
                let bytes = Arc::new(bytes);
                let mut offset = start;
                loop {
                    let end = (offset + self.piece).min(bytes.len());
                    ClientMessage::encode_put_header(
                        &next.id,
                        total,
                        offset as u32,
                        end - offset,
                        &mut self.out,
                    );
                    self.pieces
                        .push((self.out.len(), Arc::clone(&bytes), offset..end));
                    offset = end;
                    if offset >= bytes.len() {
                        break;
                    }
                    if self.queued() >= 1 << 20
                        && let Err(error) = self.flush().await
                    {
                        return self.stopped(error, in_flight, &mut stored).await;
                    }
                }
                let sent = bytes.len() - start;
                summary.bytes += sent as u64;
                window += sent.max(1);
                in_flight.insert(next.id, (sent.max(1), false));
            }
            if let Err(error) = self.flush().await {
                return self.stopped(error, in_flight, &mut stored).await;
            }
            if in_flight.is_empty() {
                break;
            }
            // Read answers until there is room again (or all are in).
            let (id, refusal) = self.receive_answer().await?;
            let Some((sent, _)) = in_flight.remove(&id) else {
                // A second answer for an object whose pieces were all refused is
                // possible (one per piece); only the first counts.
                continue;
            };
            window = window.saturating_sub(sent);
            match refusal {
                None => {
                    summary.objects += 1;
                    stored(&id).map_err(|source| ClientError::Record { id, source })?;
                }
                Some(WireError::OffsetMismatch { held, .. }) if first_error.is_none() => {
                    // The store holds a different prefix than `Query` said (a
                    // parallel upload, a restart): continue where it stands, twice
                    // at most.
                    let tries = retried.entry(id).or_insert(0);
                    *tries += 1;
                    if *tries > 2 {
                        first_error = Some(ClientError::Refused {
                            id,
                            error: WireError::OffsetMismatch { id, held },
                        });
                    } else {
                        queue.push_front(Pending { id, held });
                    }
                }
                Some(error) => {
                    first_error.get_or_insert(ClientError::Refused { id, error });
                }
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(summary),
        }
    }

    /// Ends an upload whose sending failed with `error`. When the meter stopped
    /// it (a spent budget, a changed link), what already left is not wasted: the
    /// sending side is closed, so the store sees the end of the input rather than
    /// a reset, stores every whole object that arrived and answers; the answers
    /// are read for up to [`DRAIN_TIMEOUT`] and each `Stored` goes to `stored`.
    /// Receiving cannot be refused, only charged. Returns `error` either way; the
    /// connection cannot send again.
    async fn stopped<S>(
        &mut self,
        error: ClientError,
        mut in_flight: HashMap<ObjectId, (usize, bool)>,
        stored: &mut S,
    ) -> Result<UploadSummary, ClientError>
    where
        S: FnMut(&ObjectId) -> io::Result<()>,
    {
        let ClientError::Io(io_error) = &error else {
            return Err(error);
        };
        if !BudgetExhausted::is(io_error) {
            return Err(error);
        }
        self.out.clear();
        self.pieces.clear();
        let drain = async {
            // Half-close the TCP connection under TLS: no close_notify (that
            // would be sending), just the end of the stream.
            self.tls.get_mut().0.shutdown().await?;
            while !in_flight.is_empty() {
                let (id, refusal) = self.receive_answer().await?;
                // Only the first answer for an object in flight counts.
                if in_flight.remove(&id).is_some() && refusal.is_none() {
                    stored(&id).map_err(|source| ClientError::Record { id, source })?;
                }
            }
            Ok::<(), ClientError>(())
        };
        // Whatever stays unanswered is asked about again by the next run; a
        // failure to record an answer is the caller's and comes first.
        match tokio::time::timeout(DRAIN_TIMEOUT, drain).await {
            Ok(Err(record @ ClientError::Record { .. })) => Err(record),
            _ => Err(error),
        }
    }

    /// The next answer to an upload: `Stored`, or `Refused` with why.
    async fn receive_answer(&mut self) -> Result<(ObjectId, Option<WireError>), ClientError> {
        self.receive(|message| match message {
            ServerMessage::Stored { id } => Ok((id, None)),
            ServerMessage::Refused { id, error } => Ok((id, Some(error))),
            other => Err(other),
        })
        .await
    }

    /// Commits a snapshot: its sealed manifest and the ids it references, on top
    /// of `parent`. With `delta`, `added` are the ids the parent does not
    /// reference and `removed` those of the parent it no longer does; without,
    /// `added` is every id and `removed` must be empty. Ids go in as many frames as
    /// needed. Returns the new head and its sequence number.
    ///
    /// # Errors
    /// [`ClientError::Store`] with `MissingReferences` or `StaleParent` among others.
    pub async fn commit(
        &mut self,
        manifest_id: ObjectId,
        parent: Option<ObjectId>,
        manifest: &[u8],
        delta: bool,
        added: impl IntoIterator<Item = ObjectId>,
        removed: impl IntoIterator<Item = ObjectId>,
    ) -> Result<(ObjectId, u64), ClientError> {
        self.send_ids(added, |ids| ClientMessage::CommitIds { ids })
            .await?;
        self.send_ids(removed, |ids| ClientMessage::CommitRemoved { ids })
            .await?;
        ClientMessage::Commit {
            manifest_id,
            parent,
            delta,
            manifest,
        }
        .encode(&mut self.out);
        self.flush().await?;
        self.receive(|message| match message {
            ServerMessage::Committed { head, sequence } => Ok((head, sequence)),
            other => Err(other),
        })
        .await
    }

    async fn send_ids(
        &mut self,
        ids: impl IntoIterator<Item = ObjectId>,
        message: impl Fn(Vec<ObjectId>) -> ClientMessage<'static>,
    ) -> Result<(), ClientError> {
        let mut batch = Vec::with_capacity(1024);
        for id in ids {
            batch.push(id);
            if batch.len() == MAX_IDS_PER_FRAME {
                message(std::mem::take(&mut batch)).encode(&mut self.out);
                if self.out.len() >= 1 << 20 {
                    self.flush().await?;
                }
            }
        }
        if !batch.is_empty() {
            message(batch).encode(&mut self.out);
        }
        Ok(())
    }

    /// The current head and every kept snapshot, oldest first (in pages).
    ///
    /// # Errors
    /// Connection failures and store errors.
    pub async fn list(&mut self) -> Result<SnapshotList, ClientError> {
        let mut list = SnapshotList::default();
        let mut from = 0;
        loop {
            ClientMessage::List { from }.encode(&mut self.out);
            self.flush().await?;
            let (head, entries, more) = self
                .receive(|message| match message {
                    ServerMessage::Snapshots {
                        head,
                        entries,
                        more,
                    } => Ok((head, entries, more)),
                    other => Err(other),
                })
                .await?;
            list.head = head;
            from = entries.last().map_or(from, |e| e.sequence + 1);
            let empty = entries.is_empty();
            list.entries.extend(entries);
            if !more || empty {
                return Ok(list);
            }
        }
    }

    /// Fetches one object whole.
    ///
    /// # Errors
    /// [`ClientError::Store`] with `ObjectMissing` for an object the store does not
    /// hold for this account.
    pub async fn get(&mut self, id: ObjectId) -> Result<Vec<u8>, ClientError> {
        let mut result = None;
        self.get_many(&[id], |_, bytes| {
            result = Some(bytes);
            Ok(())
        })
        .await?;
        result.ok_or_else(|| ClientError::Unexpected(format!("no bytes for {id}")))
    }

    /// Fetches objects whole, pipelined, calling `deliver` with each in the order
    /// asked. A missing object stops the fetch with [`ClientError::Refused`]
    /// naming it, after the objects before it were delivered.
    ///
    /// # Errors
    /// Connection and store errors, and whatever `deliver` returns.
    pub async fn get_many<D>(&mut self, ids: &[ObjectId], mut deliver: D) -> Result<(), ClientError>
    where
        D: FnMut(ObjectId, Vec<u8>) -> io::Result<()>,
    {
        let mut unanswered = 0_usize;
        let result = self.fetch(ids, &mut deliver, &mut unanswered).await;
        if result.is_err() {
            // Answers still on their way would be taken for the next request's:
            // read them first (unless the connection itself failed).
            while unanswered > 0 {
                if self.receive_object().await.is_err() {
                    break;
                }
                unanswered -= 1;
            }
        }
        result
    }

    async fn fetch<D>(
        &mut self,
        ids: &[ObjectId],
        deliver: &mut D,
        unanswered: &mut usize,
    ) -> Result<(), ClientError>
    where
        D: FnMut(ObjectId, Vec<u8>) -> io::Result<()>,
    {
        // Ask for the first piece of objects ahead while the window allows. An
        // object longer than a piece (a large tree) is finished with requests for
        // the rest; answers to first pieces asked before those wait in `early`.
        let mut asked = 0_usize;
        let mut outstanding: VecDeque<ObjectId> = VecDeque::new();
        let mut early: VecDeque<Answer> = VecDeque::new();
        let mut window = 0_usize;
        let piece = MAX_PIECE as u32;
        loop {
            while asked < ids.len() && (outstanding.is_empty() || window < FETCH_WINDOW) {
                ClientMessage::Get {
                    id: ids[asked],
                    offset: 0,
                    len: piece,
                }
                .encode(&mut self.out);
                *unanswered += 1;
                outstanding.push_back(ids[asked]);
                window += piece as usize;
                asked += 1;
            }
            self.flush().await?;
            let Some(id) = outstanding.pop_front() else {
                return Ok(());
            };
            window = window.saturating_sub(piece as usize);
            let answer = match early.pop_front() {
                Some(answer) => answer,
                None => self.receive_counted(unanswered).await?,
            };
            let (total, mut bytes) = piece_of(answer, id, 0)?;
            while bytes.len() < total as usize {
                let offset = bytes.len() as u32;
                let len = (total - offset).min(piece);
                ClientMessage::Get { id, offset, len }.encode(&mut self.out);
                *unanswered += 1;
                self.flush().await?;
                while early.len() < outstanding.len() {
                    let answer = self.receive_counted(unanswered).await?;
                    early.push_back(answer);
                }
                let answer = self.receive_counted(unanswered).await?;
                let (_, rest) = piece_of(answer, id, offset)?;
                if rest.is_empty() {
                    return Err(ClientError::Unexpected(format!("an empty piece of {id}")));
                }
                bytes.extend_from_slice(&rest);
            }
            deliver(id, bytes)?;
        }
    }

    async fn receive_counted(&mut self, unanswered: &mut usize) -> Result<Answer, ClientError> {
        let answer = self.receive_object().await?;
        *unanswered -= 1;
        Ok(answer)
    }

    async fn receive_object(&mut self) -> Result<Answer, ClientError> {
        self.receive(|message| match message {
            ServerMessage::Object {
                id,
                total,
                offset,
                data,
            } => Ok(Ok((id, total, offset, data.to_vec()))),
            ServerMessage::Error(error) => Ok(Err(error)),
            other => Err(other),
        })
        .await
    }

    /// Usage and quota of the account.
    ///
    /// # Errors
    /// Connection failures and store errors.
    pub async fn usage(&mut self) -> Result<Usage, ClientError> {
        ClientMessage::Usage.encode(&mut self.out);
        self.flush().await?;
        self.receive(|message| match message {
            ServerMessage::UsageReport {
                used,
                objects,
                snapshots,
                soft_limit,
                hard_limit,
            } => Ok(Usage {
                used,
                objects,
                snapshots,
                soft_limit,
                hard_limit,
            }),
            other => Err(other),
        })
        .await
    }

    /// Says goodbye and closes the connection.
    ///
    /// # Errors
    /// Connection failures (the store's data is unaffected).
    pub async fn close(mut self) -> Result<(), ClientError> {
        ClientMessage::Bye.encode(&mut self.out);
        self.flush().await?;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tls.shutdown()).await;
        Ok(())
    }
}
