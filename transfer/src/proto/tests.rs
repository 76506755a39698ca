//! Round trips, canonical encodings and hostile bytes for the protocol codec.

use homing_crypto::ObjectId;
use proptest::prelude::*;

use super::*;

fn id() -> impl Strategy<Value = ObjectId> {
    any::<[u8; 32]>().prop_map(ObjectId::from_bytes)
}

fn ids() -> impl Strategy<Value = Vec<ObjectId>> {
    proptest::collection::vec(id(), 0..40)
}

fn piece() -> impl Strategy<Value = (u32, u32, Vec<u8>)> {
    (
        proptest::collection::vec(any::<u8>(), 0..600),
        any::<u32>(),
        any::<u32>(),
    )
        .prop_map(|(data, a, b)| {
            let total = (data.len() as u32).saturating_add(a % 100_000);
            let offset = b % (total - data.len() as u32 + 1);
            (total, offset, data)
        })
}

/// Owned client messages (the codec borrows piece data from the frame).
#[derive(Debug, Clone)]
enum Client {
    Hello(u16, u16),
    Query(Vec<ObjectId>),
    Put(ObjectId, u32, u32, Vec<u8>),
    CommitIds(Vec<ObjectId>),
    CommitRemoved(Vec<ObjectId>),
    Commit(ObjectId, Option<ObjectId>, bool, Vec<u8>),
    List(u64),
    Get(ObjectId, u32, u32),
    Usage,
    Bye,
}

impl Client {
    fn message(&self) -> ClientMessage<'_> {
        match self {
            Self::Hello(a, b) => ClientMessage::Hello {
                min_version: *a,
                max_version: *b,
            },
            Self::Query(ids) => ClientMessage::Query { ids: ids.clone() },
            Self::Put(id, total, offset, data) => ClientMessage::Put {
                id: *id,
                total: *total,
                offset: *offset,
                data,
            },
            Self::CommitIds(ids) => ClientMessage::CommitIds { ids: ids.clone() },
            Self::CommitRemoved(ids) => ClientMessage::CommitRemoved { ids: ids.clone() },
            Self::Commit(id, parent, delta, manifest) => ClientMessage::Commit {
                manifest_id: *id,
                parent: *parent,
                delta: *delta,
                manifest,
            },
            Self::List(from) => ClientMessage::List { from: *from },
            Self::Get(id, offset, len) => ClientMessage::Get {
                id: *id,
                offset: *offset,
                len: *len,
            },
            Self::Usage => ClientMessage::Usage,
            Self::Bye => ClientMessage::Bye,
        }
    }
}

fn client() -> impl Strategy<Value = Client> {
    prop_oneof![
        (any::<u16>(), any::<u16>()).prop_map(|(a, b)| Client::Hello(a.min(b), a.max(b))),
        ids().prop_map(Client::Query),
        (id(), piece()).prop_map(|(id, (t, o, d))| Client::Put(id, t, o, d)),
        ids().prop_map(Client::CommitIds),
        ids().prop_map(Client::CommitRemoved),
        (
            id(),
            proptest::option::of(id()),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..300)
        )
            // A delta needs a parent to be a delta of.
            .prop_map(|(i, p, d, m)| Client::Commit(i, p, d && p.is_some(), m)),
        any::<u64>().prop_map(Client::List),
        (id(), any::<u32>(), 0..=MAX_PIECE as u32).prop_map(|(i, o, l)| Client::Get(i, o, l)),
        Just(Client::Usage),
        Just(Client::Bye),
    ]
}

#[derive(Debug, Clone)]
enum Server {
    Welcome(u16, u32),
    Present(Vec<ObjectState>),
    Stored(ObjectId),
    Refused(ObjectId, WireError),
    Committed(ObjectId, u64),
    Snapshots(Option<ObjectId>, Vec<SnapshotEntry>, bool),
    Object(ObjectId, u32, u32, Vec<u8>),
    Usage([u64; 5]),
    Error(WireError),
}

