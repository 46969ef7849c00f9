//! The store contract (`src/store/mod.rs`): the same test bodies, run against `SqliteStore`
//! on a temp file and `PgStore` on a fresh PostgreSQL database.

#[path = "common/both_stores.rs"]
mod both_stores;
#[path = "common/mod.rs"]
mod common;
#[allow(
    dead_code,
    reason = "no app runs here to scrape: the recorder is read directly"
)]
#[path = "common/metrics.rs"]
mod metrics;
#[path = "common/pg.rs"]
mod pg;
#[path = "common/store.rs"]
mod store;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tally::store::{
    Applied, Batch, Claim, Claimant, DeadLetter, Handover, PgStore, SqliteStore, Store, StoreError,
    Stored,
};
use tempfile::TempDir;

use both_stores::on_both_stores;
use common::{Backend, data_dir};
use store::stored_counters;

/// A fresh, empty store of one kind, with direct SQL access for assertions.
struct Fixture {
    backend: Backend,
    /// Holds the SQLite file (unused, but harmless, with PostgreSQL).
    dir: TempDir,
}

impl Fixture {
    fn new(backend: Backend) -> Self {
        Self {
            backend,
            dir: data_dir(),
        }
    }

    /// Opens a store handle on this database (migrating it on first open).
    async fn open(&self) -> Arc<dyn Store> {
        match &self.backend {
            Backend::Sqlite => Arc::new(
                SqliteStore::open(&self.dir.path().join("tally.db"))
                    .await
                    .expect("open SQLite"),
            ),
            Backend::Postgres(url) => Arc::new(PgStore::connect(url, 4).await.expect("connect")),
        }
    }

    /// Runs `sql` (a query of rows of text and bigint columns, as `Vec<String>` of their
    /// display forms), outside tally's code.
    async fn rows(&self, sql: &'static str) -> Vec<Vec<String>> {
        match &self.backend {
            Backend::Sqlite => {
                let path = self.dir.path().join("tally.db");
                tokio::task::spawn_blocking(move || {
                    let conn = rusqlite::Connection::open(path).expect("open SQLite");
                    let mut statement = conn.prepare(sql).expect("prepare");
                    let columns = statement.column_count();
                    statement
                        .query_map([], |row| {
                            (0..columns)
                                .map(|i| {
                                    Ok(match row.get_ref(i)? {
                                        rusqlite::types::ValueRef::Integer(n) => n.to_string(),
                                        rusqlite::types::ValueRef::Text(t) => {
                                            String::from_utf8_lossy(t).into_owned()
                                        }
                                        other => format!("{other:?}"),
                                    })
                                })
                                .collect()
                        })
                        .expect("query")
                        .collect::<Result<_, _>>()
                        .expect("rows")
                })
                .await
                .expect("reader thread")
            }
            Backend::Postgres(url) => {
                let client = pg::client(url).await;
                let rows = client.query(sql, &[]).await.expect("query");
                rows.iter()
                    .map(|row| {
                        (0..row.len())
                            .map(|i| match row.columns()[i].type_() {
                                &tokio_postgres::types::Type::INT8 => {
                                    row.get::<_, i64>(i).to_string()
                                }
                                _ => row.get::<_, String>(i),
                            })
                            .collect()
                    })
                    .collect()
            }
        }
    }

    /// The whole `counters` table.
    async fn counters(&self) -> BTreeMap<String, i64> {
        stored_counters(self.dir.path(), &self.backend).await
    }
}

fn batch<'a>(instance_id: &'a str, seq: u64, entries: &'a [(&'a str, i64)]) -> Batch<'a> {
    Batch {
        instance_id,
        epoch: 0,
        seq,
        applied: 0,
        entries,
        dead_letters: &[],
    }
}

/// The last seq the store holds for `instance_id`, read without claiming it.
async fn last_seq(store: &dyn Store, instance_id: &str) -> u64 {
    store.read("", instance_id).await.expect("read").applied_seq
}

