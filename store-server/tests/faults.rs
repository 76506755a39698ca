//! Storage faults injected through the storage trait, under a real TLS server and
//! a real client: the client gets an error for what failed, every object the
//! store acknowledged stays readable, and `check` passes afterwards.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use homing_crypto::ObjectId;
use homing_store::backend::{Fault, FaultyBackend, LocalBackend};
use homing_store::objects::ObjectStore;
use homing_store::server::Server;
use homing_transfer::client::{self, ClientError, Connection, Pending};
use homing_transfer::proto::ObjectState;
use homing_transfer::stream::{Rate, Unmetered};

fn store_cmd(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_homing-store"))
        .args(args)
        .output()
        .expect("homing-store runs");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn object(n: u8, len: usize) -> (ObjectId, Vec<u8>) {
    let bytes: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31) ^ n).collect();
    (ObjectId::from_bytes([n; 32]), bytes)
}

/// A store with the account `alice`, its server (not yet listening) over a
/// fault-injecting backend, and alice's client credentials.
struct Alice {
    _home: tempfile::TempDir,
    server: Arc<Server<FaultyBackend<LocalBackend>>>,
    tls: Arc<rustls::ClientConfig>,
}

impl Alice {
    fn new() -> Self {
        let home = tempfile::tempdir().expect("a temporary directory");
        let dir = home.path().join("store");
        let d = dir.to_str().expect("UTF-8");
        store_cmd(&["init", d]);
        store_cmd(&["account", "add", "alice", "--store", d]);
        let prefix = home.path().join("alice");
        let p = prefix.to_str().expect("UTF-8");
        store_cmd(&["ca", "issue", "alice", "--store", d, "--out", p]);
        let backend = FaultyBackend::new(
            LocalBackend::open(&dir.join("segments")).expect("the segments open"),
        );
        let store = ObjectStore::open(&dir, backend).expect("the store opens");
        let server = Arc::new(Server::new(&dir, store).expect("a server"));
        let tls = client::tls_config(
            Path::new(&format!("{p}-ca.crt")),
            Path::new(&format!("{p}.crt")),
            Path::new(&format!("{p}.key")),
        )
        .expect("credentials");
        Self {
            _home: home,
            server,
            tls,
        }
    }

    fn runtime(&self) -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime")
    }

    /// Starts the server on loopback: its address and its task.
    async fn serve(&self) -> (String, tokio::task::JoinHandle<std::io::Result<()>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port");
        let address = listener.local_addr().expect("an address").to_string();
        let serving =
            tokio::spawn(Arc::clone(&self.server).serve(listener, std::future::pending::<()>()));
        (address, serving)
    }

    async fn connect(&self, address: &str) -> Connection {
        Connection::connect(
            address,
            "localhost",
            Arc::clone(&self.tls),
            Arc::new(Unmetered),
            Rate::unlimited(),
        )
        .await
        .expect("connected")
    }
}

async fn upload(
    connection: &mut Connection,
    objects: &[(ObjectId, Vec<u8>)],
) -> Result<Vec<ObjectId>, ClientError> {
    let (stored, result) = upload_some(connection, objects).await;
    result.map(|()| stored)
}

/// Uploads `objects`: the ids the store acknowledged, also when the upload
/// failed part-way, and how it ended.
async fn upload_some(
    connection: &mut Connection,
    objects: &[(ObjectId, Vec<u8>)],
) -> (Vec<ObjectId>, Result<(), ClientError>) {
    let pending: Vec<Pending> = objects
        .iter()
        .map(|(id, _)| Pending { id: *id, held: 0 })
        .collect();
    let mut stored = Vec::new();
    let result = connection
        .upload(
            &pending,
            |id| {
                Ok(objects
                    .iter()
                    .find(|(i, _)| i == id)
                    .expect("an object of the test")
                    .1
                    .clone())
            },
            |id| {
                stored.push(*id);
                Ok(())
            },
        )
        .await
        .map(|_| ());
    (stored, result)
}

#[test]
fn no_space_io_errors_and_torn_writes_lose_nothing_acknowledged() {
    let alice = Alice::new();
    let server = &alice.server;
    alice.runtime().block_on(async {
        let (address, serving) = alice.serve().await;
        let mut connection = alice.connect(&address).await;
        let good: Vec<_> = (1..=5).map(|n| object(n, 20_000)).collect();
        let acknowledged = upload(&mut connection, &good).await.expect("stored");
        assert_eq!(acknowledged.len(), 5);
        for (n, fault) in [(21, Fault::NoSpace), (22, Fault::Io), (23, Fault::Torn)] {
            server.store().backend().plan([Some(fault)]);
            let failing = vec![object(n, 30_000)];
            let error = upload(&mut connection, &failing)
                .await
                .expect_err("the fault reaches the client");
            assert!(
                matches!(error, ClientError::Refused { id, .. } if id == failing[0].0),
                "{fault:?}: {error}"
            );
            // The connection goes on; the same object goes through afterwards.
            let again = upload(&mut connection, &failing).await.expect("stored");
            assert_eq!(again, vec![failing[0].0]);
        }
        // Everything acknowledged reads back whole.
        for (id, bytes) in &good {
            assert_eq!(&connection.get(*id).await.expect("readable"), bytes);
        }
        for n in [21, 22, 23] {
            let (id, bytes) = object(n, 30_000);
            assert_eq!(connection.get(id).await.expect("readable"), bytes);
        }
        serving.abort();
    });
    let report = server.store().check(false).expect("check runs");
    assert!(report.damaged.is_empty(), "{:?}", report.damaged);
    assert!(report.lost.is_empty(), "{:?}", report.lost);
    assert_eq!(report.objects, 8);
}

