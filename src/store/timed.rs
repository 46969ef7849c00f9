//! `--store-timeout`: a deadline on every store operation.
//!
//! A database connection can hang instead of failing (a partition that drops packets
//! without a reset, a failover, a proxy that stops forwarding): without a deadline the
//! flusher would wait on its first attempt for as long as the kernel keeps retrying (about
//! 15 minutes), with no log line and no failed count. With one, the attempt is abandoned
//! after the deadline and reported as [`StoreError::Unavailable`], so the flusher logs it,
//! counts it `failed` and retries the same batch, which is safe: a batch whose commit
//! outcome is unknown is skipped by the store if it did commit.
//!
//! [`Store::claim`] waits on purpose (for another process's session lock, up to
//! [`CLAIM_WAIT`], and for a predecessor's commit still in progress), so its deadline is the
//! store timeout plus that wait; it runs once, at start-up, before anything is acknowledged.

/// What a claim may wait on top of `--store-timeout` (PostgreSQL: for the session lock of a
/// predecessor that just died).
pub const CLAIM_WAIT: Duration = Duration::from_secs(5);

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{Applied, Batch, Claim, Claimant, Store, StoreError, Stored};

/// A store whose every operation fails after `timeout` ([`Store::claim`]: `timeout` plus
/// [`CLAIM_WAIT`]).
pub struct Timed {
    inner: Arc<dyn Store>,
    timeout: Duration,
}

impl Timed {
    pub fn new(inner: Arc<dyn Store>, timeout: Duration) -> Self {
        Self { inner, timeout }
    }

    async fn within<T>(
        &self,
        operation: &'static str,
        f: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        Self::within_for(operation, self.timeout, f).await
    }

    pub(super) async fn within_for<T>(
        operation: &'static str,
        timeout: Duration,
        f: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        (tokio::time::timeout(timeout, f).await)
            .map_err(|_| StoreError::unavailable(TimedOut { operation, timeout }))?
    }
}

/// An operation given up on at its deadline.
#[derive(Debug, thiserror::Error)]
#[error("{operation} got no answer within {timeout:?} (--store-timeout)")]
pub struct TimedOut {
    pub operation: &'static str,
    pub timeout: Duration,
}

#[async_trait]
impl Store for Timed {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn wants_own_thread(&self) -> bool {
        self.inner.wants_own_thread()
    }

    async fn claim(&self, instance_id: &str, by: Claimant<'_>) -> Result<Claim, StoreError> {
        let deadline = self.timeout + CLAIM_WAIT;
        Self::within_for(
            "the claim of the instance id",
            deadline,
            self.inner.claim(instance_id, by),
        )
        .await
    }

    async fn apply(&self, batch: Batch<'_>) -> Result<Applied, StoreError> {
        self.within("the batch's transaction", self.inner.apply(batch))
            .await
    }

    async fn probe(&self, entries: &[(&str, i64)]) -> Result<(), StoreError> {
        self.within("a probe", self.inner.probe(entries)).await
    }

    async fn read(&self, key: &str, instance_id: &str) -> Result<Stored, StoreError> {
        self.within("a read", self.inner.read(key, instance_id))
            .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.within("a ping", self.inner.ping()).await
    }
}