async fn value(store: &dyn Store, key: &str) -> Option<i64> {
    store.read(key, "reader").await.expect("read").value
}

async fn apply_adds_every_delta_and_records_the_seq(backend: Backend) {
    let fixture = &Fixture::new(backend);
    let store = fixture.open().await;
    store.ping().await.expect("ping");
    assert_eq!(last_seq(&*store, "i1").await, 0);
    let first = [("a", 5), ("b", -3), ("é/ключ", 1)];
    assert_eq!(
        store.apply(batch("i1", 1, &first)).await.expect("apply"),
        Applied::Committed
    );
    let second = [("a", 2), ("c", i64::MAX)];
    assert_eq!(
        store.apply(batch("i1", 2, &second)).await.expect("apply"),
        Applied::Committed
    );
    assert_eq!(last_seq(&*store, "i1").await, 2);
    assert_eq!(last_seq(&*store, "i2").await, 0);
    let want: BTreeMap<String, i64> = [
        ("a".to_owned(), 7),
        ("b".to_owned(), -3),
        ("c".to_owned(), i64::MAX),
        ("é/ключ".to_owned(), 1),
    ]
    .into();
    assert_eq!(fixture.counters().await, want);
    assert_eq!(value(&*store, "a").await, Some(7));
    assert_eq!(value(&*store, "missing").await, None);
    // An empty batch (every key set aside) still records its seq.
    assert_eq!(
        store.apply(batch("i1", 3, &[])).await.expect("apply"),
        Applied::Committed
    );
    assert_eq!(last_seq(&*store, "i1").await, 3);
}
on_both_stores!(apply_adds_every_delta_and_records_the_seq);

async fn a_seq_already_applied_is_skipped_and_reported(backend: Backend) {
    let fixture = &Fixture::new(backend);
    let store = fixture.open().await;
    let entries = [("k", 10)];
    assert_eq!(
        store.apply(batch("i1", 1, &entries)).await.expect("apply"),
        Applied::Committed
    );
    // The retry after an unknown commit outcome: same seq, same data.
    assert_eq!(
        store.apply(batch("i1", 1, &entries)).await.expect("apply"),
        Applied::AlreadyApplied
    );
    // Same seq, other data: still skipped, whatever it holds.
    let other = [("k", 1), ("new", 1)];
    assert_eq!(
        store.apply(batch("i1", 1, &other)).await.expect("apply"),
        Applied::AlreadyApplied
    );
    assert_eq!(fixture.counters().await, [("k".to_owned(), 10)].into());
    // Another instance's seq 1 is its own.
    assert_eq!(
        store.apply(batch("i2", 1, &entries)).await.expect("apply"),
        Applied::Committed
    );
    assert_eq!(value(&*store, "k").await, Some(20));
    assert_eq!(last_seq(&*store, "i1").await, 1);
    assert_eq!(last_seq(&*store, "i2").await, 1);
}
on_both_stores!(a_seq_already_applied_is_skipped_and_reported);

async fn seqs_only_move_forward(backend: Backend) {
    let fixture = &Fixture::new(backend);
    let store = fixture.open().await;
    let one = [("k", 1)];
    assert_eq!(
        store.apply(batch("i1", 5, &one)).await.expect("apply"),
        Applied::Committed
    );
    for older in [1, 4, 5] {
        assert_eq!(
            store.apply(batch("i1", older, &one)).await.expect("apply"),
            Applied::AlreadyApplied,
            "seq {older} after seq 5"
        );
    }
    // Gaps are allowed (seqs of empty generations are never written).
    for newer in [6, 10] {
        assert_eq!(
            store.apply(batch("i1", newer, &one)).await.expect("apply"),
            Applied::Committed,
            "seq {newer}"
        );
    }
    assert_eq!(last_seq(&*store, "i1").await, 10);
    assert_eq!(value(&*store, "k").await, Some(3));
    // The recorded seq survives reopening the store.
    drop(store);
    let store = fixture.open().await;
    assert_eq!(last_seq(&*store, "i1").await, 10);
    assert_eq!(
        store.apply(batch("i1", 10, &one)).await.expect("apply"),
        Applied::AlreadyApplied
    );
}
on_both_stores!(seqs_only_move_forward);

