//! The flusher: the one task that moves pending deltas into the store.
//!
//! Every flush interval, or sooner when asked (too many pending keys, or `ack=store`
//! requests waiting), it seals the live generation into a batch numbered `(instance_id, seq)`
//! and applies it in one transaction. While a batch is being written, ingest goes on into
//! the next generation. A batch that fails is retried *as it was*, with capped exponential
//! backoff, until the store takes it; no newer batch is sealed meanwhile, so seqs reach the
//! store in order and a retry after an unknown commit outcome is skipped by the store
//! instead of counted twice.
//!
//! Every batch carries the epoch of this process's claim on its instance id (see
//! [`crate::store`] on fencing). If the store answers that another process has claimed the
//! id since, the flusher stops writing for good and marks the instance fenced: handlers
//! refuse increments and `/readyz` fails, rather than acknowledging deltas that would never
//! reach the store.
//!
//! A batch the store rejects for a data reason (a sum beyond 64 bits) is searched for the
//! offending keys, which are moved to the dead-letter table in the same transaction as the
//! rest of the batch: a poison key never wedges the flusher.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use anyhow::bail;
use tokio_util::sync::CancellationToken;

use crate::aggregate::{Aggregator, Sealed};
use crate::applied::AppliedSeq;
use crate::journal::Journal;
use crate::metrics::Metrics;
use crate::store::{Applied, Batch, DeadLetter, Store, StoreError};

/// First retry delay after a failed batch.
const BACKOFF_START: Duration = Duration::from_millis(50);
/// Longest retry delay: an outage is noticed within this long after the store returns.
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The flusher's view of the store, read by `/readyz`.
#[derive(Debug, Default)]
pub struct FlushHealth {
    /// The error of the last attempt, if it failed; cleared by the next success.
    last_error: Mutex<Option<String>>,
    /// Set once, when the store refused a batch because another process claimed the id or
    /// the store lost this process's claim or batches.
    fenced: OnceLock<String>,
    /// Cancelled when only a new start can go on: the store lost this process's claim, or
    /// batches its journal can write again. `startup` then shuts down, exiting 1, for the
    /// supervisor to start tally again. (Not when another process claimed the id: a new
    /// start would take the id back from it, and the two would take turns.)
    restart: CancellationToken,
}

impl FlushHealth {
    /// The reason the last flush attempt failed, if it did.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Why this instance no longer writes, once another process has claimed its id.
    pub fn fenced(&self) -> Option<&str> {
        self.fenced.get().map(String::as_str)
    }

    /// Cancelled when this process should end, for a new start to go on from what the
    /// store holds (see `restart`).
    pub fn restart_wanted(&self) -> CancellationToken {
        self.restart.clone()
    }

    fn set(&self, error: Option<String>) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = error;
    }
}

/// The flusher task's state. Built by `startup` with [`Flusher::new`], consumed by
/// [`Flusher::run`].
pub struct Flusher {
    aggregator: Arc<Aggregator>,
    store: Arc<dyn Store>,
    /// Trimmed after each applied batch and closed at the end of the drain; `None` when the
    /// caller keeps no journal (benchmarks, `ack=memory` tests of the flusher alone).
    journal: Option<Arc<Journal>>,
    instance_id: Arc<str>,
    /// The epoch of this process's claim on `instance_id`, carried by every batch.
    epoch: u64,
    interval: Duration,
    /// Publishes the seq of each batch the store holds; `ack=store` requests wait on it.
    /// Closed when the flusher is fenced or dropped.
    applied: Arc<AppliedSeq>,
    /// Written by every attempt, read by `/readyz`.
    health: Arc<FlushHealth>,
    /// Every acknowledged increment is in the journal (`ack=journal`), so batches the store
    /// loses can be written again from it by a restart: the flusher stops on such a loss
    /// rather than write past it. Without (`ack=memory`, `ack=store`) nothing could write
    /// them again, and it goes on from what the store holds. True unless told otherwise:
    /// stopping is the side that loses nothing.
    journaled: bool,
    /// A loss of batches taken as it is (not `journaled`): the seq of the batch that found
    /// it and the store's last seq then, which that batch's attempts carry as `applied`. On
    /// the flusher rather than in one call of `write`, since a flush cancelled by shutdown
    /// writes the same batch again in the drain, where the loss must not count twice.
    lost: Mutex<Option<(u64, u64)>>,
}

/// A flusher that is gone publishes nothing more: `ack=store` requests still waiting hear
/// so at once instead of at their timeout.
impl Drop for Flusher {
    fn drop(&mut self) {
        self.applied.close();
    }
}

