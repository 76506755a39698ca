//! The object store's behaviour: uploads, resume across restarts, quotas, isolation
//! of accounts, faults of the medium, and `check`.

use std::sync::Arc;

use homing_crypto::ObjectId;

use super::*;
use crate::backend::{Fault, FaultyBackend, LocalBackend};

/// The store every test opens: local segments behind the fault injector.
type TestStore = ObjectStore<FaultyBackend<LocalBackend>>;

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn open(&self) -> TestStore {
        let backend =
            FaultyBackend::new(LocalBackend::open(&self.dir.path().join("segments")).unwrap());
        ObjectStore::open(self.dir.path(), backend).unwrap()
    }
}

fn id(n: u8) -> ObjectId {
    ObjectId::from_bytes([n; 32])
}

fn object(n: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(n).wrapping_add(n))
        .collect()
}

#[test]
fn an_object_in_one_piece_is_stored_and_read_back() {
    let fixture = Fixture::new();
    let store = fixture.open();
    store.add_account("alice", 0, 0).unwrap();
    let bytes = object(1, 5000);
    assert_eq!(store.holding("alice", &id(1)).unwrap(), Holding::Missing);
    assert_eq!(
        store.put_piece("alice", &id(1), 5000, 0, &bytes).unwrap(),
        PutOutcome::Stored
    );
    assert_eq!(store.holding("alice", &id(1)).unwrap(), Holding::Stored);
    assert_eq!(
        store.read("alice", &id(1), 0, 5000).unwrap(),
        (5000, bytes.clone())
    );
    assert_eq!(
        store.read("alice", &id(1), 4000, 2000).unwrap(),
        (5000, bytes[4000..].to_vec())
    );
    let account = store.account("alice").unwrap();
    assert_eq!((account.used, account.objects), (5000, 1));
    // Storing it again is a no-op, not a second copy.
    assert_eq!(
        store.put_piece("alice", &id(1), 5000, 0, &bytes).unwrap(),
        PutOutcome::Stored
    );
    assert_eq!(store.account("alice").unwrap().used, 5000);
}

#[test]
fn a_cut_upload_resumes_after_a_restart_at_the_held_offset() {
    let fixture = Fixture::new();
    let bytes = object(2, 10_000);
    {
        let store = fixture.open();
        store.add_account("alice", 0, 0).unwrap();
        assert_eq!(
            store
                .put_piece("alice", &id(2), 10_000, 0, &bytes[..3000])
                .unwrap(),
            PutOutcome::Incomplete(3000)
        );
        assert_eq!(
            store
                .put_piece("alice", &id(2), 10_000, 3000, &bytes[3000..4000])
                .unwrap(),
            PutOutcome::Incomplete(4000)
        );
        // The store goes away here, as after kill -9: nothing is closed cleanly.
    }
    let store = fixture.open();
    assert_eq!(
        store.holding("alice", &id(2)).unwrap(),
        Holding::Partial(4000)
    );
    let wrong = store
        .put_piece("alice", &id(2), 10_000, 0, &bytes[..100])
        .unwrap_err();
    assert!(
        matches!(wrong, StoreError::OffsetMismatch { held: 4000, .. }),
        "{wrong}"
    );
    let other_total = store
        .put_piece("alice", &id(2), 9_999, 4000, &bytes[4000..5000])
        .unwrap_err();
    assert!(
        matches!(other_total, StoreError::LengthMismatch { .. }),
        "{other_total}"
    );
    assert_eq!(
        store
            .put_piece("alice", &id(2), 10_000, 4000, &bytes[4000..])
            .unwrap(),
        PutOutcome::Stored
    );
    assert_eq!(store.read("alice", &id(2), 0, 10_000).unwrap().1, bytes);
    assert!(
        !fixture
            .dir
            .path()
            .join("partial/alice")
            .join(format!("{}.part", id(2)))
            .exists()
    );
}

#[test]
fn accounts_never_see_each_others_objects() {
    let fixture = Fixture::new();
    let store = fixture.open();
    store.add_account("alice", 0, 0).unwrap();
    store.add_account("bob", 0, 0).unwrap();
    store
        .put_piece("alice", &id(3), 10, 0, &object(3, 10))
        .unwrap();
    assert_eq!(store.holding("bob", &id(3)).unwrap(), Holding::Missing);
    assert!(matches!(
        store.read("bob", &id(3), 0, 10),
        Err(StoreError::ObjectMissing { .. })
    ));
    // Bob storing the same id stores bob's bytes, and alice's stay hers.
    store.put_piece("bob", &id(3), 4, 0, b"bob!").unwrap();
    assert_eq!(store.read("alice", &id(3), 0, 10).unwrap().1, object(3, 10));
    assert_eq!(store.read("bob", &id(3), 0, 10).unwrap().1, b"bob!");
    assert!(matches!(
        store.holding("carol", &id(3)),
        Err(StoreError::UnknownAccount(_))
    ));
    assert!(matches!(
        store.read("carol", &id(3), 0, 1),
        Err(StoreError::UnknownAccount(_))
    ));
}