async fn a_sum_beyond_64_bits_is_rejected_and_nothing_of_the_batch_applied(backend: Backend) {
    let fixture = &Fixture::new(backend);
    let store = fixture.open().await;
    let setup = [("high", i64::MAX - 1), ("low", i64::MIN + 1)];
    store.apply(batch("i1", 1, &setup)).await.expect("apply");
    for (seq, entries) in [
        // "aaa" sorts before the offending key, "zzz" after: neither may be applied.
        (2, vec![("aaa", 1), ("high", 2), ("zzz", 1)]),
        (2, vec![("aaa", 1), ("low", -2), ("zzz", 1)]),
    ] {
        match store.apply(batch("i1", seq, &entries)).await {
            Err(StoreError::Rejected { keys, .. }) => assert!(
                keys.is_empty() || keys == ["high"] || keys == ["low"],
                "named keys {keys:?}"
            ),
            other => panic!("want Rejected, got {other:?}"),
        }
    }
    let want: BTreeMap<String, i64> = [
        ("high".to_owned(), i64::MAX - 1),
        ("low".to_owned(), i64::MIN + 1),
    ]
    .into();
    assert_eq!(
        fixture.counters().await,
        want,
        "nothing applied, nothing wrapped"
    );
    assert_eq!(last_seq(&*store, "i1").await, 1);
    // The same seq without the offending key then goes in.
    let rest = [("aaa", 1), ("high", 1), ("zzz", 1)];
    assert_eq!(
        store.apply(batch("i1", 2, &rest)).await.expect("apply"),
        Applied::Committed
    );
    assert_eq!(value(&*store, "high").await, Some(i64::MAX));
}
on_both_stores!(a_sum_beyond_64_bits_is_rejected_and_nothing_of_the_batch_applied);

async fn sums_reach_both_ends_of_the_range_and_no_further(backend: Backend) {
    let fixture = &Fixture::new(backend);
    let store = fixture.open().await;
    let setup = [("high", i64::MAX - 1), ("low", i64::MIN + 1), ("zero", 0)];
    store.apply(batch("i1", 1, &setup)).await.expect("apply");
    let to_the_ends = [("high", 1), ("low", -1), ("zero", i64::MIN)];
    assert_eq!(
        store
            .apply(batch("i1", 2, &to_the_ends))
            .await
            .expect("apply"),
        Applied::Committed
    );
    assert_eq!(value(&*store, "high").await, Some(i64::MAX));
    assert_eq!(value(&*store, "low").await, Some(i64::MIN));
    assert_eq!(value(&*store, "zero").await, Some(i64::MIN));
    for entries in [[("high", 1)], [("low", -1)], [("zero", -1)]] {
        let refused = store.apply(batch("i1", 3, &entries)).await;
        assert!(
            matches!(&refused, Err(StoreError::Rejected { keys, .. }) if keys.is_empty() || keys == &[entries[0].0]),
            "{entries:?}: want Rejected naming the key, got {refused:?}"
        );
    }
    assert_eq!(
        value(&*store, "low").await,
        Some(i64::MIN),
        "nothing wrapped"
    );
    assert_eq!(last_seq(&*store, "i1").await, 2);
}
on_both_stores!(sums_reach_both_ends_of_the_range_and_no_further);

