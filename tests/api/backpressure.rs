//! Bounded memory (invariant 6): past `--max-pending-keys`, new keys get 503 with
//! `Retry-After` and `/readyz` says why, while keys already pending still add; nothing
//! accepted is lost.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tally::store::{Applied, Batch, Claim, Claimant, Store, StoreError, Stored};

use crate::app::{spawn_app, test_config};
use crate::both_stores::on_both_stores;
use crate::common::{Backend, data_dir};
use crate::helpers::open_store;
use crate::metrics::{metric, scrape};
use crate::store::stored_counters;

async fn new_keys_are_shed_with_503_past_the_pending_key_cap(backend: Backend) {
    let dir = data_dir();
    let mut config = test_config(dir.path(), &backend);
    config.flush.max_pending_keys = 3_usize.try_into().expect("non-zero");
    // Nothing is flushed while the test runs, so the cap stays reached.
    config.flush.interval = Duration::from_secs(3600);
    let app = spawn_app(config, None).await;
    for key in ["a", "b", "c"] {
        assert_eq!(app.increment(key, 1).await, 202, "key {key} under the cap");
    }

    let response = app
        .post_raw(
            &format!("{}/increment", app.address),
            "application/json",
            r#"{"key":"d","value":1}"#,
        )
        .await;
    assert_eq!(response.status(), 503, "a fourth key is refused");
    assert!(
        response.headers().contains_key("retry-after"),
        "503 carries Retry-After"
    );
    let body: serde_json::Value = response.json().await.expect("json body");
    assert_eq!(body["error"], "overloaded");

    assert_eq!(app.increment("a", 5).await, 202, "a pending key still adds");
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), 503, "/readyz reports the shedding");
    let body: serde_json::Value = ready.json().await.expect("json body");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("max-pending-keys")),
        "/readyz says why: {body}"
    );

    app.shutdown().await.expect("clean shutdown");
    let stored = stored_counters(dir.path(), &backend).await;
    let want = [("a", 6), ("b", 1), ("c", 1)].map(|(k, v)| (k.to_owned(), v));
    assert_eq!(
        stored,
        want.into_iter().collect(),
        "accepted deltas only, all of them"
    );
}

on_both_stores!(
    new_keys_are_shed_with_503_past_the_pending_key_cap_sqlite,
    new_keys_are_shed_with_503_past_the_pending_key_cap_postgres,
    new_keys_are_shed_with_503_past_the_pending_key_cap
);

/// A real store that refuses every batch while `down` is set, as an unreachable database
/// would: the flusher keeps its sealed batch in flight and retries it.
struct Outage {
    inner: Arc<dyn Store>,
    down: AtomicBool,
    /// Batches refused so far.
    refused: AtomicUsize,
}

impl Outage {
    fn refuse(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::Unavailable(Box::new(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "database unreachable (injected by the test)",
            ))));
        }
        Ok(())
    }
}

#[async_trait]
impl Store for Outage {
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
        self.refuse()?;
        self.inner.apply(batch).await
    }

    async fn probe(&self, entries: &[(&str, i64)]) -> Result<(), StoreError> {
        self.refuse()?;
        self.inner.probe(entries).await
    }

    async fn read(&self, key: &str, instance_id: &str) -> Result<Stored, StoreError> {
        self.inner.read(key, instance_id).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.refuse()?;
        self.inner.ping().await
    }
}

/// During an outage the batch being retried still holds its keys: they count against
/// `--max-pending-keys`, so the live generation cannot fill up again behind it and memory
/// stays bounded however long the outage lasts.
async fn the_pending_key_cap_counts_the_batch_retried_through_an_outage(backend: Backend) {
    const CAP: usize = 100;
    let dir = data_dir();
    let store = Arc::new(Outage {
        inner: open_store(dir.path(), &backend).await,
        down: AtomicBool::new(true),
        refused: AtomicUsize::new(0),
    });
    let mut config = test_config(dir.path(), &backend);
    config.flush.max_pending_keys = CAP.try_into().expect("non-zero");
    config.flush.interval = Duration::from_millis(50);
    let app = spawn_app(config, Some(Arc::clone(&store) as Arc<dyn Store>)).await;

    let mut accepted = BTreeMap::new();
    for i in 0..60 {
        let key = format!("k{i}");
        assert_eq!(app.increment(&key, 1).await, 202, "{key} under the cap");
        accepted.insert(key, 1);
    }
    // Wait until the flusher has sealed those 60 keys and failed to write them.
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.refused.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the flusher never tried the store"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut shed = 0;
    for i in 60..150 {
        let key = format!("k{i}");
        match app.increment(&key, 1).await {
            202 => {
                accepted.insert(key, 1);
            }
            503 => shed += 1,
            other => panic!("{key}: unexpected status {other}"),
        }
    }
    assert_eq!(
        accepted.len(),
        CAP,
        "60 keys in flight + 40 live fill the cap; {shed} shed"
    );
    let exposition = scrape(&app.client, &app.address).await;
    assert_eq!(
        metric(&exposition, "tally_pending_keys"),
        CAP as f64,
        "the gauge counts the batch in flight too"
    );

    store.down.store(false, Ordering::SeqCst);
    app.shutdown()
        .await
        .expect("clean shutdown drains once the store is back");
    assert_eq!(
        stored_counters(dir.path(), &backend).await,
        accepted,
        "every accepted delta, nothing else"
    );
}

on_both_stores!(
    the_pending_key_cap_counts_the_batch_retried_through_an_outage_sqlite,
    the_pending_key_cap_counts_the_batch_retried_through_an_outage_postgres,
    the_pending_key_cap_counts_the_batch_retried_through_an_outage
);