/// What one call of [`Flusher::flush`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    /// Nothing was pending.
    Nothing,
    /// A batch with this many keys is in the store.
    Batch { keys: usize },
    /// Another process claimed the instance id, or the store lost this process's claim or
    /// batches: nothing was written, and nothing will be.
    Fenced,
}

impl Flusher {
    /// A flusher that writes `aggregator`'s batches to `store` as `instance_id`, every
    /// `interval` or sooner when asked.
    pub fn new(
        aggregator: Arc<Aggregator>,
        store: Arc<dyn Store>,
        instance_id: Arc<str>,
        interval: Duration,
    ) -> Self {
        let applied = Arc::new(AppliedSeq::new(aggregator.applied_seq()));
        Self {
            aggregator,
            store,
            journal: None,
            instance_id,
            epoch: 0,
            interval,
            applied,
            health: Arc::default(),
            journaled: true,
            lost: Mutex::default(),
        }
    }

    /// Whether every acknowledged increment is in the journal (`ack=journal`, the default):
    /// batches the store loses then stop the flusher, for a restart to write them again;
    /// otherwise the flusher logs the loss and goes on.
    #[must_use]
    pub fn journaled(mut self, journaled: bool) -> Self {
        self.journaled = journaled;
        self
    }

    /// Trims `journal` after each applied batch and closes it once drained.
    #[must_use]
    pub fn with_journal(mut self, journal: Arc<Journal>) -> Self {
        self.journal = Some(journal);
        self
    }

    /// Writes every batch under `epoch`, this process's claim on the instance id
    /// ([`crate::store::Store::claim`]). Without it batches carry epoch 0, the epoch of an id
    /// nobody has claimed (benchmarks, tests of the flusher alone).
    #[must_use]
    pub fn with_epoch(mut self, epoch: u64) -> Self {
        self.epoch = epoch;
        self
    }

    /// The seq of the last batch in the store (what `ack=store` requests wait on).
    pub fn applied(&self) -> Arc<AppliedSeq> {
        Arc::clone(&self.applied)
    }

    /// The flusher's view of the store, for `/readyz`.
    pub fn health(&self) -> Arc<FlushHealth> {
        Arc::clone(&self.health)
    }