async fn probe_checks_without_writing(backend: Backend) {
    let fixture = &Fixture::new(backend);
    let store = fixture.open().await;
    store
        .apply(batch("i1", 1, &[("edge", i64::MAX)]))
        .await
        .expect("apply");
    store
        .probe(&[("edge", -5), ("fresh", 3)])
        .await
        .expect("probe of valid sums");
    assert!(matches!(
        store.probe(&[("edge", 1)]).await,
        Err(StoreError::Rejected { .. })
    ));
    assert!(matches!(
        store.probe(&[("fresh", i64::MIN), ("edge", 1)]).await,
        Err(StoreError::Rejected { .. })
    ));
    assert_eq!(
        fixture.counters().await,
        [("edge".to_owned(), i64::MAX)].into(),
        "probe wrote nothing"
    );
    assert_eq!(last_seq(&*store, "i1").await, 1);
}
on_both_stores!(probe_checks_without_writing);

async fn dead_letters_are_recorded_with_their_batch(backend: Backend) {
    let fixture = &Fixture::new(backend);
    let store = fixture.open().await;
    let dead = [DeadLetter {
        key: "poison".to_owned(),
        delta: 42,
        reason: "sum out of the 64-bit integer range".to_owned(),
    }];
    let entries = [("fine", 1)];
    let with_dead = Batch {
        dead_letters: &dead,
        ..batch("i1", 7, &entries)
    };
    assert_eq!(
        store.apply(with_dead).await.expect("apply"),
        Applied::Committed
    );
    // A retry of the same batch records nothing twice.
    assert_eq!(
        store.apply(with_dead).await.expect("apply"),
        Applied::AlreadyApplied
    );
    // A batch of dead letters only.
    let only_dead = Batch {
        dead_letters: &dead,
        ..batch("i1", 8, &[])
    };
    assert_eq!(
        store.apply(only_dead).await.expect("apply"),
        Applied::Committed
    );
    let rows = fixture
        .rows("SELECT instance_id, seq, key, delta, reason FROM tally_dead_letters ORDER BY seq")
        .await;
    let want: Vec<Vec<String>> = [7, 8]
        .iter()
        .map(|seq| {
            vec![
                "i1".to_owned(),
                seq.to_string(),
                "poison".to_owned(),
                "42".to_owned(),
                "sum out of the 64-bit integer range".to_owned(),
            ]
        })
        .collect();
    assert_eq!(rows, want);
    assert_eq!(
        fixture.counters().await,
        [("fine".to_owned(), 1)].into(),
        "a dead letter is not applied"
    );
}
on_both_stores!(dead_letters_are_recorded_with_their_batch);

async fn read_returns_the_value_and_applied_seq_of_one_snapshot(backend: Backend) {
    let fixture = &Fixture::new(backend);
    let store = fixture.open().await;
    let reader = fixture.open().await;
    assert_eq!(
        reader.read("k", "i1").await.expect("read"),
        Stored {
            value: None,
            applied_seq: 0
        }
    );
    // Batch seq S adds 1 to "k", so every consistent snapshot has value == applied seq.
    const BATCHES: u64 = 150;
    let done = Arc::new(AtomicBool::new(false));
    let checker = {
        let (reader, done) = (Arc::clone(&reader), Arc::clone(&done));
        tokio::spawn(async move {
            let mut reads = 0;
            while !done.load(Ordering::Acquire) {
                let stored = reader.read("k", "i1").await.expect("read");
                let value = u64::try_from(stored.value.unwrap_or(0)).expect("positive");
                assert_eq!(value, stored.applied_seq, "torn read: {stored:?}");
                reads += 1;
            }
            reads
        })
    };
    for seq in 1..=BATCHES {
        store
            .apply(batch("i1", seq, &[("k", 1)]))
            .await
            .expect("apply");
        tokio::task::yield_now().await;
    }
    done.store(true, Ordering::Release);
    let reads = checker.await.expect("reader panicked");
    assert!(reads > 0, "the reader never ran");
    assert_eq!(
        reader.read("k", "i1").await.expect("read"),
        Stored {
            value: Some(i64::try_from(BATCHES).expect("small")),
            applied_seq: BATCHES
        }
    );
    assert_eq!(
        reader.read("k", "other").await.expect("read"),
        Stored {
            value: Some(i64::try_from(BATCHES).expect("small")),
            applied_seq: 0
        }
    );
}
on_both_stores!(read_returns_the_value_and_applied_seq_of_one_snapshot);

