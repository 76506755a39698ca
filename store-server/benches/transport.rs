//! Transport benchmark: the protocol over loopback TLS against raw TLS, in one run.
//!
//! ```text
//! cargo bench -p homing-store --bench transport [-- --mib 64 --rounds 5]
//! cargo bench -p homing-store --bench transport -- --only raw|bare|upload
//! ```
//!
//! `--only` runs one kind of round and prints each, for a profiler.
//!
//! An in-process store server (the real one: TLS 1.3, client certificates, object
//! store on this machine's disk) and a client on loopback. It prints:
//! - handshake bytes, full and resumed (TLS session ticket), each way, including
//!   the Hello/Welcome exchange: the target is ≤ 1 KiB client-to-server resumed;
//! - raw TLS throughput: the same TLS configuration carrying bytes that are thrown
//!   away, the baseline;
//! - a *bare store*: raw TLS whose receiver also hashes, appends and syncs what
//!   arrives, as the store must, with no protocol at all. It shows what storing
//!   costs on this machine, apart from the protocol;
//! - bulk upload throughput: 64 KiB objects, one Put each, pipelined, every one
//!   stored durably before its Stored comes back (target ≥ 80 % of raw TLS);
//! - bytes on the wire per object and the framing overhead (target ≤ 2 %);
//! - bytes of a batched "which of these do you have" for 1000 ids.

#![allow(clippy::disallowed_types)] // measuring wall time is the point here
#![allow(missing_docs, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use homing_crypto::ObjectId;
use homing_store::backend::LocalBackend;
use homing_store::ca::Ca;
use homing_store::objects::ObjectStore;
use homing_store::server::{Server, tls_config};
use homing_transfer::proto::{
    ClientMessage, FrameDecoder, MAX_FRAME_PAYLOAD, PROTOCOL_VERSION, ServerMessage,
};
use homing_transfer::stream::{MeteredStream, Rate, Traffic, Unmetered};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const OBJECT: usize = 64 * 1024;

/// CPU time this process (client and server alike) has used, user and system.
fn cpu_seconds() -> f64 {
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).unwrap();
    let seconds = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    seconds(usage.user_time()) + seconds(usage.system_time())
}

/// Counts the bytes that cross a connection, each way, TLS records included: the
/// client's own metered stream, with no budget and no rate limit.
struct Meter {
    traffic: Arc<Traffic>,
}

impl Meter {
    fn read(&self) -> (u64, u64) {
        (self.traffic.sent(), self.traffic.received())
    }
}

type Tls = tokio_rustls::client::TlsStream<MeteredStream<TcpStream>>;

async fn connect(address: SocketAddr, config: Arc<rustls::ClientConfig>) -> (Tls, Meter) {
    let tcp = TcpStream::connect(address).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let metered = MeteredStream::new(tcp, Arc::new(Unmetered), Rate::unlimited());
    let meter = Meter {
        traffic: metered.traffic(),
    };
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), metered)
        .await
        .unwrap();
    (tls, meter)
}

async fn hello(tls: &mut Tls, decoder: &mut FrameDecoder) {
    let mut out = Vec::new();
    ClientMessage::Hello {
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
    }
    .encode(&mut out);
    tls.write_all(&out).await.unwrap();
    next(tls, decoder, |m| {
        assert!(matches!(m, ServerMessage::Welcome { .. }), "{m:?}")
    })
    .await;
}

async fn next<T>(
    tls: &mut (impl AsyncRead + Unpin),
    decoder: &mut FrameDecoder,
    f: impl FnOnce(ServerMessage<'_>) -> T,
) -> T {
    loop {
        if let Some(frame) = decoder.next_frame().unwrap() {
            return f(ServerMessage::decode(frame).unwrap());
        }
        let mut buffer = [0_u8; 64 * 1024];
        let n = tls.read(&mut buffer).await.unwrap();
        assert!(n > 0, "the server closed the connection");
        decoder.push(&buffer[..n]);
    }
}

fn client_config(prefix: &Path, ca: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca).unwrap())
        .unwrap();
    let chain = vec![CertificateDer::from_pem_file(prefix.with_extension("crt")).unwrap()];
    let key = PrivateKeyDer::from_pem_file(prefix.with_extension("key")).unwrap();
    let mut config =
        rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
    config.alpn_protocols = vec![b"homing/1".to_vec()];
    Arc::new(config)
}