impl Server {
    fn message(&self) -> ServerMessage<'_> {
        match self {
            Self::Welcome(v, m) => ServerMessage::Welcome {
                version: *v,
                max_frame: *m,
            },
            Self::Present(states) => ServerMessage::Present {
                states: states.clone(),
            },
            Self::Stored(id) => ServerMessage::Stored { id: *id },
            Self::Refused(id, error) => ServerMessage::Refused {
                id: *id,
                error: error.clone(),
            },
            Self::Committed(head, sequence) => ServerMessage::Committed {
                head: *head,
                sequence: *sequence,
            },
            Self::Snapshots(head, entries, more) => ServerMessage::Snapshots {
                head: *head,
                entries: entries.clone(),
                more: *more,
            },
            Self::Object(id, total, offset, data) => ServerMessage::Object {
                id: *id,
                total: *total,
                offset: *offset,
                data,
            },
            Self::Usage([used, objects, snapshots, soft_limit, hard_limit]) => {
                ServerMessage::UsageReport {
                    used: *used,
                    objects: *objects,
                    snapshots: *snapshots,
                    soft_limit: *soft_limit,
                    hard_limit: *hard_limit,
                }
            }
            Self::Error(error) => ServerMessage::Error(error.clone()),
        }
    }
}

fn state() -> impl Strategy<Value = ObjectState> {
    prop_oneof![
        Just(ObjectState::Stored),
        Just(ObjectState::Missing),
        (1..=u32::MAX).prop_map(ObjectState::Partial),
    ]
}

fn wire_error() -> impl Strategy<Value = WireError> {
    prop_oneof![
        (any::<u64>(), any::<u64>()).prop_map(|(used, limit)| WireError::StoreFull { used, limit }),
        Just(WireError::NotAuthorised),
        id().prop_map(|id| WireError::ObjectMissing { id }),
        (any::<u16>(), any::<u16>()).prop_map(|(min, max)| WireError::VersionMismatch { min, max }),
        (id(), any::<u32>()).prop_map(|(id, held)| WireError::OffsetMismatch { id, held }),
        ids().prop_map(|ids| WireError::MissingReferences { ids }),
        proptest::option::of(id()).prop_map(|head| WireError::StaleParent { head }),
        "\\PC{0,200}".prop_map(|message| WireError::Malformed { message }),
        "\\PC{0,200}".prop_map(|message| WireError::Internal { message }),
    ]
}

fn server() -> impl Strategy<Value = Server> {
    let entry =
        (id(), any::<u64>(), any::<u64>()).prop_map(|(id, sequence, committed_at)| SnapshotEntry {
            id,
            sequence,
            committed_at,
        });
    prop_oneof![
        (any::<u16>(), any::<u32>()).prop_map(|(v, m)| Server::Welcome(v, m)),
        proptest::collection::vec(state(), 0..100).prop_map(Server::Present),
        id().prop_map(Server::Stored),
        (id(), wire_error()).prop_map(|(id, e)| Server::Refused(id, e)),
        (id(), any::<u64>()).prop_map(|(h, s)| Server::Committed(h, s)),
        (
            proptest::option::of(id()),
            proptest::collection::vec(entry, 0..20),
            any::<bool>()
        )
            .prop_map(|(h, e, m)| {
                let more = m && !e.is_empty();
                Server::Snapshots(h, e, more)
            }),
        (id(), piece()).prop_map(|(id, (t, o, d))| Server::Object(id, t, o, d)),
        any::<[u64; 5]>().prop_map(Server::Usage),
        wire_error().prop_map(Server::Error),
    ]
}

fn one_frame(bytes: &[u8]) -> Frame<'_> {
    let mut decoder = FrameDecoder::new(MAX_FRAME_PAYLOAD);
    decoder.push(bytes);
    let (kind, len) = {
        let frame = decoder.next_frame().unwrap().unwrap();
        (frame.kind, frame.payload.len())
    };
    assert_eq!(decoder.buffered(), 0, "one frame, whole");
    // Borrow from the caller's bytes so the decoder can go.
    Frame {
        kind,
        payload: &bytes[bytes.len() - len..],
    }
}