async fn opening_twice_keeps_the_schema_and_the_data(backend: Backend) {
    let fixture = &Fixture::new(backend);
    let first = fixture.open().await;
    first
        .apply(batch("i1", 1, &[("kept", 3)]))
        .await
        .expect("apply");
    // A second handle (a restart, or a second instance) runs the migrations again.
    let second = fixture.open().await;
    assert_eq!(value(&*second, "kept").await, Some(3));
    let versions = fixture
        .rows("SELECT CAST(version AS TEXT) FROM tally_migrations")
        .await;
    assert_eq!(
        versions.len(),
        versions
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    );
    assert!(!versions.is_empty(), "migrations are recorded");
}
on_both_stores!(opening_twice_keeps_the_schema_and_the_data);

async fn a_new_claim_fences_off_the_previous_holder(backend: Backend) {
    let fixture = &Fixture::new(backend);
    let store = fixture.open().await;
    let first = store.claim("i1", by("j1", false)).await.expect("claim");
    assert_eq!(first.last_seq, 0, "a new id has applied nothing");
    let one = [("k", 1)];
    let under = |claim: &Claim, seq| Batch {
        epoch: claim.epoch,
        ..batch("i1", seq, &one)
    };
    assert_eq!(
        store.apply(under(&first, 1)).await.expect("apply"),
        Applied::Committed
    );

    // A second process claims the id: it sees the first one's progress, and the first one's
    // batches are refused from now on, whatever their seq.
    let second = store.claim("i1", by("j1", false)).await.expect("claim");
    assert!(second.epoch > first.epoch, "{second:?} after {first:?}");
    assert_eq!(second.last_seq, 1);
    for seq in [1, 2] {
        match store.apply(under(&first, seq)).await {
            Err(StoreError::Fenced {
                instance_id,
                epoch,
                current,
            }) => assert_eq!(
                (instance_id.as_str(), epoch, current),
                ("i1", first.epoch, second.epoch)
            ),
            other => panic!("seq {seq} of the fenced holder: want Fenced, got {other:?}"),
        }
    }
    assert_eq!(
        value(&*store, "k").await,
        Some(1),
        "nothing of theirs written"
    );
    assert_eq!(
        store.apply(under(&second, 2)).await.expect("apply"),
        Applied::Committed
    );
    assert_eq!(value(&*store, "k").await, Some(2));
    // Claims are per id, and survive reopening the store.
    assert_eq!(
        store
            .claim("i2", by("j1", false))
            .await
            .expect("claim")
            .last_seq,
        0
    );
    drop(store);
    let store = fixture.open().await;
    let third = store.claim("i1", by("j1", false)).await.expect("claim");
    assert!(third.epoch > second.epoch);
    assert_eq!(third.last_seq, 2);
}
on_both_stores!(a_new_claim_fences_off_the_previous_holder);

/// The store goes back to before a claim (a failover to a replica that missed it, a restore
/// from a backup): the claim's batches are refused as gone back, not as fenced by a newer
/// claim, since there is none; a claim made again starts from what the store holds.
async fn a_claim_the_store_lost_is_told_apart_from_a_newer_claim(backend: Backend) {
    let fixture = &Fixture::new(backend);
    let store = fixture.open().await;
    let claim = store.claim("i1", by("j1", false)).await.expect("claim");
    let one = [("k", 1)];
    let under = |claim: &Claim, seq| Batch {
        epoch: claim.epoch,
        ..batch("i1", seq, &one)
    };
    assert_eq!(
        store.apply(under(&claim, 1)).await.expect("apply"),
        Applied::Committed
    );
    fixture
        .rows(
            "UPDATE tally_instances SET epoch = epoch - 1, claimed_epoch = claimed_epoch - 1 \
             WHERE instance_id = 'i1'",
        )
        .await;
    match store.apply(under(&claim, 2)).await {
        Err(StoreError::WentBack {
            instance_id,
            epoch,
            current,
        }) => assert_eq!(
            (instance_id.as_str(), epoch, current),
            ("i1", claim.epoch, claim.epoch - 1)
        ),
        other => panic!("a batch under the lost claim: want WentBack, got {other:?}"),
    }
    assert_eq!(value(&*store, "k").await, Some(1), "nothing written");
    let again = store.claim("i1", by("j1", false)).await.expect("claim");
    assert_eq!(again.last_seq, 1);
    assert_eq!(
        store.apply(under(&again, 2)).await.expect("apply"),
        Applied::Committed
    );
    assert_eq!(value(&*store, "k").await, Some(2));
}
on_both_stores!(a_claim_the_store_lost_is_told_apart_from_a_newer_claim);