/// Grants `left` bytes in all, then nothing: a budget that runs out mid-upload.
struct Allowance(std::sync::atomic::AtomicUsize);

impl homing_transfer::stream::Meter for Allowance {
    fn reserve(&self, want: usize) -> usize {
        use std::sync::atomic::Ordering;
        let mut left = self.0.load(Ordering::SeqCst);
        loop {
            let granted = want.min(left);
            match self
                .0
                .compare_exchange(left, left - granted, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return granted,
                Err(now) => left = now,
            }
        }
    }
    fn settle(&self, reserved: usize, sent: usize) {
        self.0
            .fetch_add(reserved - sent, std::sync::atomic::Ordering::SeqCst);
    }
    fn received(&self, _bytes: usize) {}
}

#[test]
fn a_budget_spent_mid_upload_wastes_nothing_that_arrived_whole() {
    let alice = Alice::new();
    let (server, tls) = (&alice.server, &alice.tls);
    alice.runtime().block_on(async {
        let (address, serving) = alice.serve().await;
        let objects: Vec<_> = (1..=40).map(|n| object(n, 20_000)).collect();
        let ids: Vec<ObjectId> = objects.iter().map(|(id, _)| *id).collect();
        // 300 kB: the handshake and about a dozen objects, then the budget is
        // spent in the middle of a TLS record.
        let mut connection = Connection::connect(
            &address,
            "localhost",
            Arc::clone(tls),
            Arc::new(Allowance(300_000.into())),
            Rate::unlimited(),
        )
        .await
        .expect("connected");
        let (mut acknowledged, result) = upload_some(&mut connection, &objects).await;
        let error = result.expect_err("the budget runs out");
        assert!(
            matches!(&error, ClientError::Io(e) if homing_transfer::stream::BudgetExhausted::is(e)),
            "{error}"
        );
        drop(connection);
        // Most of what was sent arrived whole, was stored and answered.
        assert!(acknowledged.len() >= 8, "{}", acknowledged.len());
        let mut fresh = alice.connect(&address).await;
        let states = fresh.query(&ids).await.expect("answered");
        let held: Vec<ObjectId> = ids
            .iter()
            .zip(&states)
            .filter(|(_, s)| **s == ObjectState::Stored)
            .map(|(id, _)| *id)
            .collect();
        // The client heard of every object the store holds: none stays in
        // its spool to be asked about again.
        acknowledged.sort();
        assert_eq!(acknowledged, held);
        for id in &held {
            let bytes = &objects.iter().find(|(i, _)| i == id).expect("ours").1;
            assert_eq!(&fresh.get(*id).await.expect("readable"), bytes);
        }
        serving.abort();
    });
    // The record cut in the middle left nothing half-written behind.
    let report = server.store().check(false).expect("check runs");
    assert!(report.damaged.is_empty(), "{:?}", report.damaged);
    assert!(report.lost.is_empty(), "{:?}", report.lost);
}

#[test]
fn every_frame_is_answered_once_and_in_order_around_batches() {
    use homing_transfer::proto::{
        ClientMessage, FrameDecoder, MAX_FRAME_PAYLOAD, PROTOCOL_VERSION, ServerMessage,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let alice = Alice::new();
    alice.runtime().block_on(async {
        let (address, serving) = alice.serve().await;
        let tcp = tokio::net::TcpStream::connect(&address)
            .await
            .expect("connected");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
        let mut tls = tokio_rustls::TlsConnector::from(Arc::clone(&alice.tls))
            .connect(name, tcp)
            .await
            .expect("a handshake");
        let objects: Vec<_> = (1..=5).map(|n| object(n, 3_000)).collect();
        let put = |n: usize, out: &mut Vec<u8>| {
            let (id, data) = &objects[n - 1];
            ClientMessage::Put {
                id: *id,
                total: data.len() as u32,
                offset: 0,
                data,
            }
            .encode(out);
        };
        let query = |out: &mut Vec<u8>| {
            ClientMessage::Query {
                ids: vec![objects[0].0],
            }
            .encode(out);
        };
        // One write: whole objects, then a request, then whole objects again.
        let mut out = Vec::new();
        ClientMessage::Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
        }
        .encode(&mut out);
        put(1, &mut out);
        put(2, &mut out);
        query(&mut out);
        put(3, &mut out);
        put(4, &mut out);
        tls.write_all(&out).await.expect("sent");
        // The input runs dry: 3 and 4 go to be stored. Then more.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        out.clear();
        put(5, &mut out);
        query(&mut out);
        ClientMessage::Bye.encode(&mut out);
        tls.write_all(&out).await.expect("sent");
        let mut answers = Vec::new();
        let mut decoder = FrameDecoder::new(MAX_FRAME_PAYLOAD);
        let mut buffer = vec![0; 64 * 1024];
        loop {
            while let Some(frame) = decoder.next_frame().expect("well-formed") {
                answers.push(match ServerMessage::decode(frame).expect("a message") {
                    ServerMessage::Welcome { .. } => "welcome".to_string(),
                    ServerMessage::Stored { id } => {
                        let n = objects.iter().position(|(i, _)| *i == id).expect("ours") + 1;
                        format!("stored {n}")
                    }
                    ServerMessage::Present { .. } => "present".to_string(),
                    other => format!("{other:?}"),
                });
            }
            let read = tls.read(&mut buffer).await.unwrap_or(0);
            if read == 0 {
                break;
            }
            decoder.push(&buffer[..read]);
        }
        assert_eq!(
            answers,
            [
                "welcome", "stored 1", "stored 2", "present", "stored 3", "stored 4", "stored 5",
                "present"
            ],
        );
        serving.abort();
    });
}