proptest! {
    #[test]
    fn a_put_header_and_its_data_are_the_put_frame(
        id in any::<[u8; 32]>(),
        total in any::<u32>(),
        offset in any::<u32>(),
        data in proptest::collection::vec(any::<u8>(), 0..3000),
        big in any::<bool>(),
    ) {
        // Lengths whose varint takes one, two and three bytes.
        let data = if big { vec![7; MAX_PIECE.min(200_000)] } else { data };
        let id = ObjectId::from_bytes(id);
        let mut whole = Vec::new();
        ClientMessage::Put { id, total, offset, data: &data }.encode(&mut whole);
        let mut split = Vec::new();
        ClientMessage::encode_put_header(&id, total, offset, data.len(), &mut split);
        split.extend_from_slice(&data);
        prop_assert_eq!(split, whole);
    }

    #[test]
    fn client_messages_round_trip(message in client()) {
        let mut bytes = Vec::new();
        message.message().encode(&mut bytes);
        prop_assert_eq!(ClientMessage::decode(one_frame(&bytes)).unwrap(), message.message());
    }

    #[test]
    fn server_messages_round_trip(message in server()) {
        let mut bytes = Vec::new();
        message.message().encode(&mut bytes);
        prop_assert_eq!(ServerMessage::decode(one_frame(&bytes)).unwrap(), message.message());
    }

    /// Whatever decodes re-encodes to the very same bytes: one encoding per message.
    #[test]
    fn arbitrary_frames_never_panic_and_decode_canonically(kind: u8, payload in proptest::collection::vec(any::<u8>(), 0..400)) {
        let frame = Frame { kind, payload: &payload };
        let mut original = Vec::new();
        let at = frame::begin_frame(&mut original, kind);
        original.extend_from_slice(&payload);
        frame::end_frame(&mut original, at);
        if let Ok(message) = ClientMessage::decode(frame) {
            let mut again = Vec::new();
            message.encode(&mut again);
            prop_assert_eq!(&again, &original);
        }
        if let Ok(message) = ServerMessage::decode(frame) {
            let mut again = Vec::new();
            message.encode(&mut again);
            prop_assert_eq!(&again, &original);
        }
    }
}

#[test]
fn framing_overhead_is_small_for_64_kib_pieces() {
    let data = vec![7_u8; 64 * 1024];
    let mut bytes = Vec::new();
    ClientMessage::Put {
        id: ObjectId::from_bytes([1; 32]),
        total: 1 << 20,
        offset: 1 << 19,
        data: &data,
    }
    .encode(&mut bytes);
    let overhead = bytes.len() - data.len();
    // type 1 + length 3 + id 32 + total 3 + offset 3
    assert_eq!(overhead, 42);
    assert!((overhead as f64) / (data.len() as f64) < 0.001);
}

#[test]
fn a_query_costs_a_bit_per_answer() {
    let ids: Vec<ObjectId> = (0..1000_u32)
        .map(|i| ObjectId::from_bytes([i as u8; 32]))
        .collect();
    let mut query = Vec::new();
    ClientMessage::Query { ids: ids.clone() }.encode(&mut query);
    // type, length (3 bytes), count (2 bytes), ids
    assert_eq!(query.len(), 1 + 3 + 2 + 32_000);
    let states: Vec<ObjectState> = (0..1000)
        .map(|i| {
            if i % 3 == 0 {
                ObjectState::Stored
            } else {
                ObjectState::Missing
            }
        })
        .collect();
    let mut reply = Vec::new();
    ServerMessage::Present { states }.encode(&mut reply);
    // type, length (2 bytes), count (2 bytes), 1000 bits, no partial uploads
    assert_eq!(reply.len(), 1 + 2 + 2 + 125 + 1);
}

#[test]
fn lists_longer_than_the_limits_are_refused() {
    // 16 001 ids fit in a frame's bytes but exceed the per-frame limit.
    let mut payload = Vec::new();
    wire::put_varint(&mut payload, MAX_IDS_PER_FRAME as u64 + 1);
    payload.extend(std::iter::repeat_n(0_u8, (MAX_IDS_PER_FRAME + 1) * 32));
    let frame = Frame {
        kind: 0x02,
        payload: &payload,
    };
    assert!(matches!(
        ClientMessage::decode(frame),
        Err(ProtocolError::Malformed(_))
    ));
    let manifest = vec![0_u8; MAX_MANIFEST + 1];
    let mut payload = vec![0_u8; 34];
    payload.extend_from_slice(&manifest);
    let frame = Frame {
        kind: 0x05,
        payload: &payload,
    };
    assert!(matches!(
        ClientMessage::decode(frame),
        Err(ProtocolError::Malformed(_))
    ));
}