/// Commits batches `(seq, delta to "k")` of "i1" under `claim`, each saying the one before
/// it was seen committed.
async fn commit_in_order(store: &dyn Store, claim: &Claim, batches: &[(u64, i64)]) {
    for &(seq, delta) in batches {
        let entries = [("k", delta)];
        let batch = Batch {
            epoch: claim.epoch,
            applied: seq - 1,
            ..batch("i1", seq, &entries)
        };
        assert_eq!(store.apply(batch).await.expect("apply"), Applied::Committed);
    }
}

/// The store goes back to before a batch it had committed (a failover to a replica that
/// missed it, a restore from a backup), the claim kept: the writer's next batch, which says
/// what it saw committed, is refused and writes nothing, so that a claim made again
/// starts below the lost batch and the writer's journal can write it again.
async fn a_batch_the_store_lost_is_found_and_nothing_written_after_it(backend: Backend) {
    let fixture = &Fixture::new(backend);
    let store = fixture.open().await;
    let claim = store.claim("i1", by("j1", false)).await.expect("claim");
    commit_in_order(&*store, &claim, &[(1, 1), (2, 10)]).await;
    // Batch 2 is lost, as in a snapshot taken before it: its seq and its sums.
    fixture
        .rows("UPDATE tally_instances SET last_seq = 1 WHERE instance_id = 'i1'")
        .await;
    fixture
        .rows("UPDATE counters SET value = 1 WHERE key = 'k'")
        .await;
    let after = Batch {
        epoch: claim.epoch,
        applied: 2,
        ..batch("i1", 3, &[("k", 100)])
    };
    match store.apply(after).await {
        Err(StoreError::LostBatches {
            instance_id,
            stored,
            applied,
        }) => assert_eq!((instance_id.as_str(), stored, applied), ("i1", 1, 2)),
        other => panic!("a batch after the lost one: want LostBatches, got {other:?}"),
    }
    assert_eq!(value(&*store, "k").await, Some(1), "nothing written");
    assert_eq!(last_seq(&*store, "i1").await, 1, "its seq not recorded");
    // A claim made again starts from what the store holds: the lost batch can be written.
    let again = store.claim("i1", by("j1", false)).await.expect("claim");
    assert_eq!(again.last_seq, 1);
    commit_in_order(&*store, &again, &[(2, 10), (3, 100)]).await;
    assert_eq!(value(&*store, "k").await, Some(111));
}
on_both_stores!(a_batch_the_store_lost_is_found_and_nothing_written_after_it);

/// A claim by journal `journal`.
fn by(journal: &str, exclusive: bool) -> Claimant<'_> {
    Claimant { journal, exclusive }
}

