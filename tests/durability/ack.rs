//! `ack=store`: the 202 arrives only once the batch holding the delta has committed, so a
//! direct read of the store right after the 202 (no sleep) sees it; and concurrent requests
//! share commits (group commit into the store) instead of paying one transaction each.

use std::sync::Arc;

use tokio::sync::Barrier;
use tokio::task::JoinSet;

use crate::common::data_dir;
use crate::pg::{PgDatabase, shout};
use crate::support::{Direct, Tally, TallyConfig, increment};

/// Sequential increments, each checked in the store right after its 202.
const SEQUENTIAL: i64 = 20;
/// Concurrent increments (one key each), released together.
const CONCURRENT: usize = 200;
/// Committed batches allowed for the concurrent burst: a quarter of one per request.
const MAX_BATCHES: f64 = CONCURRENT as f64 / 4.0;
const COMMITTED: &str = "tally_flush_batches_total{result=\"committed\"}";

async fn store_ack_answers_after_the_commit(db: Option<&PgDatabase>) {
    let dir = data_dir();
    // An hour between timed flushes: every flush in this test is one that a request asked for.
    let config = TallyConfig::new(dir.path(), db, "store", "1h");
    let backend = config.backend();
    let mut tally = Tally::start(&config).await;
    let direct = Arc::new(Direct::open(dir.path(), db).await);
    let client = reqwest::Client::new();

    for i in 1..=SEQUENTIAL {
        assert_eq!(increment(&client, &tally.address, "sequential").await, 202);
        assert_eq!(
            direct.value("sequential").await,
            Some(i),
            "after the 202 of increment {i} the store holds it"
        );
    }

    let before = tally.metric(COMMITTED).await;
    let barrier = Arc::new(Barrier::new(CONCURRENT));
    let mut tasks = JoinSet::new();
    for i in 0..CONCURRENT {
        let (client, address) = (client.clone(), tally.address.clone());
        let (direct, barrier) = (Arc::clone(&direct), Arc::clone(&barrier));
        tasks.spawn(async move {
            let key = format!("burst-{i:03}");
            barrier.wait().await;
            let status = increment(&client, &address, &key).await;
            // Read at once: if the 202 came before the commit, the value is not there yet.
            let stored = direct.value(&key).await;
            (key, status, stored)
        });
    }
    let mut early = Vec::new();
    while let Some(result) = tasks.join_next().await {
        let (key, status, stored) = result.expect("burst task");
        assert_eq!(status, 202, "{key}");
        if stored != Some(1) {
            early.push(format!("{key}: stored {stored:?}"));
        }
    }
    assert!(
        early.is_empty(),
        "202 before the commit for {} keys: {early:?}",
        early.len()
    );
    let batches = tally.metric(COMMITTED).await - before;
    shout(&format!(
        "ack=store {backend}: {SEQUENTIAL} sequential increments each in the store at their 202; \
         {CONCURRENT} concurrent ones likewise, group-committed in {batches} batches"
    ));
    assert!(
        (1.0..=MAX_BATCHES).contains(&batches),
        "{CONCURRENT} concurrent increments took {batches} committed batches; expected 1..={MAX_BATCHES}"
    );

    let status = tally.terminate().await;
    assert!(status.success(), "clean exit, got {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_ack_answers_only_after_the_batch_committed() {
    store_ack_answers_after_the_commit(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_ack_answers_only_after_the_batch_committed() {
    let Some(db) = PgDatabase::create("ack_store").await else {
        return;
    };
    store_ack_answers_after_the_commit(Some(&db)).await;
}
