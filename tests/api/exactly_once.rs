//! Exactly once into the store when a commit's outcome is unknown: the batch committed, but
//! the flusher was told it failed (as when the connection drops during COMMIT). The retry
//! of the same `(instance_id, seq)` must be skipped by the store, not counted twice.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tally::store::{Applied, Batch, Claim, Claimant, Store, StoreError, Stored};

use crate::app::{TestApp, spawn_app, test_config};
use crate::both_stores::on_both_stores;
use crate::common::{Backend, data_dir};
use crate::helpers::open_store;
use crate::metrics::metric;
use crate::store::stored_counters;

/// A real store whose `apply` commits and then, while `lies_left` is above zero, reports
/// the commit as lost.
struct CommitReplyLost {
    inner: Arc<dyn Store>,
    /// Committed batches still to be reported as failed.
    lies_left: AtomicUsize,
    /// Committed batches reported as failed so far.
    lies: AtomicUsize,
    /// Applies the inner store skipped as already applied.
    already_applied: AtomicUsize,
}

impl CommitReplyLost {
    fn new(inner: Arc<dyn Store>, lies: usize) -> Self {
        Self {
            inner,
            lies_left: AtomicUsize::new(lies),
            lies: AtomicUsize::new(0),
            already_applied: AtomicUsize::new(0),
        }
    }
}

#[async_trait]
impl Store for CommitReplyLost {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn wants_own_thread(&self) -> bool {
        self.inner.wants_own_thread()
    }

    async fn claim(&self, instance_id: &str, by: Claimant<'_>) -> Result<Claim, StoreError> {
        self.inner.claim(instance_id, by).await
    }

    async fn apply(&self, batch: Batch<'_>) -> Result<Applied, StoreError> {
        let result = self.inner.apply(batch).await;
        match result {
            Ok(Applied::Committed)
                if self
                    .lies_left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok() =>
            {
                self.lies.fetch_add(1, Ordering::SeqCst);
                Err(StoreError::Unavailable(Box::new(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "connection lost during COMMIT (injected by the test)",
                ))))
            }
            Ok(Applied::AlreadyApplied) => {
                self.already_applied.fetch_add(1, Ordering::SeqCst);
                result
            }
            other => other,
        }
    }

    async fn probe(&self, entries: &[(&str, i64)]) -> Result<(), StoreError> {
        self.inner.probe(entries).await
    }

    async fn read(&self, key: &str, instance_id: &str) -> Result<Stored, StoreError> {
        self.inner.read(key, instance_id).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
}

/// Committed batches to report as lost while the app runs.
const LIES: usize = 3;

/// Sends one round of increments over ten keys and checks that every key reads as the sum
/// sent so far: a batch that is committed but still held in memory counts once.
async fn round(app: &TestApp, round: i64, want: &mut BTreeMap<String, i64>) {
    for i in 0..30_i64 {
        let key = format!("k{}", i % 10);
        let value = (round + 1) * 100 + i - 15;
        assert_eq!(app.increment(&key, value).await, 202);
        *want.entry(key).or_default() += value;
    }
    for (key, value) in want.iter() {
        assert_eq!(
            app.counter(key).await,
            Some(i128::from(*value)),
            "GET {key} in round {round}"
        );
    }
}

async fn a_batch_whose_commit_reply_is_lost_is_retried_without_double_counting(backend: Backend) {
    let dir = data_dir();
    let inner = open_store(dir.path(), &backend).await;
    let store = Arc::new(CommitReplyLost::new(inner, LIES));
    let metrics_before = tally::metrics::handle().render();
    let app = spawn_app(
        test_config(dir.path(), &backend),
        Some(Arc::clone(&store) as Arc<dyn Store>),
    )
    .await;

    // Rounds of increments, spaced so that several batches are flushed (and lied about).
    let mut want = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut n = 0;
    while n < 4 || store.lies.load(Ordering::SeqCst) < LIES {
        assert!(
            Instant::now() < deadline,
            "only {} commits reported lost after {n} rounds",
            store.lies.load(Ordering::SeqCst)
        );
        round(&app, n, &mut want).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        n += 1;
    }
    // One more lie for the last batch, which a periodic flush or the drain writes. If
    // shutdown interrupts that flush mid-apply, the drain re-applies the batch instead, and
    // the store skips it without any lie being told.
    store.lies_left.store(1, Ordering::SeqCst);
    round(&app, n, &mut want).await;
    app.shutdown().await.expect("clean shutdown");

    let lies = store.lies.load(Ordering::SeqCst);
    assert!(
        (LIES..=LIES + 1).contains(&lies),
        "{lies} commits reported lost"
    );
    let skipped = store.already_applied.load(Ordering::SeqCst);
    assert!(
        skipped >= lies,
        "{lies} lost commits but only {skipped} retries skipped by the store"
    );
    let stored = stored_counters(dir.path(), &backend).await;
    assert_eq!(stored, want, "every delta counted exactly once");

    // The flush metrics show the failures and the skipped retries (the recorder is
    // process-wide, so compare with the values before).
    let metrics_after = tally::metrics::handle().render();
    for sample in [
        r#"tally_flush_batches_total{result="failed"}"#,
        r#"tally_flush_batches_total{result="already_applied"}"#,
    ] {
        let (before, after) = (
            metric(&metrics_before, sample),
            metric(&metrics_after, sample),
        );
        assert!(
            after - before >= lies as f64,
            "{sample} went from {before} to {after}"
        );
    }
}

on_both_stores!(
    a_batch_whose_commit_reply_is_lost_is_retried_without_double_counting_sqlite,
    a_batch_whose_commit_reply_is_lost_is_retried_without_double_counting_postgres,
    a_batch_whose_commit_reply_is_lost_is_retried_without_double_counting
);