#[test]
fn account_names_are_checked() {
    let fixture = Fixture::new();
    let store = fixture.open();
    for bad in [
        "",
        ".hidden",
        "a/b",
        "a\0b",
        &"x".repeat(65),
        "über",
        "Alice",
    ] {
        assert!(
            matches!(
                store.add_account(bad, 0, 0),
                Err(StoreError::InvalidAccount(_))
            ),
            "{bad:?}"
        );
    }
    store.add_account("laptop-1.home_x", 0, 0).unwrap();
    assert!(matches!(
        store.add_account("laptop-1.home_x", 0, 0),
        Err(StoreError::AccountExists(_))
    ));
}

#[test]
fn uploads_in_progress_count_against_the_quota() {
    let fixture = Fixture::new();
    let store = fixture.open();
    store.add_account("alice", 0, 25_000).unwrap();
    // Two uploads of 10 000 bytes started and left hanging hold 20 000 bytes.
    for n in [70, 71] {
        store
            .put_piece("alice", &id(n), 10_000, 0, &object(n, 100))
            .unwrap();
    }
    let third = store
        .put_piece("alice", &id(72), 10_000, 0, &object(72, 100))
        .unwrap_err();
    assert!(
        matches!(third, StoreError::StoreFull { wanted: 30_000, .. }),
        "{third}"
    );
}

#[test]
fn stray_partial_files_are_removed_when_the_server_starts_and_only_then() {
    let fixture = Fixture::new();
    {
        let store = fixture.open();
        store.add_account("alice", 0, 0).unwrap();
        store
            .put_piece("alice", &id(80), 10, 0, &object(80, 4))
            .unwrap();
    }
    let dir = fixture.dir.path().join("partial/alice");
    let stray = dir.join(format!("{}.part", id(81)));
    std::fs::write(&stray, b"left by a crash").unwrap();
    let store = fixture.open();
    // An admin command opening the store while the server runs must not touch
    // uploads: the server may be about to record this very file.
    assert!(stray.exists());
    store.remove_stray_partials().unwrap();
    assert!(!stray.exists());
    assert_eq!(
        store.holding("alice", &id(80)).unwrap(),
        Holding::Partial(4),
        "a named upload stays"
    );
}