#[test]
fn an_empty_version_range_and_empty_partials_are_refused() {
    let frame = Frame {
        kind: 0x01,
        payload: &[2, 1],
    };
    assert!(matches!(
        ClientMessage::decode(frame),
        Err(ProtocolError::Malformed(_))
    ));
    // One state, not stored, one partial at index 0 with offset 0.
    let frame = Frame {
        kind: 0x82,
        payload: &[1, 0, 1, 0, 0],
    };
    assert!(matches!(
        ServerMessage::decode(frame),
        Err(ProtocolError::Malformed(_))
    ));
    let mut bytes = Vec::new();
    ServerMessage::Present {
        states: vec![ObjectState::Partial(0)],
    }
    .encode(&mut bytes);
    assert_eq!(
        ServerMessage::decode(one_frame(&bytes)).unwrap(),
        ServerMessage::Present {
            states: vec![ObjectState::Missing]
        }
    );
}

#[test]
fn directions_do_not_mix() {
    let mut bytes = Vec::new();
    ServerMessage::Stored {
        id: ObjectId::from_bytes([0; 32]),
    }
    .encode(&mut bytes);
    assert_eq!(
        ClientMessage::decode(one_frame(&bytes)),
        Err(ProtocolError::UnknownType(0x83))
    );
    let mut bytes = Vec::new();
    ClientMessage::Bye.encode(&mut bytes);
    assert_eq!(
        ServerMessage::decode(one_frame(&bytes)),
        Err(ProtocolError::UnknownType(0x09))
    );
}

#[test]
fn pieces_past_the_end_and_oversized_gets_are_refused() {
    let mut bytes = Vec::new();
    ClientMessage::Put {
        id: ObjectId::from_bytes([0; 32]),
        total: 10,
        offset: 8,
        data: b"ab",
    }
    .encode(&mut bytes);
    assert!(ClientMessage::decode(one_frame(&bytes)).is_ok());
    let mut bytes = Vec::new();
    ClientMessage::Put {
        id: ObjectId::from_bytes([0; 32]),
        total: 10,
        offset: 9,
        data: b"ab",
    }
    .encode(&mut bytes);
    assert!(matches!(
        ClientMessage::decode(one_frame(&bytes)),
        Err(ProtocolError::Malformed(_))
    ));
    // The encoder refuses to write this; a hostile peer writes it by hand.
    let mut payload = vec![0_u8; 32];
    wire::put_varint(&mut payload, 0);
    wire::put_varint(&mut payload, MAX_PIECE as u64 + 1);
    let frame = Frame {
        kind: 0x07,
        payload: &payload,
    };
    assert!(matches!(
        ClientMessage::decode(frame),
        Err(ProtocolError::Malformed(_))
    ));
}

#[test]
fn a_delta_commit_without_a_parent_is_malformed() {
    let mut bytes = Vec::new();
    ClientMessage::Commit {
        manifest_id: ObjectId::from_bytes([1; 32]),
        parent: Some(ObjectId::from_bytes([2; 32])),
        delta: true,
        manifest: b"m",
    }
    .encode(&mut bytes);
    // Turn the parent off by hand: [type, len, id(32), 1, parent(32), delta, m].
    let mut without = bytes[..34].to_vec();
    without.push(0);
    without.push(1);
    without.push(b'm');
    without[1] = (without.len() - 2) as u8;
    let mut decoder = FrameDecoder::new(MAX_FRAME_PAYLOAD);
    decoder.push(&without);
    let frame = decoder.next_frame().unwrap().unwrap();
    assert!(matches!(
        ClientMessage::decode(frame),
        Err(ProtocolError::Malformed(_))
    ));
}