    /// Flushes on every tick or request until `shutdown`, then drains: flushes until nothing
    /// is pending, giving up after `drain_timeout`.
    ///
    /// # Errors
    ///
    /// If the drain could not finish in time; what was left is still in the journal when
    /// `ack=journal`, and lost otherwise (the error says how many keys).
    pub async fn run(
        self,
        shutdown: CancellationToken,
        drain_timeout: Duration,
    ) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // An interval's first tick completes at once. `startup` has just flushed, so skip it:
        // the first flush comes one interval from now, whatever the first requests bring.
        tick.tick().await;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = tick.tick() => {}
                () = self.aggregator.flush_requested() => {}
            }
            // A flush retrying through an outage must not hold up shutdown: cancelling it
            // leaves its batch in flight, and the drain below applies it (or the store skips
            // it, if the cancelled attempt had committed).
            tokio::select! {
                () = shutdown.cancelled() => break,
                flushed = self.flush() => if flushed == Flushed::Fenced {
                    shutdown.cancelled().await;
                    break;
                }
            }
        }
        tracing::info!("Draining: flushing every pending delta.");
        let drained = tokio::time::timeout(drain_timeout, async {
            while let Flushed::Batch { .. } = self.flush().await {}
        })
        .await;
        let left = self.aggregator.pending_keys();
        if drained.is_err() {
            bail!("final flush did not finish within {drain_timeout:?}: {left} keys not written");
        }
        if let Some(reason) = self.health.fenced() {
            bail!("fenced, {left} keys not written (a journal keeps them): {reason}");
        }
        if let Some(journal) = &self.journal {
            journal.close(self.aggregator.applied_seq()).await?;
        }
        tracing::info!(
            seq = self.aggregator.applied_seq(),
            "Drained: everything is in the store."
        );
        Ok(())
    }

    /// Writes the batch in flight, or seals and writes the live generation; retries until
    /// the store has it.
    pub async fn flush(&self) -> Flushed {
        if self.health.fenced().is_some() {
            return Flushed::Fenced;
        }
        let Some(batch) = self
            .aggregator
            .inflight()
            .or_else(|| self.aggregator.seal())
        else {
            // No batch, so no trim after one: retry the segments whose deletion failed here,
            // on the tick, so that a fault mended while no increments come clears
            // `tally_journal_trim_failing` (and its alert) without waiting for traffic.
            if let Some(journal) = &self.journal
                && journal.trim_failing()
            {
                journal.trim_later(self.aggregator.applied_seq());
            }
            return Flushed::Nothing;
        };
        let Ok(keys) = self.commit(&batch).await else {
            return Flushed::Fenced;
        };
        // On the journal's own thread: this runtime must not wait on the journal's disk.
        if let Some(journal) = &self.journal {
            journal.trim_later(batch.seq);
        }
        // A store that writes in place (SQLite on the flusher's own thread) completes a flush
        // without yielding: yield after each batch, so that the flusher's runtime runs its
        // timers and I/O under load, and the drain's timeout looks at its deadline.
        tokio::task::yield_now().await;
        Flushed::Batch { keys }
    }

    /// Writes `batch` until the store has it, then records it applied (the aggregator drops
    /// it, `ack=store` waiters hear of it); returns its key count. Journal replay calls this
    /// for each recovered batch before the flusher runs.
    ///
    /// # Errors
    ///
    /// [`StoreError::Fenced`] if another process claimed the instance id, or
    /// [`StoreError::WentBack`] or (when `journaled`) [`StoreError::LostBatches`] if the
    /// store lost this process's claim or batches it had committed (the only errors: others
    /// are retried); the batch stays in flight, unwritten.
    pub(crate) async fn commit(&self, batch: &Sealed) -> Result<usize, StoreError> {
        let keys = self.write(batch).await?;
        self.aggregator.complete(batch.seq);
        self.applied.publish(batch.seq);
        Ok(keys)
    }

    /// Applies `batch`, retrying with backoff until it is in the store; returns its key
    /// count, or the store's [`StoreError::Fenced`], [`StoreError::WentBack`] or (when
    /// `journaled`) [`StoreError::LostBatches`].
    async fn write(&self, batch: &Sealed) -> Result<usize, StoreError> {
        let mut entries = batch.sorted();
        let mut dead_letters = batch.dead_letters.clone();
        let mut backoff = BACKOFF_START;
        let mut attempt = 1u32;
        loop {
            // The store's last seq, for this batch, once a loss has been taken as it is.
            let lost_at = self
                .lost
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .filter(|&(seq, _)| seq == batch.seq)
                .map(|(_, stored)| stored);
            let started = Instant::now();
            let result = self
                .store
                .apply(Batch {
                    instance_id: &self.instance_id,
                    epoch: self.epoch,
                    seq: batch.seq,
                    applied: lost_at.unwrap_or_else(|| self.applied.get()),
                    entries: &entries,
                    dead_letters: &dead_letters,
                })
                .await;
            let metrics = Metrics::global();
            metrics.flush_duration.record(started.elapsed());
            let error = match result {
                Ok(applied) => {
                    let (result, counter) = match applied {
                        Applied::Committed => ("committed", &metrics.flush_batches.committed),
                        Applied::AlreadyApplied => {
                            ("already_applied", &metrics.flush_batches.already_applied)
                        }
                    };
                    counter.increment(1);
                    metrics.flush_keys.record(entries.len() as f64);
                    self.health.set(None);
                    if attempt > 1 {
                        tracing::info!(
                            seq = batch.seq,
                            keys = entries.len(),
                            failed_attempts = attempt - 1,
                            "Batch written after failed attempts; the store takes batches again."
                        );
                    }
                    tracing::debug!(
                        seq = batch.seq,
                        keys = entries.len(),
                        dead_letters = dead_letters.len(),
                        duration_ms = started.elapsed().as_secs_f64() * 1e3,
                        result,
                        "Flushed batch."
                    );
                    return Ok(entries.len());
                }
                Err(e @ StoreError::Fenced { .. }) => {
                    metrics.flush_batches.fenced.increment(1);
                    tracing::error!(
                        error = %e, seq = batch.seq, keys = entries.len(),
                        "Fenced: another process claimed this instance id. Writing nothing more and \
                         refusing increments; what is pending stays in the journal (ack=journal). Stop \
                         the other process cleanly and give it its own --instance-id, then restart \
                         this one as it is, to write its journal (docs/operations.md)."
                    );
                    return Err(self.fence(e));
                }
                Err(e @ (StoreError::WentBack { .. } | StoreError::LostBatches { .. })) => {
                    if let StoreError::LostBatches {
                        stored, applied, ..
                    } = e
                    {
                        metrics.store_lost_batches.increment(applied - stored);
                        if !self.journaled {
                            tracing::error!(
                                seq = batch.seq,
                                stored,
                                applied,
                                "The store has gone back in time and lost batches of this instance \
                                 it had committed, after seq `stored` up to seq `applied` (a \
                                 failover to a replica behind its primary, a restore from a \
                                 backup). Their increments are lost: without --ack journal there \
                                 is no journal to write them again from. Going on from what the \
                                 store holds (docs/operations.md)."
                            );
                            *self.lost.lock().unwrap_or_else(PoisonError::into_inner) =
                                Some((batch.seq, stored));
                            continue;
                        }
                    }
                    metrics.flush_batches.fenced.increment(1);
                    tracing::error!(
                        error = %e, seq = batch.seq, keys = entries.len(),
                        "Fenced: the store has gone back in time and lost this process's claim of its \
                         instance id or batches it had committed (the error says which). Writing \
                         nothing more and refusing increments; what is pending stays in the journal \
                         (ack=journal). Shutting down, to exit 1 for the supervisor to start tally \
                         again: the new start claims the id from what the store holds and writes \
                         what its journal still has, lost batches included. Find out what else the \
                         database lost (a failover to a replica behind its primary, a restore from \
                         a backup; docs/operations.md)."
                    );
                    let e = self.fence(e);
                    self.health.restart.cancel();
                    return Err(e);
                }
                Err(StoreError::Rejected { reason, keys }) => {
                    metrics.flush_batches.rejected.increment(1);
                    match self
                        .set_aside(&mut entries, &mut dead_letters, &reason, keys)
                        .await
                    {
                        Ok(()) => continue,
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            };
            let reason = error.failure();
            metrics.flush_batches.failed(reason).increment(1);
            self.health.set(Some(error.to_string()));
            tracing::warn!(
                error = %error, reason = reason.label(), seq = batch.seq, keys = entries.len(), attempt,
                retry_in_ms = backoff.as_millis() as u64,
                "Batch not written; retrying."
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            attempt += 1;
        }
    }

    /// Stops this process writing for good after the store refused a batch's claim
    /// (`error`, returned): increments are refused from now on, and `/readyz` says why.
    fn fence(&self, error: StoreError) -> StoreError {
        let _ = self.health.fenced.set(error.to_string());
        self.health.set(Some(error.to_string()));
        // Nothing more will be applied: `ack=store` requests waiting hear so now rather than
        // at their timeout.
        self.applied.close();
        error
    }

    /// Moves the keys the store refuses from `entries` to `dead_letters`. Uses the store's
    /// list when it names them, else bisects with [`Store::probe`].
    async fn set_aside(
        &self,
        entries: &mut Vec<(&str, i64)>,
        dead_letters: &mut Vec<DeadLetter>,
        reason: &str,
        named: Vec<String>,
    ) -> Result<(), StoreError> {
        let bad: Vec<usize> = if named.is_empty() {
            self.find_rejected(entries).await?
        } else {
            entries
                .iter()
                .enumerate()
                .filter(|(_, (k, _))| named.iter().any(|n| n == k))
                .map(|(i, _)| i)
                .collect()
        };
        if bad.is_empty() {
            // The store refused the batch but accepts every part of it: nothing to set aside,
            // so treat it as a failure that may pass.
            return Err(StoreError::Rejected {
                reason: reason.to_owned(),
                keys: named,
            });
        }
        let first = dead_letters.len();
        for &i in bad.iter().rev() {
            let (key, delta) = entries.remove(i);
            dead_letters.push(DeadLetter {
                key: key.to_owned(),
                delta,
                reason: reason.to_owned(),
            });
        }
        // One line per batch, not per delta: a batch of thousands of poison keys must not
        // bury the log. The table has every one of them.
        let moved = &dead_letters[first..];
        let sample: Vec<&str> = moved.iter().take(5).map(|d| d.key.as_str()).collect();
        tracing::error!(
            deltas = moved.len(),
            keys = ?sample,
            reason,
            "Store refused deltas; moved them to tally_dead_letters (keys: the first five)."
        );
        Metrics::global().dead_letters.increment(bad.len() as u64);
        Ok(())
    }

    /// Indexes of the entries the store refuses, found by bisection: O(bad · log n) probes.
    async fn find_rejected(&self, entries: &[(&str, i64)]) -> Result<Vec<usize>, StoreError> {
        let mut bad = Vec::new();
        // A stack of index ranges still to probe.
        let mut ranges: Vec<std::ops::Range<usize>> = Vec::new();
        ranges.push(0..entries.len());
        while let Some(range) = ranges.pop() {
            match self.store.probe(&entries[range.clone()]).await {
                Ok(()) => {}
                Err(StoreError::Rejected { .. }) if range.len() == 1 => bad.push(range.start),
                Err(StoreError::Rejected { .. }) => {
                    let mid = range.start + range.len() / 2;
                    ranges.push(mid..range.end);
                    ranges.push(range.start..mid);
                }
                Err(e) => return Err(e),
            }
        }
        bad.sort_unstable();
        Ok(bad)
    }
}