#[test]
fn the_hard_quota_is_never_exceeded_by_parallel_uploads() {
    let fixture = Fixture::new();
    let store = Arc::new(fixture.open());
    store.add_account("alice", 0, 50_000).unwrap();
    let results: Vec<Result<PutOutcome, StoreError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..12_u8)
            .map(|n| {
                let store = Arc::clone(&store);
                scope.spawn(move || {
                    let bytes = object(n + 10, 10_000);
                    // Two pieces each, so that uploads interleave.
                    store.put_piece("alice", &id(n + 10), 10_000, 0, &bytes[..5_000])?;
                    store.put_piece("alice", &id(n + 10), 10_000, 5_000, &bytes[5_000..])
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let stored = results
        .iter()
        .filter(|r| matches!(r, Ok(PutOutcome::Stored)))
        .count();
    let full = results
        .iter()
        .filter(|r| matches!(r, Err(StoreError::StoreFull { .. })))
        .count();
    assert_eq!(stored + full, 12, "{results:?}");
    assert_eq!(stored, 5);
    let account = store.account("alice").unwrap();
    assert_eq!(account.used, 50_000);
    assert!(account.used <= account.hard_limit);
}

#[test]
fn storage_faults_surface_and_lose_nothing_acknowledged() {
    let fixture = Fixture::new();
    let store = fixture.open();
    store.add_account("alice", 0, 0).unwrap();
    store
        .put_piece("alice", &id(20), 1000, 0, &object(20, 1000))
        .unwrap();
    for (n, fault) in [(21, Fault::NoSpace), (22, Fault::Io), (23, Fault::Torn)] {
        store.backend().plan([Some(fault)]);
        let error = store
            .put_piece("alice", &id(n), 1000, 0, &object(n, 1000))
            .unwrap_err();
        assert!(matches!(error, StoreError::Backend(_)), "{error}");
        // Not stored, but the upload is still held and can be completed later.
        assert_eq!(
            store.holding("alice", &id(n)).unwrap(),
            Holding::Partial(1000)
        );
    }
    assert_eq!(
        store.read("alice", &id(20), 0, 1000).unwrap().1,
        object(20, 1000)
    );
    // The held uploads complete once the medium works again (an empty last piece).
    for n in [21, 22, 23] {
        assert_eq!(
            store.put_piece("alice", &id(n), 1000, 1000, &[]).unwrap(),
            PutOutcome::Stored
        );
        assert_eq!(
            store.read("alice", &id(n), 0, 1000).unwrap().1,
            object(n, 1000)
        );
    }
    let report = store.check(false).unwrap();
    assert!(report.damaged.is_empty(), "{report:?}");
    assert_eq!(report.objects, 4);
    assert_eq!(store.account("alice").unwrap().used, 4000);
}

#[test]
fn check_names_an_object_whose_bytes_changed_and_repair_quarantines_it() {
    let fixture = Fixture::new();
    let store = fixture.open();
    store.add_account("alice", 0, 0).unwrap();
    for n in 30..33 {
        store
            .put_piece("alice", &id(n), 2000, 0, &object(n, 2000))
            .unwrap();
    }
    // Flip one bit of the second object on disk.
    let segment = fixture
        .dir
        .path()
        .join("segments")
        .join(format!("{:016x}.seg", 1));
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[2000 + 777] ^= 0x10;
    std::fs::write(&segment, &bytes).unwrap();

    let report = store.check(false).unwrap();
    assert_eq!(report.damaged.len(), 1, "{report:?}");
    assert_eq!(report.damaged[0].id, id(31));
    assert_eq!(report.damaged[0].account, "alice");
    let read = store.read("alice", &id(31), 0, 10).unwrap_err();
    assert!(matches!(read, StoreError::Corrupt { .. }), "{read}");
    assert!(read.to_string().contains(&id(31).to_string()));

    let repaired = store.check(true).unwrap();
    assert!(repaired.repaired);
    assert_eq!(
        store.holding("alice", &id(31)).unwrap(),
        Holding::Missing,
        "the client will upload it again"
    );
    assert!(store.check(false).unwrap().damaged.is_empty());
    assert_eq!(store.account("alice").unwrap().objects, 2);
}

#[test]
fn oversized_and_overlong_pieces_are_refused() {
    let fixture = Fixture::new();
    let store = fixture.open();
    store.add_account("alice", 0, 0).unwrap();
    let too_large = store
        .put_piece("alice", &id(40), MAX_OBJECT_LEN + 1, 0, b"x")
        .unwrap_err();
    assert!(matches!(too_large, StoreError::TooLarge { .. }));
    let past_end = store
        .put_piece("alice", &id(40), 3, 0, b"four")
        .unwrap_err();
    assert!(matches!(past_end, StoreError::LengthMismatch { .. }));
    let late_start = store.put_piece("alice", &id(40), 10, 5, b"x").unwrap_err();
    assert!(matches!(
        late_start,
        StoreError::OffsetMismatch { held: 0, .. }
    ));
    assert_eq!(store.holding("alice", &id(40)).unwrap(), Holding::Missing);
}

#[test]
fn a_crash_between_append_and_index_leaves_only_dead_space() {
    let fixture = Fixture::new();
    {
        let store = fixture.open();
        store.add_account("alice", 0, 0).unwrap();
        store
            .put_piece("alice", &id(50), 100, 0, &object(50, 100))
            .unwrap();
    }
    // Bytes appended to the segment by a store that died before indexing them.
    let backend = LocalBackend::open(&fixture.dir.path().join("segments")).unwrap();
    backend.append(1, &[[0xee_u8; 300].as_slice()]).unwrap();
    let store = fixture.open();
    let report = store.check(false).unwrap();
    assert!(report.damaged.is_empty());
    assert_eq!(report.unreferenced_bytes, 300);
    store
        .put_piece("alice", &id(51), 100, 0, &object(51, 100))
        .unwrap();
    assert_eq!(
        store.read("alice", &id(51), 0, 100).unwrap().1,
        object(51, 100)
    );
    assert_eq!(
        store.read("alice", &id(50), 0, 100).unwrap().1,
        object(50, 100)
    );
}

#[test]
fn commits_are_atomic_chained_and_refuse_missing_objects() {
    let fixture = Fixture::new();
    let store = fixture.open();
    store.add_account("alice", 0, 0).unwrap();
    store.add_account("bob", 0, 0).unwrap();
    for n in 60..63 {
        store
            .put_piece("alice", &id(n), 10, 0, &object(n, 10))
            .unwrap();
    }
    let manifest = id(60);
    let missing = store
        .commit("alice", &manifest, None, &whole(&[id(61), id(99)]), 1)
        .unwrap_err();
    assert!(
        matches!(&missing, StoreError::MissingReferences { count: 1, ids, .. } if ids == &[id(99)]),
        "{missing}"
    );
    assert_eq!(
        store.snapshots("alice", 0, 10).unwrap().head,
        None,
        "nothing was recorded"
    );
    assert_eq!(
        store
            .commit("alice", &manifest, None, &whole(&[id(61), id(62)]), 100)
            .unwrap(),
        1
    );
    let stale = store
        .commit("alice", &id(61), None, &whole(&[]), 200)
        .unwrap_err();
    assert!(matches!(stale, StoreError::StaleParent { head: Some(h), .. } if h == manifest));
    assert_eq!(
        store
            .commit("alice", &id(61), Some(&manifest), &whole(&[id(62)]), 200)
            .unwrap(),
        2
    );
    assert_eq!(store.head("alice").unwrap(), Some(id(61)));
    assert_eq!(store.snapshot_count("alice").unwrap(), 2);
    assert_eq!(store.snapshot_count("bob").unwrap(), 0);
    let page = store.snapshots("alice", 0, 1).unwrap();
    assert_eq!(page.head, Some(id(61)));
    assert_eq!(
        page.entries,
        vec![Snapshot {
            id: manifest,
            sequence: 1,
            committed_at: 100
        }]
    );
    assert!(page.more);
    let rest = store.snapshots("alice", 2, 10).unwrap();
    assert_eq!(rest.entries.len(), 1);
    assert!(!rest.more);
    // Bob sees none of it, and cannot commit alice's objects as his.
    assert_eq!(store.snapshots("bob", 0, 10).unwrap().entries, vec![]);
    assert!(matches!(
        store.commit("bob", &id(60), None, &whole(&[]), 1),
        Err(StoreError::MissingReferences { .. })
    ));
}

#[test]
fn reads_past_the_end_disabled_commits_and_stray_files_are_handled() {
    let fixture = Fixture::new();
    {
        let store = fixture.open();
        store.add_account("alice", 0, 0).unwrap();
        store
            .put_piece("alice", &id(90), 10, 0, &object(90, 10))
            .unwrap();
        let past = store.read("alice", &id(90), 11, 1).unwrap_err();
        assert!(matches!(past, StoreError::LengthMismatch { .. }), "{past}");
        assert_eq!(
            store.read("alice", &id(90), 10, 5).unwrap(),
            (10, vec![]),
            "the end itself is fine"
        );
        store
            .update_account("alice", |a| a.disabled = true)
            .unwrap();
        let refused = store
            .commit("alice", &id(90), None, &whole(&[]), 1)
            .unwrap_err();
        assert!(
            matches!(refused, StoreError::AccountDisabled(_)),
            "{refused}"
        );
        assert_eq!(
            store.read("alice", &id(90), 0, 10).unwrap().1,
            object(90, 10),
            "reads still work"
        );
    }
    // A file someone left directly in partial/ does not stop the store from opening.
    std::fs::write(fixture.dir.path().join("partial/README"), b"notes").unwrap();
    let store = fixture.open();
    assert!(fixture.dir.path().join("partial/README").exists());
    assert_eq!(store.holding("alice", &id(90)).unwrap(), Holding::Stored);
}

#[test]
fn whole_objects_are_stored_together_within_the_quota() {
    let fixture = Fixture::new();
    let store = fixture.open();
    store.add_account("alice", 0, 3_500).unwrap();
    store
        .put_piece("alice", &id(100), 1000, 0, &object(100, 1000))
        .unwrap();
    store
        .put_piece("alice", &id(101), 500, 0, &object(101, 200))
        .unwrap(); // in progress
    let a = object(102, 1000);
    let b = object(103, 1000);
    let c = object(104, 1000);
    let again = object(100, 1000);
    let batch: Vec<(ObjectId, &[u8])> = vec![
        (id(100), &again[..]),    // stored already
        (id(101), &[0; 500][..]), // in progress piece by piece
        (id(102), &a),
        (id(102), &a), // twice in one batch
        (id(103), &b), // 1000 + 500 pending + 2000 = 3500: fits
        (id(104), &c), // over the quota
    ];
    let results = store.put_whole("alice", &batch).unwrap();
    assert!(matches!(results[0], Ok(PutOutcome::Stored)));
    assert!(matches!(
        results[1],
        Err(StoreError::OffsetMismatch { held: 200, .. })
    ));
    assert!(matches!(results[2], Ok(PutOutcome::Stored)));
    assert!(matches!(results[3], Ok(PutOutcome::Stored)));
    assert!(matches!(results[4], Ok(PutOutcome::Stored)));
    assert!(
        matches!(results[5], Err(StoreError::StoreFull { .. })),
        "{:?}",
        results[5]
    );
    assert_eq!(store.read("alice", &id(102), 0, 1000).unwrap().1, a);
    assert_eq!(store.read("alice", &id(103), 0, 1000).unwrap().1, b);
    let account = store.account("alice").unwrap();
    assert_eq!((account.used, account.objects), (3000, 3));

    // A failing medium stores nothing of the batch.
    store.update_account("alice", |a| a.hard_limit = 0).unwrap();
    store.backend().plan([Some(Fault::Torn)]);
    let d = object(105, 100);
    assert!(store.put_whole("alice", &[(id(105), &d[..])]).is_err());
    assert_eq!(store.holding("alice", &id(105)).unwrap(), Holding::Missing);
    assert!(store.check(false).unwrap().damaged.is_empty());
    assert_eq!(
        store
            .put_whole("alice", &[(id(105), &d[..])])
            .unwrap()
            .len(),
        1
    );
    assert_eq!(store.read("alice", &id(105), 0, 100).unwrap().1, d);
}

#[test]
fn a_second_copy_in_a_batch_shares_the_first_copys_answer_and_empty_uploads_give_way() {
    let fixture = Fixture::new();
    let store = fixture.open();
    store.add_account("alice", 0, 1_500).unwrap();
    let big = object(110, 2000);
    let results = store
        .put_whole("alice", &[(id(110), &big[..]), (id(110), &big[..])])
        .unwrap();
    assert!(matches!(results[0], Err(StoreError::StoreFull { .. })));
    assert!(
        matches!(results[1], Err(StoreError::StoreFull { .. })),
        "{:?}",
        results[1]
    );
    assert_eq!(store.holding("alice", &id(110)).unwrap(), Holding::Missing);

    // An upload recorded with no byte held (an empty first piece) does not block
    // the object sent whole.
    store.update_account("alice", |a| a.hard_limit = 0).unwrap();
    store.put_piece("alice", &id(111), 100, 0, &[]).unwrap();
    assert_eq!(
        store.holding("alice", &id(111)).unwrap(),
        Holding::Partial(0)
    );
    let small = object(111, 100);
    let results = store.put_whole("alice", &[(id(111), &small[..])]).unwrap();
    assert!(
        matches!(results[0], Ok(PutOutcome::Stored)),
        "{:?}",
        results[0]
    );
    assert_eq!(store.read("alice", &id(111), 0, 100).unwrap().1, small);
    assert_eq!(store.account("alice").unwrap().used, 100);
}

#[test]
fn an_object_finished_both_ways_is_charged_once() {
    let fixture = Fixture::new();
    let store = fixture.open();
    store.add_account("alice", 0, 0).unwrap();
    let bytes = object(120, 1000);
    // One connection uploads piece by piece...
    store
        .put_piece("alice", &id(120), 1000, 0, &bytes[..500])
        .unwrap();
    // ...another stores it whole meanwhile? It must go piece by piece instead.
    let results = store.put_whole("alice", &[(id(120), &bytes[..])]).unwrap();
    assert!(matches!(
        results[0],
        Err(StoreError::OffsetMismatch { held: 500, .. })
    ));
    assert_eq!(
        store
            .put_piece("alice", &id(120), 1000, 500, &bytes[500..])
            .unwrap(),
        PutOutcome::Stored
    );
    let account = store.account("alice").unwrap();
    assert_eq!((account.used, account.objects), (1000, 1));
}

#[test]
fn tiny_objects_and_reference_lists_are_charged() {
    let fixture = Fixture::new();
    let store = fixture.open();
    store.add_account("alice", 0, 0).unwrap();
    store.put_piece("alice", &id(130), 0, 0, &[]).unwrap();
    store
        .put_whole("alice", &[(id(131), &b"tiny"[..])])
        .unwrap();
    assert_eq!(store.account("alice").unwrap().used, 2 * MIN_CHARGE);
    let references: Vec<ObjectId> = vec![id(130), id(131), id(130)];
    store
        .commit("alice", &id(131), None, &whole(&references), 1)
        .unwrap();
    // Each id a snapshot starts to reference is charged once.
    assert_eq!(
        store.account("alice").unwrap().used,
        2 * MIN_CHARGE + 2 * REFERENCE_COST
    );
    store
        .put_whole("alice", &[(id(132), &b"a"[..]), (id(133), &b"b"[..])])
        .unwrap();
    // A commit whose new references do not fit under the hard quota is refused
    // whole.
    store
        .update_account("alice", |a| {
            a.hard_limit = 4 * MIN_CHARGE + 3 * REFERENCE_COST;
        })
        .unwrap();
    let change = Change {
        delta: true,
        added: &[id(132), id(133)],
        removed: &[],
    };
    let full = store
        .commit("alice", &id(131), Some(&id(131)), &change, 2)
        .unwrap_err();
    assert!(matches!(full, StoreError::StoreFull { .. }), "{full}");
    assert_eq!(store.snapshots("alice", 0, 10).unwrap().entries.len(), 1);
}

#[test]
fn a_lost_partial_file_restarts_its_upload_at_zero() {
    let fixture = Fixture::new();
    let store = fixture.open();
    store.add_account("alice", 0, 0).unwrap();
    let bytes = object(140, 100);
    store
        .put_piece("alice", &id(140), 100, 0, &bytes[..40])
        .unwrap();
    std::fs::remove_file(
        fixture
            .dir
            .path()
            .join("partial/alice")
            .join(format!("{}.part", id(140))),
    )
    .unwrap();
    assert_eq!(
        store.holding("alice", &id(140)).unwrap(),
        Holding::Partial(0)
    );
    assert_eq!(
        store.put_piece("alice", &id(140), 100, 0, &bytes).unwrap(),
        PutOutcome::Stored
    );
    assert_eq!(store.read("alice", &id(140), 0, 100).unwrap().1, bytes);
}

fn whole(ids: &[ObjectId]) -> Change<'_> {
    Change {
        delta: false,
        added: ids,
        removed: &[],
    }
}

#[test]
fn delta_commits_open_and_close_spans_and_check_names_what_is_lost() {
    let fixture = Fixture::new();
    let store = fixture.open();
    store.add_account("alice", 0, 0).unwrap();
    let objects: Vec<(ObjectId, Vec<u8>)> = (150..156).map(|n| (id(n), object(n, 100))).collect();
    let pieces: Vec<(ObjectId, &[u8])> = objects.iter().map(|(i, b)| (*i, b.as_slice())).collect();
    store.put_whole("alice", &pieces).unwrap();
    // 1: {150, 151, 152} (manifest 150); 2: + 153 − 151 (manifest 153);
    // 3: whole list {150, 154} (manifest 154).
    store
        .commit(
            "alice",
            &id(150),
            None,
            &whole(&[id(150), id(151), id(152)]),
            1,
        )
        .unwrap();
    let delta = Change {
        delta: true,
        added: &[id(153)],
        removed: &[id(151)],
    };
    store
        .commit("alice", &id(153), Some(&id(150)), &delta, 2)
        .unwrap();
    let mut second = store.references("alice", 2).unwrap();
    second.sort();
    assert_eq!(second, vec![id(150), id(152), id(153)]);
    let mut first = store.references("alice", 1).unwrap();
    first.sort();
    assert_eq!(first, vec![id(150), id(151), id(152)]);
    // Removing what the parent does not reference contradicts the history.
    let bad = Change {
        delta: true,
        added: &[],
        removed: &[id(151)],
    };
    let refused = store
        .commit("alice", &id(154), Some(&id(153)), &bad, 3)
        .unwrap_err();
    assert!(
        matches!(refused, StoreError::InvalidCommit { .. }),
        "{refused}"
    );
    store
        .commit(
            "alice",
            &id(154),
            Some(&id(153)),
            &whole(&[id(150), id(154)]),
            3,
        )
        .unwrap();
    let mut third = store.references("alice", 3).unwrap();
    third.sort();
    assert_eq!(third, vec![id(150), id(154)]);
    assert!(store.check(false).unwrap().lost.is_empty());

    // Damage 150, which all three snapshots need: check names it and them, and
    // after the repair a delta commit is refused until it is stored again.
    let record = {
        let txn = store.db.begin_read().unwrap();
        let table = txn.open_table(OBJECTS).unwrap();
        decode_record(
            table
                .get(key("alice", &id(150)).as_slice())
                .unwrap()
                .unwrap()
                .value(),
        )
    };
    let path = fixture
        .dir
        .path()
        .join("segments")
        .join(format!("{:016x}.seg", record.segment));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[record.offset as usize] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let report = store.check(true).unwrap();
    assert_eq!(report.lost.len(), 1);
    assert_eq!(report.lost[0].id, id(150));
    assert_eq!(report.lost[0].snapshots, vec![1, 2, 3]);
    store
        .put_whole("alice", &[(id(155), &objects[5].1[..])])
        .unwrap();
    let next = Change {
        delta: true,
        added: &[id(155)],
        removed: &[],
    };
    let missing = store
        .commit("alice", &id(155), Some(&id(154)), &next, 4)
        .unwrap_err();
    assert!(
        matches!(&missing, StoreError::MissingReferences { ids, .. } if ids == &vec![id(150)]),
        "{missing}"
    );
    store
        .put_whole("alice", &[(id(150), &objects[0].1[..])])
        .unwrap();
    store
        .commit("alice", &id(155), Some(&id(154)), &next, 4)
        .unwrap();
    assert!(store.check(false).unwrap().lost.is_empty());
}

#[test]
fn garbage_waits_out_its_grace_period_and_uploads_in_flight_survive() {
    let fixture = Fixture::new();
    let store = fixture.open();
    store.add_account("alice", 0, 0).unwrap();
    let objects: Vec<(ObjectId, Vec<u8>)> = (160..164).map(|n| (id(n), object(n, 500))).collect();
    let pieces: Vec<(ObjectId, &[u8])> = objects.iter().map(|(i, b)| (*i, b.as_slice())).collect();
    store.put_whole("alice", &pieces).unwrap();
    // Snapshot 1 needs 161; snapshot 2 needs 162; 163 is an upload whose commit
    // has not come yet.
    store
        .commit("alice", &id(160), None, &whole(&[id(161)]), 1000)
        .unwrap();
    let change = Change {
        delta: true,
        added: &[id(162)],
        removed: &[id(161)],
    };
    store
        .commit("alice", &id(162), Some(&id(160)), &change, 2000)
        .unwrap();
    store
        .set_retention(
            "alice",
            Policy {
                hourly: 1,
                daily: 0,
                weekly: 0,
            },
        )
        .unwrap();
    let used = store.account("alice").unwrap().used;
    // A dry run with no grace says what a real one would delete, and changes
    // nothing: snapshot 1 with its manifest 160 and 161, and 163, not committed.
    let dry = store.collect_garbage(10_000, 0, true).unwrap();
    assert_eq!(dry.snapshots_forgotten, vec![("alice".to_string(), 1)]);
    assert_eq!(dry.objects_deleted, 3, "{dry:?}");
    assert_eq!(store.account("alice").unwrap().used, used);
    assert_eq!(store.snapshots("alice", 0, 10).unwrap().entries.len(), 2);
    // First pass: snapshot 1 is forgotten; 160 (its manifest), 161 and 163 are
    // unneeded and start their grace period.
    let first = store.collect_garbage(10_000, 3600, false).unwrap();
    assert_eq!(first.snapshots_forgotten, vec![("alice".to_string(), 1)]);
    assert_eq!(first.objects_deleted, 0);
    assert_eq!(first.objects_waiting, 3);
    // 163 is committed meanwhile: it leaves the waiting list.
    let change = Change {
        delta: true,
        added: &[id(163)],
        removed: &[],
    };
    store
        .commit("alice", &id(163), Some(&id(162)), &change, 12_000)
        .unwrap();
    // Before the grace period ends nothing goes; after it, 160 and 161 do.
    assert_eq!(
        store
            .collect_garbage(12_500, 3600, false)
            .unwrap()
            .objects_deleted,
        0
    );
    let later = store.collect_garbage(14_000, 3600, false).unwrap();
    assert_eq!(later.objects_deleted, 2, "{later:?}");
    assert_eq!(store.holding("alice", &id(161)).unwrap(), Holding::Missing);
    assert_eq!(store.holding("alice", &id(160)).unwrap(), Holding::Missing);
    for kept in [162, 163] {
        assert_eq!(store.holding("alice", &id(kept)).unwrap(), Holding::Stored);
    }
    assert!(store.account("alice").unwrap().used < used);
    assert!(store.check(false).unwrap().lost.is_empty());
}

/// A store of small segments (4 096 bytes) holding objects 1 to 16 of 1 000
/// bytes each, one upload apiece: 1-5 in segment 1, 6-10 in 2, 11-15 in 3 and 16
/// in the newest, 4.
fn sixteen_in_four_segments(fixture: &Fixture) -> (TestStore, Vec<(ObjectId, Vec<u8>)>) {
    let store = fixture.open().with_segment_target(4096);
    store.add_account("alice", 0, 0).unwrap();
    let objects: Vec<(ObjectId, Vec<u8>)> = (1..=16).map(|n| (id(n), object(n, 1000))).collect();
    for (n, data) in &objects {
        store.put_whole("alice", &[(*n, data.as_slice())]).unwrap();
    }
    (store, objects)
}

#[test]
fn compaction_moves_live_objects_out_of_dead_segments_and_leaves_damage_to_check() {
    let fixture = Fixture::new();
    let (store, objects) = sixteen_in_four_segments(&fixture);
    let segment_file = |n: u64| {
        fixture
            .dir
            .path()
            .join("segments")
            .join(format!("{n:016x}.seg"))
    };
    let on_disk = || -> u64 {
        (1..=5)
            .filter_map(|n| std::fs::metadata(segment_file(n)).ok())
            .map(|m| m.len())
            .sum()
    };
    assert_eq!(on_disk(), 16_000);
    // The snapshot needs 1 of segment 1, 6 and 7 of segment 2, 11-14 of segment
    // 3 and 16 of segment 4 (the newest); the rest is garbage.
    let kept: Vec<ObjectId> = [6, 7, 11, 12, 13, 14, 16].map(id).to_vec();
    store
        .commit("alice", &id(1), None, &whole(&kept), 1000)
        .unwrap();
    let gc = store.collect_garbage(2000, 0, false).unwrap();
    assert_eq!(gc.objects_deleted, 8, "{gc:?}");
    assert_eq!(
        gc.segments_deleted, 0,
        "every old segment still holds a live object"
    );
    // Object 7 rots on disk.
    let mut bytes = std::fs::read(segment_file(2)).unwrap();
    bytes[1000 + 123] ^= 0x01;
    std::fs::write(segment_file(2), &bytes).unwrap();

    let report = store.compact().unwrap();
    // Segment 1 (20 % live) goes; segment 2 (40 % live) gives up 6 but stays for
    // its damaged 7; segment 3 (80 % live) and the newest are not touched.
    assert_eq!(
        report,
        CompactReport {
            segments_compacted: 1,
            objects_moved: 2,
            bytes_moved: 2000,
            segment_bytes_freed: 5000,
            damaged_left: 1,
        }
    );
    assert!(!segment_file(1).exists());
    assert!(segment_file(2).exists());
    assert_eq!(on_disk(), 16_000 - 5000 + 2000);
    for n in [1, 6, 11, 12, 13, 14, 16] {
        let (len, read) = store.read("alice", &id(n), 0, 1000).unwrap();
        assert_eq!(
            (len, &read),
            (1000, &objects[n as usize - 1].1),
            "object {n}"
        );
    }
    let check = store.check(false).unwrap();
    assert_eq!(check.objects, 8);
    assert_eq!(check.damaged.len(), 1, "{check:?}");
    assert_eq!(check.damaged[0].id, id(7));
    assert_eq!(check.lost.len(), 1);
    // Nothing is left to do, and the store reopens with everything where it is.
    assert_eq!(
        store.compact().unwrap(),
        CompactReport {
            damaged_left: 1,
            ..Default::default()
        }
    );
    drop(store);
    let store = fixture.open();
    assert_eq!(
        store.read("alice", &id(1), 0, 1000).unwrap().1,
        objects[0].1
    );
    assert_eq!(store.account("alice").unwrap().objects, 8);
}

#[test]
fn compaction_holds_a_bounded_number_of_records_and_does_the_rest_next_time() {
    let fixture = Fixture::new();
    let (store, objects) = sixteen_in_four_segments(&fixture);
    // Two live objects in each old segment: six records to move, more than the
    // four (in tests) one run holds.
    let kept: Vec<ObjectId> = [2, 7, 8, 12, 13, 16].map(id).to_vec();
    store
        .commit("alice", &id(1), None, &whole(&kept), 1000)
        .unwrap();
    store.collect_garbage(2000, 0, false).unwrap();
    let first = store.compact().unwrap();
    assert_eq!(first.segments_compacted, 2, "{first:?}");
    // Segments 1 and 2 (objects 1, 2, 7 and 8): segment 3 would pass the bound.
    assert_eq!(first.objects_moved, 4, "{first:?}");
    let second = store.compact().unwrap();
    assert_eq!(second.segments_compacted, 1, "{second:?}");
    assert_eq!(second.objects_moved, 2, "{second:?}");
    assert_eq!(store.compact().unwrap(), CompactReport::default());
    for n in [1, 2, 7, 8, 12, 13, 16] {
        assert_eq!(
            store.read("alice", &id(n), 0, 1000).unwrap().1,
            objects[n as usize - 1].1
        );
    }
    assert!(store.check(false).unwrap().damaged.is_empty());
}