/// One round of raw TLS: `total` bytes in 64 KiB writes over a fresh connection
/// of the same TLS configuration, thrown away on arrival. MB/s, CPU-ms per MB
/// (client and server together), bytes on the wire.
///
/// With `store`, a *bare store*: the receiver also does what the store must do
/// with what arrives, and nothing else. It gathers 1 MiB, then hands the batch to
/// a blocking thread that hashes every 64 KiB object with BLAKE3, appends the
/// batch to a file in `store` and syncs it, while the next batch gathers. That is
/// an upload with no protocol at all: no frames, no index, no answers. Of the
/// shapes tried on this machine it was the fastest: 8 MiB batches (the server's
/// largest group commit), hashing on the receiving thread, or everything on that
/// one thread were each 5 to 30 % slower.
async fn raw_round(
    raw_config: Arc<rustls::ServerConfig>,
    config: Arc<rustls::ClientConfig>,
    total: usize,
    store: Option<&Path>,
) -> (f64, f64, u64) {
    let raw_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let raw_address = raw_listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(raw_config);
    let segment_path = store.map(|dir| dir.join("bare-segment"));
    let segment = segment_path
        .as_ref()
        .map(|path| std::fs::File::create(path).unwrap());
    let server = tokio::spawn(async move {
        let (tcp, _) = raw_listener.accept().await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let total = match segment {
            None => discard(&mut tls).await,
            Some(file) => store_bare(&mut tls, file).await,
        };
        tls.write_all(&total.to_le_bytes()).await.unwrap();
        tls.shutdown().await.unwrap();
    });
    let payload: Vec<u8> = (0..OBJECT).map(|i| (i * 31 % 251) as u8).collect();
    let (mut tls, meter) = connect(raw_address, config).await;
    let cpu_before = cpu_seconds();
    let start = Instant::now();
    for _ in 0..total / OBJECT {
        tls.write_all(&payload).await.unwrap();
    }
    tls.shutdown().await.unwrap();
    let mut confirm = [0_u8; 8];
    tls.read_exact(&mut confirm).await.unwrap();
    let seconds = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    assert_eq!(u64::from_le_bytes(confirm), total as u64);
    server.await.unwrap();
    if let Some(path) = segment_path {
        std::fs::remove_file(path).unwrap();
    }
    let mb = total as f64 / 1e6;
    (mb / seconds, 1000.0 * cpu / mb, meter.read().0)
}

/// Raw TLS's receiver: reads to the end and throws the bytes away. How many.
async fn discard(tls: &mut (impl AsyncRead + Unpin)) -> u64 {
    let mut buffer = vec![0_u8; 256 * 1024];
    let mut total = 0_u64;
    loop {
        let n = tls.read(&mut buffer).await.unwrap();
        if n == 0 {
            return total;
        }
        total += n as u64;
    }
}

/// The bare store's receiver: reads to the end, and each 1 MiB that gathers goes
/// to a blocking thread that hashes its objects, appends it to `file` and syncs,
/// while the next gathers. How many bytes.
async fn store_bare(tls: &mut (impl AsyncRead + Unpin), file: std::fs::File) -> u64 {
    const BATCH: usize = 1 << 20;
    fn store(mut batch: Vec<u8>, mut file: std::fs::File) -> (Vec<u8>, std::fs::File) {
        use std::io::Write;
        for object in batch.chunks(OBJECT) {
            std::hint::black_box(blake3::hash(object));
        }
        file.write_all(&batch).unwrap();
        file.sync_data().unwrap();
        batch.clear();
        (batch, file)
    }
    let mut batch = Vec::with_capacity(BATCH + 256 * 1024);
    let mut spare = Vec::with_capacity(BATCH + 256 * 1024);
    let mut file = Some(file);
    let mut storing: Option<tokio::task::JoinHandle<(Vec<u8>, std::fs::File)>> = None;
    let mut total = 0_u64;
    loop {
        // Never past the capacity: a batch is sent on once it holds 1 MiB.
        let n = tls.read_buf(&mut batch).await.unwrap();
        total += n as u64;
        if batch.len() >= BATCH || (n == 0 && !batch.is_empty()) {
            if let Some(handle) = storing.take() {
                let (back, stored_to) = handle.await.unwrap();
                spare = back;
                file = Some(stored_to);
            }
            let full = std::mem::replace(&mut batch, std::mem::take(&mut spare));
            let to = file.take().expect("the file is back from the last batch");
            storing = Some(tokio::task::spawn_blocking(move || store(full, to)));
        }
        if n == 0 {
            break;
        }
    }
    if let Some(handle) = storing {
        drop(handle.await.unwrap());
    }
    total
}

