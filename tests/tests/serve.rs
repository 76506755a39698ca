//! `homing-store serve`: a real server process, real certificates from its CA, TLS
//! 1.3 over loopback, and a client speaking the wire protocol.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::time::Duration;

use homing_crypto::ObjectId;

use super::homing_store as run;
use homing_transfer::proto::{
    ClientMessage, Frame, FrameDecoder, MAX_FRAME_PAYLOAD, ObjectState, PROTOCOL_VERSION,
    ServerMessage, WireError,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A store directory with accounts alice and bob and their credentials.
struct Store {
    home: tempfile::TempDir,
    dir: PathBuf,
}

impl Store {
    fn new() -> Self {
        let home = tempfile::tempdir().expect("a temporary directory");
        let dir = home.path().join("store");
        let d = dir.to_str().expect("UTF-8 path").to_string();
        run(&["init", &d]);
        for account in ["alice", "bob"] {
            run(&["account", "add", account, "--store", &d, "--hard", "1M"]);
            let prefix = home.path().join(account);
            run(&[
                "ca",
                "issue",
                account,
                "--store",
                &d,
                "--out",
                prefix.to_str().expect("UTF-8"),
            ]);
        }
        Self { home, dir }
    }

    fn credentials(&self, account: &str) -> PathBuf {
        self.home.path().join(account)
    }

    fn start(&self) -> Server {
        let (child, address) = super::serve(&self.dir, "warn", None);
        Server { child, address }
    }
}

struct Server {
    child: Child,
    address: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client connection speaking the protocol.
struct Connection {
    tls: TlsStream<TcpStream>,
    decoder: FrameDecoder,
}

fn client_config(credentials: &Path, ca: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(ca).expect("CA certificate"))
        .expect("a CA certificate");
    let with = |suffix: &str| {
        let mut name = credentials.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };
    let chain = vec![CertificateDer::from_pem_file(with(".crt")).expect("client certificate")];
    let key = PrivateKeyDer::from_pem_file(with(".key")).expect("client key");
    let mut config =
        rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .expect("a valid client certificate");
    config.alpn_protocols = vec![b"homing/1".to_vec()];
    Arc::new(config)
}

impl Connection {
    async fn open(address: SocketAddr, config: Arc<rustls::ClientConfig>) -> std::io::Result<Self> {
        let tcp = TcpStream::connect(address).await?;
        let name = ServerName::try_from("localhost").expect("a valid name");
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        // TLS 1.3 client authentication fails after the client's handshake ends;
        // the Hello round trip is what shows whether the server accepted us.
        let mut hello = Vec::new();
        ClientMessage::Hello {
            min_version: PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
        }
        .encode(&mut hello);
        tls.write_all(&hello).await?;
        let mut connection = Self {
            tls,
            decoder: FrameDecoder::new(MAX_FRAME_PAYLOAD),
        };
        let welcomed = connection
            .receive(|m| matches!(m, ServerMessage::Welcome { version, .. } if version == PROTOCOL_VERSION))
            .await?;
        if !welcomed {
            return Err(std::io::Error::other("no Welcome"));
        }
        Ok(connection)
    }

    async fn send(&mut self, messages: &[ClientMessage<'_>]) -> std::io::Result<()> {
        let mut bytes = Vec::new();
        for message in messages {
            message.encode(&mut bytes);
        }
        self.tls.write_all(&bytes).await?;
        self.tls.flush().await
    }

    /// Sends an object whole, in one piece, and requires its Stored.
    async fn put_whole(&mut self, object: ObjectId, data: &[u8]) {
        self.send(&[ClientMessage::Put {
            id: object,
            total: data.len() as u32,
            offset: 0,
            data,
        }])
        .await
        .expect("the Put is sent");
        let stored = self
            .receive(|m| match m {
                ServerMessage::Stored { id } => id,
                other => panic!("{other:?}"),
            })
            .await
            .expect("a reply to the Put");
        assert_eq!(stored, object);
    }

    /// Asks which of `ids` the store holds.
    async fn query(&mut self, ids: Vec<ObjectId>) -> Vec<ObjectState> {
        self.send(&[ClientMessage::Query { ids }])
            .await
            .expect("the Query is sent");
        self.receive(|m| match m {
            ServerMessage::Present { states } => states,
            other => panic!("{other:?}"),
        })
        .await
        .expect("a reply to the Query")
    }

    async fn receive<T>(&mut self, f: impl FnOnce(ServerMessage<'_>) -> T) -> std::io::Result<T> {
        loop {
            if let Some(frame) = self.decoder.next_frame().map_err(std::io::Error::other)? {
                let frame = Frame {
                    kind: frame.kind,
                    payload: frame.payload,
                };
                let message = ServerMessage::decode(frame).map_err(std::io::Error::other)?;
                return Ok(f(message));
            }
            let mut buffer = [0_u8; 16 * 1024];
            let read = tokio::time::timeout(Duration::from_secs(20), self.tls.read(&mut buffer))
                .await
                .map_err(|_| std::io::Error::other("no reply within 20 s"))??;
            if read == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.decoder.push(&buffer[..read]);
        }
    }
}

fn id(n: u8) -> ObjectId {
    ObjectId::from_bytes([n; 32])
}

fn object(n: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8) ^ n).collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

#[test]
fn upload_query_read_commit_list_over_mutual_tls() {
    let store = Store::new();
    let server = store.start();
    let config = client_config(&store.credentials("alice"), &store.dir.join("ca/ca.crt"));
    runtime().block_on(async {
        let mut c = Connection::open(server.address, config)
            .await
            .expect("alice connects");
        let objects: Vec<(ObjectId, Vec<u8>)> = (1..=20)
            .map(|n| (id(n), object(n, 1000 + usize::from(n) * 100)))
            .collect();
        // Pipelined: every object in pieces, one write, then the replies.
        let mut messages = vec![ClientMessage::Query {
            ids: objects.iter().map(|(i, _)| *i).collect(),
        }];
        for (object_id, bytes) in &objects {
            let total = bytes.len() as u32;
            for (k, piece) in bytes.chunks(700).enumerate() {
                messages.push(ClientMessage::Put {
                    id: *object_id,
                    total,
                    offset: (k * 700) as u32,
                    data: piece,
                });
            }
        }
        c.send(&messages).await.unwrap();
        let states = c
            .receive(|m| match m {
                ServerMessage::Present { states } => states,
                other => panic!("{other:?}"),
            })
            .await
            .unwrap();
        assert!(states.iter().all(|s| *s == ObjectState::Missing));
        for (object_id, _) in &objects {
            let stored = c
                .receive(|m| match m {
                    ServerMessage::Stored { id } => id,
                    other => panic!("{other:?}"),
                })
                .await
                .unwrap();
            assert_eq!(stored, *object_id, "one Stored per object, in upload order");
        }
        // Whole objects in one piece each are stored together (group commit).
        let whole: Vec<(ObjectId, Vec<u8>)> = (21..=30).map(|n| (id(n), object(n, 3000))).collect();
        let puts: Vec<ClientMessage<'_>> = whole
            .iter()
            .map(|(object_id, bytes)| ClientMessage::Put {
                id: *object_id,
                total: bytes.len() as u32,
                offset: 0,
                data: bytes,
            })
            .collect();
        c.send(&puts).await.unwrap();
        for (object_id, _) in &whole {
            let stored = c
                .receive(|m| match m {
                    ServerMessage::Stored { id } => id,
                    other => panic!("{other:?}"),
                })
                .await
                .unwrap();
            assert_eq!(stored, *object_id);
        }
        let objects: Vec<(ObjectId, Vec<u8>)> = objects.into_iter().chain(whole).collect();
        // Read every object back, byte for byte.
        for (object_id, bytes) in &objects {
            c.send(&[ClientMessage::Get {
                id: *object_id,
                offset: 0,
                len: 100_000,
            }])
            .await
            .unwrap();
            let got = c
                .receive(|m| match m {
                    ServerMessage::Object { data, total, .. } => (total, data.to_vec()),
                    other => panic!("{other:?}"),
                })
                .await
                .unwrap();
            assert_eq!(got, (bytes.len() as u32, bytes.clone()));
        }
        // Commit a snapshot referencing them all; a second commit must follow the head.
        let ids: Vec<ObjectId> = objects.iter().map(|(i, _)| *i).collect();
        assert_eq!(ids.len(), 30);
        c.send(&[
            ClientMessage::CommitIds { ids: ids.clone() },
            ClientMessage::Commit {
                manifest_id: id(200),
                parent: None,
                delta: false,
                manifest: b"sealed manifest",
            },
            ClientMessage::Commit {
                manifest_id: id(201),
                parent: None,
                delta: false,
                manifest: b"stale",
            },
            ClientMessage::CommitIds { ids: vec![id(99)] },
            ClientMessage::Commit {
                manifest_id: id(202),
                parent: Some(id(200)),
                delta: false,
                manifest: b"next",
            },
            ClientMessage::List { from: 0 },
            ClientMessage::Usage,
        ])
        .await
        .unwrap();
        let committed = c
            .receive(|m| match m {
                ServerMessage::Committed { head, sequence } => (head, sequence),
                other => panic!("{other:?}"),
            })
            .await
            .unwrap();
        assert_eq!(committed, (id(200), 1));
        let stale = c
            .receive(|m| match m {
                ServerMessage::Error(WireError::StaleParent { head }) => head,
                other => panic!("{other:?}"),
            })
            .await
            .unwrap();
        assert_eq!(stale, Some(id(200)));
        let missing = c
            .receive(|m| match m {
                ServerMessage::Error(WireError::MissingReferences { ids }) => ids,
                other => panic!("{other:?}"),
            })
            .await
            .unwrap();
        assert_eq!(missing, vec![id(99)]);
        let listed = c
            .receive(|m| match m {
                ServerMessage::Snapshots {
                    head,
                    entries,
                    more,
                } => (head, entries.len(), more),
                other => panic!("{other:?}"),
            })
            .await
            .unwrap();
        assert_eq!(listed, (Some(id(200)), 1, false));
        let used = c
            .receive(|m| match m {
                ServerMessage::UsageReport {
                    used,
                    objects,
                    snapshots,
                    ..
                } => (used, objects, snapshots),
                other => panic!("{other:?}"),
            })
            .await
            .unwrap();
        // The objects, two manifests charged at least MIN_CHARGE (46 bytes) each,
        // and the committed snapshot's 30 references at 32 bytes each.
        let objects_bytes: u64 = objects.iter().map(|(_, b)| b.len() as u64).sum();
        let expected = objects_bytes + 46 + 46 + 30 * 32;
        assert_eq!(used, (expected, 32, 1));
    });
}

#[test]
fn a_cut_upload_resumes_at_the_offset_the_server_confirms_even_after_kill_9() {
    let store = Store::new();
    let config = client_config(&store.credentials("alice"), &store.dir.join("ca/ca.crt"));
    let bytes = object(7, 200_000);
    let mut server = store.start();
    runtime().block_on(async {
        let mut c = Connection::open(server.address, Arc::clone(&config))
            .await
            .unwrap();
        let pieces: Vec<ClientMessage<'_>> = bytes[..120_000]
            .chunks(10_000)
            .enumerate()
            .map(|(k, data)| ClientMessage::Put {
                id: id(7),
                total: 200_000,
                offset: (k * 10_000) as u32,
                data,
            })
            .collect();
        c.send(&pieces).await.unwrap();
        // Make sure the server took them: a Query is answered after the pieces.
        let state = c.query(vec![id(7)]).await[0];
        assert_eq!(state, ObjectState::Partial(120_000));
        // The connection is cut: dropped without a word.
    });
    // The server dies without warning and comes back.
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let server = store.start();
    runtime().block_on(async {
        let mut c = Connection::open(server.address, config).await.unwrap();
        let state = c.query(vec![id(7)]).await[0];
        let ObjectState::Partial(held) = state else {
            panic!("{state:?}")
        };
        assert_eq!(held, 120_000, "nothing taken was lost");
        // A piece from the start again is refused with the offset to resume at.
        c.send(&[ClientMessage::Put {
            id: id(7),
            total: 200_000,
            offset: 0,
            data: &bytes[..10],
        }])
        .await
        .unwrap();
        let refused = c
            .receive(|m| match m {
                ServerMessage::Refused {
                    error: WireError::OffsetMismatch { held, .. },
                    ..
                } => held,
                other => panic!("{other:?}"),
            })
            .await
            .unwrap();
        assert_eq!(refused, 120_000);
        let rest: Vec<ClientMessage<'_>> = bytes[120_000..]
            .chunks(10_000)
            .enumerate()
            .map(|(k, data)| ClientMessage::Put {
                id: id(7),
                total: 200_000,
                offset: (120_000 + k * 10_000) as u32,
                data,
            })
            .collect();
        c.send(&rest).await.unwrap();
        c.receive(|m| assert!(matches!(m, ServerMessage::Stored { .. }), "{m:?}"))
            .await
            .unwrap();
        let mut back = Vec::new();
        for offset in (0..200_000).step_by(65_536) {
            c.send(&[ClientMessage::Get {
                id: id(7),
                offset,
                len: 65_536,
            }])
            .await
            .unwrap();
            back.extend(
                c.receive(|m| match m {
                    ServerMessage::Object { data, .. } => data.to_vec(),
                    other => panic!("{other:?}"),
                })
                .await
                .unwrap(),
            );
        }
        assert_eq!(back, bytes);
    });
}

#[test]
fn accounts_are_isolated_and_bad_certificates_are_refused() {
    let store = Store::new();
    let server = store.start();
    let ca = store.dir.join("ca/ca.crt");
    let alice = client_config(&store.credentials("alice"), &ca);
    let bob = client_config(&store.credentials("bob"), &ca);
    // A client whose certificate comes from another store's CA.
    let other = Store::new();
    let foreign = client_config(&other.credentials("alice"), &ca);
    runtime().block_on(async {
        let mut a = Connection::open(server.address, Arc::clone(&alice))
            .await
            .unwrap();
        a.put_whole(id(9), b"abc").await;

        let mut b = Connection::open(server.address, bob).await.unwrap();
        b.send(&[
            ClientMessage::Query { ids: vec![id(9)] },
            ClientMessage::Get {
                id: id(9),
                offset: 0,
                len: 3,
            },
        ])
        .await
        .unwrap();
        let state = b
            .receive(|m| match m {
                ServerMessage::Present { states } => states[0],
                other => panic!("{other:?}"),
            })
            .await
            .unwrap();
        assert_eq!(state, ObjectState::Missing, "bob cannot see alice's object");
        b.receive(|m| {
            assert!(
                matches!(m, ServerMessage::Error(WireError::ObjectMissing { .. })),
                "{m:?}"
            )
        })
        .await
        .unwrap();

        assert!(
            Connection::open(server.address, foreign).await.is_err(),
            "a foreign CA's certificate is refused"
        );

        // A certificate that has expired (valid for 0 days: it ended as it began).
        let d = store.dir.to_str().unwrap();
        run(&["account", "add", "carol", "--store", d]);
        let carol = store.home.path().join("carol");
        run(&[
            "ca",
            "issue",
            "carol",
            "--store",
            d,
            "--out",
            carol.to_str().unwrap(),
            "--days",
            "0",
        ]);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let expired = client_config(&carol, &ca);
        assert!(
            Connection::open(server.address, expired).await.is_err(),
            "an expired certificate is refused"
        );

        // The operator changes bob's quota while the server runs: the next upload
        // sees it, and storing objects does not overwrite it.
        run(&["account", "set-quota", "bob", "--store", d, "--hard", "100"]);
        b.send(&[ClientMessage::Put {
            id: id(10),
            total: 200,
            offset: 0,
            data: &[1; 200],
        }])
        .await
        .unwrap();
        b.receive(|m| {
            assert!(
                matches!(
                    m,
                    ServerMessage::Refused {
                        error: WireError::StoreFull { limit: 100, .. },
                        ..
                    }
                ),
                "{m:?}"
            )
        })
        .await
        .unwrap();
        b.put_whole(id(11), &[2; 50]).await;
        let info = run(&["account", "info", "bob", "--store", d, "--json"]);
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(
            (info["hard_limit"].as_u64(), info["used"].as_u64()),
            (Some(100), Some(50))
        );

        // No client certificate at all.
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(&ca).unwrap())
            .unwrap();
        let anonymous =
            rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
                .with_root_certificates(roots)
                .with_no_client_auth();
        assert!(
            Connection::open(server.address, Arc::new(anonymous))
                .await
                .is_err(),
            "no certificate, no session"
        );

        // Revocation while the server runs: the open session is closed and new
        // handshakes fail.
        run(&[
            "ca",
            "revoke",
            "alice",
            "--store",
            store.dir.to_str().unwrap(),
        ]);
        tokio::time::sleep(Duration::from_secs(3)).await;
        a.send(&[ClientMessage::Usage]).await.ok();
        assert!(
            a.receive(|_| ()).await.is_err(),
            "the revoked session is closed"
        );
        assert!(
            Connection::open(server.address, alice).await.is_err(),
            "a revoked certificate is refused"
        );
    });
}

#[test]
fn hostile_bytes_end_only_their_own_session() {
    let store = Store::new();
    let server = store.start();
    let config = client_config(&store.credentials("alice"), &store.dir.join("ca/ca.crt"));
    runtime().block_on(async {
        // A frame that claims 2^63 bytes.
        let mut c = Connection::open(server.address, Arc::clone(&config))
            .await
            .unwrap();
        c.tls
            .write_all(&[
                0x03, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01,
            ])
            .await
            .unwrap();
        c.receive(|m| {
            assert!(
                matches!(m, ServerMessage::Error(WireError::Malformed { .. })),
                "{m:?}"
            )
        })
        .await
        .unwrap();
        assert!(c.receive(|_| ()).await.is_err(), "then the server closes");
        // Garbage.
        let mut c = Connection::open(server.address, Arc::clone(&config))
            .await
            .unwrap();
        c.tls.write_all(&[0x7e; 300]).await.unwrap();
        c.receive(|m| assert!(matches!(m, ServerMessage::Error(_)), "{m:?}"))
            .await
            .unwrap();
        // Raw TCP that never speaks TLS, a thousand times over from another
        // loopback address: the server keeps that address to its share, stays
        // up, and a real client still gets in at once.
        let mut idle = Vec::new();
        for _ in 0..1000 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            idle.push(socket.connect(server.address).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let open = idle
            .iter()
            .filter(|stream| {
                let mut byte = [0_u8; 1];
                matches!(stream.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            })
            .count();
        // homing_store::server::MAX_CONNECTIONS_PER_SOURCE
        assert!(
            open <= 32,
            "{open} idle connections from one address stay open"
        );
        let start = tokio::time::Instant::now();
        let mut c = Connection::open(server.address, config)
            .await
            .expect("the server still serves");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "a real client waited {:?}",
            start.elapsed()
        );
        c.send(&[ClientMessage::Usage]).await.unwrap();
        c.receive(|m| assert!(matches!(m, ServerMessage::UsageReport { .. })))
            .await
            .unwrap();
        drop(idle);
    });
}

/// The authorisation matrix: every operation against own objects, another
/// account's and unknown ids, with valid, revoked, expired, foreign and absent
/// certificates. Only the owner, with a valid certificate, reaches its objects.
#[test]
fn authorisation_matrix() {
    let store = Store::new();
    let d = store.dir.to_str().unwrap().to_string();
    let ca = store.dir.join("ca/ca.crt");
    // dave is revoked and erin's certificate has expired before the server starts.
    for account in ["dave", "erin"] {
        run(&["account", "add", account, "--store", &d]);
        let days = if account == "erin" { "0" } else { "30" };
        let prefix = store.credentials(account);
        run(&[
            "ca",
            "issue",
            account,
            "--store",
            &d,
            "--out",
            prefix.to_str().unwrap(),
            "--days",
            days,
        ]);
    }
    run(&["ca", "revoke", "dave", "--store", &d]);
    std::thread::sleep(Duration::from_millis(1100));
    let server = store.start();
    let other = Store::new();
    runtime().block_on(async {
        let (own, others, unknown) = (id(1), id(2), id(3));
        let mut alice = Connection::open(
            server.address,
            client_config(&store.credentials("alice"), &ca),
        )
        .await
        .unwrap();
        let mut bob = Connection::open(
            server.address,
            client_config(&store.credentials("bob"), &ca),
        )
        .await
        .unwrap();
        alice.put_whole(own, b"alice").await;
        bob.send(&[
            ClientMessage::Put {
                id: others,
                total: 3,
                offset: 0,
                data: b"bob",
            },
            ClientMessage::Commit {
                manifest_id: id(9),
                parent: None,
                delta: false,
                manifest: b"bob's snapshot",
            },
        ])
        .await
        .unwrap();
        bob.receive(|m| assert!(matches!(m, ServerMessage::Stored { .. })))
            .await
            .unwrap();
        bob.receive(|m| assert!(matches!(m, ServerMessage::Committed { .. }), "{m:?}"))
            .await
            .unwrap();

        // Query: only alice's own object is present to her.
        let states = alice.query(vec![own, others, unknown]).await;
        assert_eq!(
            states,
            vec![
                ObjectState::Stored,
                ObjectState::Missing,
                ObjectState::Missing
            ]
        );
        // Get: own succeeds, the other's and unknown ids are missing.
        for (target, allowed) in [(own, true), (others, false), (unknown, false)] {
            alice
                .send(&[ClientMessage::Get {
                    id: target,
                    offset: 0,
                    len: 10,
                }])
                .await
                .unwrap();
            let got = alice
                .receive(|m| matches!(m, ServerMessage::Object { .. }))
                .await
                .unwrap();
            assert_eq!(got, allowed, "Get {target}");
        }
        // Put: an id bob uses becomes alice's own object; bob's stays bob's.
        alice.put_whole(others, b"ALICE").await;
        bob.send(&[ClientMessage::Get {
            id: others,
            offset: 0,
            len: 10,
        }])
        .await
        .unwrap();
        let bobs = bob
            .receive(|m| match m {
                ServerMessage::Object { data, .. } => data.to_vec(),
                other => panic!("{other:?}"),
            })
            .await
            .unwrap();
        assert_eq!(bobs, b"bob", "alice cannot overwrite bob's object");
        // Commit: referencing an id only bob holds, or an unknown one, is refused.
        for target in [id(9), unknown] {
            alice
                .send(&[
                    ClientMessage::CommitIds {
                        ids: vec![own, target],
                    },
                    ClientMessage::Commit {
                        manifest_id: id(20),
                        parent: None,
                        delta: false,
                        manifest: b"alice's snapshot",
                    },
                ])
                .await
                .unwrap();
            alice
                .receive(|m| {
                    assert!(
                        matches!(m, ServerMessage::Error(WireError::MissingReferences { .. })),
                        "{m:?}"
                    )
                })
                .await
                .unwrap();
        }
        // List and Usage show alice her own account only.
        alice
            .send(&[ClientMessage::List { from: 0 }, ClientMessage::Usage])
            .await
            .unwrap();
        let listed = alice
            .receive(|m| match m {
                ServerMessage::Snapshots { head, entries, .. } => (head, entries.len()),
                other => panic!("{other:?}"),
            })
            .await
            .unwrap();
        assert_eq!(listed, (None, 0), "bob's snapshot is not alice's");
        let objects = alice
            .receive(|m| match m {
                ServerMessage::UsageReport { objects, .. } => objects,
                other => panic!("{other:?}"),
            })
            .await
            .unwrap();
        assert_eq!(
            objects, 3,
            "own, the id bob also uses, and the refused commits' manifest"
        );

        // Every other kind of certificate gets no session at all, so no operation.
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(&ca).unwrap())
            .unwrap();
        let anonymous =
            rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
                .with_root_certificates(roots)
                .with_no_client_auth();
        let refused = [
            ("revoked", client_config(&store.credentials("dave"), &ca)),
            ("expired", client_config(&store.credentials("erin"), &ca)),
            (
                "foreign CA",
                client_config(&other.credentials("alice"), &ca),
            ),
            ("no certificate", Arc::new(anonymous)),
        ];
        for (what, config) in refused {
            assert!(
                Connection::open(server.address, config).await.is_err(),
                "{what} was let in"
            );
        }
    });
}

#[test]
fn a_second_server_on_the_same_store_refuses_to_start() {
    let store = Store::new();
    let _first = store.start();
    let second = std::process::Command::new(homing_e2e::binary("homing-store"))
        .args(["serve", "--store"])
        .arg(&store.dir)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .expect("homing-store runs");
    assert!(!second.status.success());
    let message = String::from_utf8_lossy(&second.stderr);
    assert!(
        message.contains("another `homing-store serve` on this store"),
        "{message}"
    );
}

#[test]
fn parallel_uploads_over_the_quota_stay_within_it_and_each_refusal_says_store_full() {
    let store = Store::new();
    let server = store.start();
    let config = client_config(&store.credentials("alice"), &store.dir.join("ca/ca.crt"));
    const CONNECTIONS: u8 = 8;
    const OBJECTS: u8 = 30;
    const LEN: usize = 10_000;
    let (stored, refused) = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(async {
            let mut tasks = Vec::new();
            let address = server.address;
            for c in 0..CONNECTIONS {
                let config = Arc::clone(&config);
                tasks.push(tokio::spawn(async move {
                    let mut connection = Connection::open(address, config)
                        .await
                        .expect("alice connects");
                    let objects: Vec<(ObjectId, Vec<u8>)> = (0..OBJECTS)
                        .map(|n| {
                            let mut bytes = object(n, LEN);
                            bytes[0] = c;
                            let mut raw = [0xee; 32];
                            raw[0] = c;
                            raw[1] = n;
                            (ObjectId::from_bytes(raw), bytes)
                        })
                        .collect();
                    // Half whole (batched), half in two pieces (the resumable path).
                    let mut messages = Vec::new();
                    for (n, (object_id, bytes)) in objects.iter().enumerate() {
                        if n % 2 == 0 {
                            messages.push(ClientMessage::Put {
                                id: *object_id,
                                total: LEN as u32,
                                offset: 0,
                                data: bytes,
                            });
                        } else {
                            for (k, piece) in bytes.chunks(LEN / 2).enumerate() {
                                messages.push(ClientMessage::Put {
                                    id: *object_id,
                                    total: LEN as u32,
                                    offset: (k * LEN / 2) as u32,
                                    data: piece,
                                });
                            }
                        }
                    }
                    connection.send(&messages).await.expect("sent");
                    let (mut stored, mut refused) = (0_u64, 0_u64);
                    let mut answered = std::collections::HashSet::new();
                    while answered.len() < usize::from(OBJECTS) {
                        let (object_id, outcome) = connection
                            .receive(|m| match m {
                                ServerMessage::Stored { id } => (id, None),
                                ServerMessage::Refused { id, error } => (id, Some(error)),
                                other => panic!("{other:?}"),
                            })
                            .await
                            .expect("an answer");
                        if !answered.insert(object_id) {
                            // The second piece of a refused upload is refused too.
                            continue;
                        }
                        match outcome {
                            None => stored += 1,
                            Some(WireError::StoreFull { .. }) => refused += 1,
                            Some(other) => panic!("{object_id}: {other:?}"),
                        }
                    }
                    (stored, refused)
                }));
            }
            let mut totals = (0, 0);
            for task in tasks {
                let (s, r) = task.await.expect("the task ends");
                totals.0 += s;
                totals.1 += r;
            }
            totals
        });
    drop(server);
    assert_eq!(
        stored + refused,
        u64::from(CONNECTIONS) * u64::from(OBJECTS)
    );
    assert!(refused > 0, "the uploads were meant to exceed the quota");
    let info: serde_json::Value = serde_json::from_str(&run(&[
        "account",
        "info",
        "alice",
        "--store",
        store.dir.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    let used = info["used"].as_u64().unwrap();
    assert!(used <= 1 << 20, "{info}");
    assert_eq!(info["objects"].as_u64().unwrap(), stored, "{info}");
}