async fn an_exclusive_claim_fails_if_another_journal_claimed_last(backend: Backend) {
    let fixture = &Fixture::new(backend);
    let store = fixture.open().await;
    let one = [("k", 1)];
    let under = |claim: &Claim, seq| Batch {
        epoch: claim.epoch,
        ..batch("i1", seq, &one)
    };
    // A new id, then the same journal again: nobody else claimed in between.
    let a = store.claim("i1", by("a", true)).await.expect("claim");
    assert_eq!(
        a.handover,
        Handover::default(),
        "a new id passed from nobody"
    );
    let a = store.claim("i1", by("a", true)).await.expect("claim");
    for seq in [1, 2] {
        store.apply(under(&a, seq)).await.expect("apply");
    }
    // Another journal claims, as a second data directory run as the same id would: the
    // claim passes from a at seq 2.
    let b = store.claim("i1", by("b", false)).await.expect("claim");
    assert!(b.epoch > a.epoch);
    let from_a = Handover {
        from: Some("a".to_owned()),
        seq: 2,
    };
    assert_eq!(b.handover, from_a);
    store.apply(under(&b, 3)).await.expect("apply");
    match store.claim("i1", by("a", true)).await {
        Err(StoreError::ClaimedElsewhere {
            instance_id,
            claimant,
            handover,
        }) => assert_eq!(
            (instance_id.as_str(), claimant.as_deref(), handover),
            ("i1", Some("b"), from_a.clone())
        ),
        other => panic!("want ClaimedElsewhere naming journal b, got {other:?}"),
    }
    // The refused claim claimed nothing: b still writes as the id, and b's own claims leave
    // the handover as it was.
    store.apply(under(&b, 4)).await.expect("apply");
    let b = store.claim("i1", by("b", true)).await.expect("claim");
    assert_eq!(b.handover, from_a);
    // Claims are per id; a claim that is not exclusive takes the id back (from b, at seq 4),
    // and then a's exclusive claims pass again.
    store.claim("i2", by("a", true)).await.expect("claim");
    store.claim("i1", by("a", false)).await.expect("claim");
    let again = store.claim("i1", by("a", true)).await.expect("claim");
    assert_eq!(again.last_seq, 4);
    assert_eq!(
        again.handover,
        Handover {
            from: Some("b".to_owned()),
            seq: 4
        }
    );
    assert_eq!(value(&*store, "k").await, Some(4));
}
on_both_stores!(an_exclusive_claim_fails_if_another_journal_claimed_last);

async fn claims_that_record_no_journal_are_told_apart(backend: Backend) {
    let fixture = &Fixture::new(backend);
    let store = fixture.open().await;
    store.claim("i1", by("a", false)).await.expect("claim");
    // A claim made before claimants were recorded (the column still NULL) counts as
    // nobody's: an exclusive claim passes.
    fixture
        .rows("UPDATE tally_instances SET claimed_by = NULL, claimed_epoch = NULL")
        .await;
    store.claim("i1", by("a", true)).await.expect("claim");
    // A claim by a tally that does not record its journal (an older version, or by hand)
    // bumps the epoch only: an exclusive claim fails, naming no claimant.
    fixture
        .rows("UPDATE tally_instances SET epoch = epoch + 1")
        .await;
    match store.claim("i1", by("a", true)).await {
        Err(StoreError::ClaimedElsewhere { claimant, .. }) => assert_eq!(claimant, None),
        other => panic!("want ClaimedElsewhere with no claimant, got {other:?}"),
    }
    store.claim("i1", by("a", false)).await.expect("claim");
    store.claim("i1", by("a", true)).await.expect("claim");
}
on_both_stores!(claims_that_record_no_journal_are_told_apart);