/// One round of upload: `total` bytes as 64 KiB objects (new ids each round),
/// one Put each, pipelined, sent as the client sends them, every one stored
/// durably before its Stored comes back. MB/s, CPU-ms per MB (client and server
/// together), bytes on the wire after the handshake.
async fn upload_round(
    address: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    total: usize,
    round: u64,
) -> (f64, f64, u64) {
    let payload: Vec<u8> = (0..OBJECT).map(|i| (i * 31 % 251) as u8).collect();
    let count = total / OBJECT;
    let (tls, meter) = connect(address, config).await;
    let (mut reader, mut writer) = tokio::io::split(tls);
    let mut decoder = FrameDecoder::new(MAX_FRAME_PAYLOAD);
    let mut out = Vec::new();
    ClientMessage::Hello {
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
    }
    .encode(&mut out);
    writer.write_all(&out).await.unwrap();
    next(&mut reader, &mut decoder, |m| {
        assert!(matches!(m, ServerMessage::Welcome { .. }))
    })
    .await;
    let (handshake_up, _) = meter.read();
    let cpu_before = cpu_seconds();
    let start = Instant::now();
    let acks = tokio::spawn(async move {
        for _ in 0..count {
            next(&mut reader, &mut decoder, |m| {
                assert!(matches!(m, ServerMessage::Stored { .. }), "{m:?}")
            })
            .await;
        }
    });
    // As the client sends: frame headers, with each object's bytes gathered
    // from where they lie, about 1 MiB per write. (The store does not check
    // contents against ids, so every object may carry the same bytes.)
    const PER_WRITE: usize = 16;
    let mut n = 0;
    while n < count {
        let batch = PER_WRITE.min(count - n);
        out.clear();
        let mut ends = Vec::with_capacity(batch);
        for k in 0..batch {
            let mut id = [0_u8; 32];
            id[..8].copy_from_slice(&((n + k) as u64).to_le_bytes());
            id[8..16].copy_from_slice(&round.to_le_bytes());
            ClientMessage::encode_put_header(
                &ObjectId::from_bytes(id),
                OBJECT as u32,
                0,
                OBJECT,
                &mut out,
            );
            ends.push(out.len());
        }
        let mut slices = Vec::with_capacity(2 * batch);
        let mut at = 0;
        for end in ends {
            slices.push(std::io::IoSlice::new(&out[at..end]));
            slices.push(std::io::IoSlice::new(&payload));
            at = end;
        }
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            let written = writer.write_vectored(rest).await.unwrap();
            std::io::IoSlice::advance_slices(&mut rest, written);
        }
        n += batch;
    }
    writer.flush().await.unwrap();
    acks.await.unwrap();
    let seconds = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    let mb = total as f64 / 1e6;
    (
        mb / seconds,
        1000.0 * cpu / mb,
        meter.read().0 - handshake_up,
    )
}

/// Touches `bytes` of fresh memory once and gives it back. On a virtual machine
/// the host backs a guest page only when it is first touched, which costs far
/// more than a copy: without this, whichever round first needs new memory for
/// the page cache (the store's segments) pays for it, and the rounds drift apart
/// by a factor of three.
fn warm_memory(bytes: usize) {
    let mut memory = vec![0_u8; bytes];
    for page in memory.chunks_mut(4096) {
        page[0] = 1;
    }
    std::hint::black_box(&memory);
}

/// The median round by throughput: its MB/s, CPU-ms per MB and bytes.
fn median_round(rounds: &[(f64, f64, u64)]) -> (f64, f64, u64) {
    let mut sorted = rounds.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    sorted[sorted.len() / 2]
}

fn main() {
    let mut mib = 64_usize;
    let mut rounds = 5_u64;
    let mut only = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--mib" => mib = args.next().and_then(|v| v.parse().ok()).expect("--mib N"),
            "--rounds" => {
                rounds = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--rounds N")
            }
            "--only" => only = args.next(),
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    let home = tempfile::tempdir().unwrap();
    let home_path = home.path().to_path_buf();
    let dir = home.path().join("store");
    std::fs::create_dir_all(&dir).unwrap();
    let ca = Ca::create(&dir, &[], &[]).unwrap();
    let store =
        ObjectStore::open(&dir, LocalBackend::open(&dir.join("segments")).unwrap()).unwrap();
    store.add_account("bench", 0, 0).unwrap();
    let credentials = ca.issue("bench", 30).unwrap();
    let prefix = home.path().join("bench");
    std::fs::write(prefix.with_extension("crt"), &credentials.cert_pem).unwrap();
    std::fs::write(
        prefix.with_extension("key"),
        credentials.key_pem.as_ref().unwrap(),
    )
    .unwrap();
    let config = client_config(&prefix, &dir.join("ca/ca.crt"));
    let server = Arc::new(Server::new(&dir, store).unwrap());
    let ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().unwrap();
    let raw_config = tls_config(&dir, &ticketer).unwrap();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(Arc::clone(&server).serve(listener, std::future::pending()));

        // Handshakes: a full one, then one resumed with the ticket it left.
        let mut rows = Vec::new();
        for label in ["full", "resumed"] {
            let (mut tls, meter) = connect(address, Arc::clone(&config)).await;
            let mut decoder = FrameDecoder::new(MAX_FRAME_PAYLOAD);
            hello(&mut tls, &mut decoder).await;
            let kind = tls.get_ref().1.handshake_kind();
            let (up, down) = meter.read();
            rows.push((label, up, down, kind));
            // Close politely, so that the ticket is stored and the next one resumes.
            let mut out = Vec::new();
            ClientMessage::Bye.encode(&mut out);
            tls.write_all(&out).await.unwrap();
            let mut rest = Vec::new();
            let _ = tls.read_to_end(&mut rest).await;
        }
        println!("handshake + Hello/Welcome, bytes on the wire (TLS records included):");
        for (label, up, down, kind) in &rows {
            println!("  {label:<8} client→server {up:>6}  server→client {down:>6}   ({kind:?})");
        }

        let total = mib * 1024 * 1024;
        warm_memory(total * (rounds as usize + 1) + (512 << 20));
        if let Some(only) = only.as_deref() {
            // For a profiler: only one kind of round, each printed.
            for round in 0..rounds {
                let (rate, cpu, _) = match only {
                    "raw" => {
                        raw_round(Arc::clone(&raw_config), Arc::clone(&config), total, None).await
                    }
                    "bare" => {
                        raw_round(Arc::clone(&raw_config), Arc::clone(&config), total, Some(&dir))
                            .await
                    }
                    "upload" => upload_round(address, Arc::clone(&config), total, round).await,
                    other => panic!("--only raw|bare|upload, not {other}"),
                };
                println!("  {only} round {round}: {rate:.1} MB/s ({cpu:.2} CPU-ms/MB)");
            }
            return;
        }
        // Raw TLS, the bare store and the upload, in alternating rounds: this
        // machine's speed wanders from one second to the next, so each figure is
        // the median of its rounds, and each round's ratios are printed too.
        let (mut raw, mut bare, mut upload) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            raw.push(raw_round(Arc::clone(&raw_config), Arc::clone(&config), total, None).await);
            bare.push(
                raw_round(Arc::clone(&raw_config), Arc::clone(&config), total, Some(&dir)).await,
            );
            upload.push(upload_round(address, Arc::clone(&config), total, round).await);
        }
        let (raw_rate, raw_cpu, raw_up) = median_round(&raw);
        let (upload_rate, upload_cpu, wire) = median_round(&upload);
        let (bare_rate, bare_cpu, _) = median_round(&bare);
        let per_object = wire as f64 / (total / OBJECT) as f64;
        // A batched query of 1000 ids.
        let (mut tls, meter) = connect(address, Arc::clone(&config)).await;
        let mut decoder = FrameDecoder::new(MAX_FRAME_PAYLOAD);
        hello(&mut tls, &mut decoder).await;
        let before = meter.read();
        let ids: Vec<ObjectId> = (0..1000_u64)
            .map(|n| {
                let mut id = [0_u8; 32];
                id[..8].copy_from_slice(&n.to_le_bytes());
                ObjectId::from_bytes(id)
            })
            .collect();
        let mut out = Vec::new();
        ClientMessage::Query { ids }.encode(&mut out);
        tls.write_all(&out).await.unwrap();
        next(&mut tls, &mut decoder, |m| assert!(matches!(m, ServerMessage::Present { .. }))).await;
        let after = meter.read();

        // The disk's own ceiling for what the upload must do: append and sync, in
        // batches of 8 MiB as the server's group commit does at most.
        let disk_path = home_path.join("disk-baseline");
        let start = Instant::now();
        {
            use std::io::Write;
            let mut file = std::fs::File::create(&disk_path).unwrap();
            let chunk = vec![0x5a_u8; 8 * 1024 * 1024];
            let mut written = 0;
            while written < total {
                let n = chunk.len().min(total - written);
                file.write_all(&chunk[..n]).unwrap();
                file.sync_data().unwrap();
                written += n;
            }
        }
        let disk_rate = total as f64 / 1e6 / start.elapsed().as_secs_f64();
        std::fs::remove_file(&disk_path).unwrap();

        println!("\nthroughput over loopback ({mib} MiB, 64 KiB objects; medians of {rounds} alternating rounds):");
        for (n, ((r, b), u)) in raw.iter().zip(&bare).zip(&upload).enumerate() {
            println!(
                "  round {n}: raw TLS {:.1} MB/s ({:.2} CPU-ms/MB); bare store {:.1} MB/s ({:.2}) = {:.1} %; upload {:.1} MB/s ({:.2}) = {:.1} %, {:.1} % of the bare store",
                r.0, r.1, b.0, b.1, 100.0 * b.0 / r.0, u.0, u.1, 100.0 * u.0 / r.0,
                100.0 * u.0 / b.0,
            );
        }
        println!("  disk           {disk_rate:>8.1} MB/s  (8 MiB appends, each synced: the ceiling for durable storage here)");
        println!("  raw TLS        {raw_rate:>8.1} MB/s  ({raw_up} bytes on the wire for {total}); CPU (both ends) {raw_cpu:.2} ms/MB");
        println!(
            "  bare store     {bare_rate:>8.1} MB/s  = {:.1} % of raw TLS; CPU (both ends) {bare_cpu:.2} ms/MB  (raw TLS whose receiver also hashes and appends every object, in synced 1 MiB batches on a second thread: an upload with no protocol)",
            100.0 * bare_rate / raw_rate,
        );
        println!(
            "  upload         {upload_rate:>8.1} MB/s  = {:.1} % of raw TLS (target >= 80 %), {:.1} % of the bare store, {:.1} % of the disk's ceiling; CPU (both ends) {upload_cpu:.2} ms/MB",
            100.0 * upload_rate / raw_rate,
            100.0 * upload_rate / bare_rate,
            100.0 * upload_rate / disk_rate.min(raw_rate),
        );
        println!(
            "  what it costs  {:>8.2} CPU-ms/MB to store (bare store - raw TLS), {:.2} for the protocol and the store's bookkeeping (upload - bare store)",
            bare_cpu - raw_cpu,
            upload_cpu - bare_cpu,
        );
        println!("  per object     {per_object:>8.0} bytes on the wire for {OBJECT}: overhead {:.2} % (target <= 2 %)", 100.0 * (per_object - OBJECT as f64) / OBJECT as f64);
        println!("\nQuery of 1000 ids: client→server {} bytes, server→client {} bytes", after.0 - before.0, after.1 - before.1);
    });
}