/// A batch abandoned midway (`--store-timeout` drops its future while the database holds it
/// up) must not leave its connection in the pool: the next operation would queue behind the
/// abandoned transaction. A second session holds the instance's row lock, so the batch waits
/// on it; the store, with one connection, must still answer a read at once. The abandoned
/// batch may land once the lock goes (its statements were sent); the retry is then skipped
/// as already applied, and the key counts the batch once.
#[tokio::test]
async fn postgres_an_abandoned_batch_does_not_hold_up_the_next_operation() {
    let Some(db) = pg::PgDatabase::create("abandoned_batch").await else {
        return;
    };
    let store = PgStore::connect(&db.url, 1).await.expect("connect");
    let one = [("k", 1)];
    assert_eq!(
        store.apply(batch("i1", 1, &one)).await.expect("apply"),
        Applied::Committed
    );
    let holder = pg::client(&db.url).await;
    holder
        .batch_execute("BEGIN; SELECT 1 FROM tally_instances WHERE instance_id = 'i1' FOR UPDATE")
        .await
        .expect("hold the instance's row");
    let discarded = || {
        metrics::metric(
            &tally::metrics::handle().render(),
            "tally_store_connections_discarded_total",
        )
    };
    let discarded_before = discarded();
    let held = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        store.apply(batch("i1", 2, &one)),
    )
    .await;
    assert!(held.is_err(), "the batch waits for the held row: {held:?}");
    assert!(
        discarded() > discarded_before,
        "the abandoned batch's connection is counted as discarded"
    );

    let read = tokio::time::timeout(std::time::Duration::from_secs(3), store.read("k", "i1"))
        .await
        .expect("a read answered while the abandoned batch still waits")
        .expect("read");
    assert_eq!((read.value, read.applied_seq), (Some(1), 1));

    holder.batch_execute("ROLLBACK").await.expect("release");
    let retried = store.apply(batch("i1", 2, &one)).await.expect("retry");
    assert!(
        matches!(retried, Applied::Committed | Applied::AlreadyApplied),
        "{retried:?}"
    );
    assert_eq!(value(&store, "k").await, Some(2), "batch 2 counted once");
}

/// A fresh PostgreSQL database in `encoding` (C locale, so that any encoding can be had).
async fn database_in(encoding: &str) -> Option<pg::PgDatabase> {
    pg::PgDatabase::create_with(
        &encoding.to_lowercase(),
        &format!("ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"),
    )
    .await
}

/// A database whose encoding cannot hold every UTF-8 key is refused at connect, before
/// anything is created in it: in LATIN1 a key such as "日本" fails its batch (22P05), and its
/// dead letter fails the same way, so the flusher would retry that batch for ever.
#[tokio::test]
async fn postgres_a_database_that_cannot_hold_every_key_is_refused() {
    let Some(latin1) = database_in("LATIN1").await else {
        return;
    };
    let refused = PgStore::connect(&latin1.url, 1).await;
    let Err(error) = refused else {
        panic!("a LATIN1 database was accepted");
    };
    assert!(
        matches!(&error, StoreError::Encoding { encoding } if encoding == "LATIN1"),
        "{error:?}"
    );
    assert!(error.to_string().contains("ENCODING 'UTF8'"), "{error}");
    let tables: i64 = pg::client(&latin1.url)
        .await
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'tally%'",
            &[],
        )
        .await
        .expect("count tables")
        .get(0);
    assert_eq!(tables, 0, "nothing created in the refused database");
}

/// `SQL_ASCII` stores a UTF-8 client's bytes as they are: accepted, and any key (and its
/// dead letter) goes in and comes back whole.
#[tokio::test]
async fn postgres_a_sql_ascii_database_holds_any_key() {
    let Some(db) = database_in("SQL_ASCII").await else {
        return;
    };
    let store = PgStore::connect(&db.url, 1)
        .await
        .expect("SQL_ASCII accepted");
    let entries = [("ü", -2), ("日本", 5)]; // sorted by key, as a batch must be
    let dead = [DeadLetter {
        key: "日本語".to_owned(),
        delta: 1,
        reason: "test".to_owned(),
    }];
    let applied = store
        .apply(Batch {
            dead_letters: &dead,
            ..batch("i1", 1, &entries)
        })
        .await
        .expect("apply");
    assert_eq!(applied, Applied::Committed);
    assert_eq!(value(&store, "日本").await, Some(5));
    assert_eq!(value(&store, "ü").await, Some(-2));
    let dead_key: String = pg::client(&db.url)
        .await
        .query_one("SELECT key FROM tally_dead_letters", &[])
        .await
        .expect("the dead letter")
        .get(0);
    assert_eq!(dead_key, "日本語");
}
