//! The aggregator: a sharded map of pending deltas, split into generations.
//!
//! Ingest adds deltas to the *live generation*. The flusher calls [`Aggregator::seal`], which
//! freezes the live generation into a [`Sealed`] batch numbered with the generation's number
//! and starts a fresh one, so ingest never waits for the database. The sealed batch stays
//! readable (for `GET /counters/{key}`) until the flusher reports it applied with
//! [`Aggregator::complete`].
//!
//! Promises:
//! - every accepted delta is in exactly one generation, and [`Aggregator::add`] /
//!   [`Aggregator::add_all`] say which one (the journal tags its record with it);
//! - sums are checked: an add that would overflow a pending 64-bit delta is refused;
//! - a batch of increments is added entirely or not at all;
//! - the number of distinct pending keys is capped (back-pressure instead of unbounded
//!   memory).

use std::collections::HashMap;
use std::mem;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::key::{Increment, Key};

/// Number of shards. Concurrent adds to different keys contend only when they hash to the
/// same shard; 64 makes that rare on any machine tally targets, and sealing stays 64 cheap
/// swaps. A power of two so the shard index is a mask.
const SHARDS: usize = 64;

type DeltaMap = HashMap<Box<str>, i64, ahash::RandomState>;

/// Why an add was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddError {
    /// Adding the delta would overflow the key's pending 64-bit sum.
    #[error("adding {delta} to the pending sum of key {key:?} would overflow a 64-bit integer")]
    Overflow { key: Key, delta: i64 },
    /// The cap on distinct pending keys is reached; the client should retry later.
    #[error("too many distinct keys are pending ({limit}); retry later")]
    Full { limit: usize },
}

/// One shard of the live generation.
#[derive(Default)]
struct Shard {
    /// Number of the generation these deltas belong to; equal in all shards except while
    /// `seal` sweeps through them.
    generation: u64,
    deltas: DeltaMap,
}

/// A sealed generation: the deltas of one batch, as they were in each shard.
#[derive(Debug)]
pub struct Sealed {
    /// The batch's sequence number: the number of the generation it was.
    pub seq: u64,
    /// When the oldest delta in this batch was added (approximately).
    pub oldest: Option<Instant>,
    shards: Vec<DeltaMap>,
}

impl Sealed {
    /// Number of distinct keys in the batch.
    pub fn len(&self) -> usize {
        self.shards.iter().map(HashMap::len).sum()
    }

    /// Whether the batch holds no delta.
    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(HashMap::is_empty)
    }

    /// The batch's deltas sorted by key: the order every store applies them in, so that two
    /// instances writing overlapping keys always lock rows in the same order (no deadlock).
    pub fn sorted(&self) -> Vec<(&str, i64)> {
        let mut entries: Vec<(&str, i64)> = self
            .shards
            .iter()
            .flat_map(|m| m.iter().map(|(k, d)| (&**k, *d)))
            .collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
        entries
    }

    fn get(&self, shard: usize, key: &str) -> Option<i64> {
        self.shards.get(shard).and_then(|m| m.get(key).copied())
    }
}

/// What this instance holds for a key beyond the store, see [`Aggregator::pending`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// The key's delta in the live generation.
    pub live: Option<i64>,
    /// The key's delta in the sealed batch being written, with that batch's seq.
    pub inflight: Option<(u64, i64)>,
}

/// The sharded map of pending deltas. Shared by every request handler and the flusher.
pub struct Aggregator {
    /// The live generation, split by key hash. Each lock is held for one map operation.
    shards: Box<[Mutex<Shard>]>,
    hasher: ahash::RandomState,
    /// The sealed batch being written, if any, read by `pending`. Its lock also orders
    /// `seal` against readers that need a whole-generation view: `seal` holds it for writing
    /// while it sweeps the shards, `add_all` and `pending` hold it for reading.
    inflight: RwLock<Option<Arc<Sealed>>>,
    /// Number of the live generation (== the seq its batch will get). Written by `seal` only.
    generation: AtomicU64,
    /// Seq of the last batch the store applied for this instance; set by `complete`.
    applied: AtomicU64,
    /// Distinct keys in the live generation: incremented by adds that insert a key,
    /// decreased by `seal` by the number of keys it took.
    live_keys: AtomicUsize,
    /// Micros since `epoch` at which the live generation got its first key; 0 when empty.
    live_since: AtomicU64,
    epoch: Instant,
    max_pending_keys: usize,
    flush_max_keys: usize,
    /// Wakes the flusher early: notified once when the live generation reaches
    /// `flush_max_keys`, and by ack=store requests that wait for a commit.
    flush_now: Notify,
}

/// Locks a shard. A poisoned lock is recovered: no code panics while holding one, and the
/// map inside is valid after any single insert or update anyway.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Aggregator {
    /// An empty aggregator whose live generation is `first_seq`; `applied_seq` is the store's
    /// last applied seq for this instance.
    pub fn new(
        first_seq: u64,
        applied_seq: u64,
        max_pending_keys: usize,
        flush_max_keys: usize,
    ) -> Self {
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    generation: first_seq,
                    ..Shard::default()
                })
            })
            .collect();
        Self {
            shards,
            hasher: ahash::RandomState::new(),
            inflight: RwLock::new(None),
            generation: AtomicU64::new(first_seq),
            applied: AtomicU64::new(applied_seq),
            live_keys: AtomicUsize::new(0),
            live_since: AtomicU64::new(0),
            epoch: Instant::now(),
            max_pending_keys,
            flush_max_keys,
            flush_now: Notify::new(),
        }
    }

    fn shard_of(&self, key: &str) -> usize {
        // Truncation is intended: only the low bits pick the shard.
        (self.hasher.hash_one(key) as usize) & (SHARDS - 1)
    }

    /// Adds `delta` to `key` in the live generation and returns that generation's number.
    ///
    /// # Errors
    ///
    /// [`AddError::Overflow`] if the pending sum would overflow; [`AddError::Full`] if the
    /// key is new and the cap on pending keys is reached (checked without a global lock, so
    /// concurrent inserts may pass it by at most one key per thread).
    pub fn add(&self, key: &Key, delta: i64) -> Result<u64, AddError> {
        let mut shard = lock(&self.shards[self.shard_of(key.as_str())]);
        let generation = shard.generation;
        if let Some(sum) = shard.deltas.get_mut(key.as_str()) {
            *sum = sum.checked_add(delta).ok_or_else(|| overflow(key, delta))?;
            return Ok(generation);
        }
        self.reserve_keys(1)?;
        shard.deltas.insert(key.as_str().into(), delta);
        drop(shard);
        self.note_inserted(1);
        Ok(generation)
    }

    /// Adds every increment, all into one generation, or none of them.
    ///
    /// # Errors
    ///
    /// As [`Aggregator::add`]; when any item fails, nothing was added.
    pub fn add_all(&self, items: &[Increment]) -> Result<u64, AddError> {
        // Holding the inflight lock for reading keeps `seal` out, so every item lands in the
        // same generation and the journal can tag the whole request with one seq.
        let _no_seal = self.inflight.read().unwrap_or_else(PoisonError::into_inner);
        let mut order: Vec<(usize, &Increment)> = items
            .iter()
            .map(|i| (self.shard_of(i.key.as_str()), i))
            .collect();
        order.sort_unstable_by_key(|(shard, _)| *shard);
        // Lock every shard involved, in ascending order (no lock-order cycle with another
        // batch), so the check pass and the write pass see the same sums.
        let mut guards: Vec<(usize, MutexGuard<'_, Shard>)> = Vec::new();
        for &(s, _) in &order {
            if guards.last().is_none_or(|(last, _)| *last != s) {
                guards.push((s, lock(&self.shards[s])));
            }
        }
        let shard = |guards: &[(usize, MutexGuard<'_, Shard>)], s: usize| {
            guards.binary_search_by_key(&s, |(i, _)| *i).ok()
        };
        // Check pass: the new sum of every key, without touching the maps.
        let mut sums: HashMap<&str, (usize, i64, bool), ahash::RandomState> =
            HashMap::with_capacity_and_hasher(order.len(), ahash::RandomState::new());
        let mut new_keys = 0;
        for &(s, item) in &order {
            let g = shard(&guards, s).expect("every involved shard is locked");
            let key = item.key.as_str();
            let (current, existed) = match sums.get(key) {
                Some(&(_, sum, existed)) => (sum, existed),
                None => match guards[g].1.deltas.get(key) {
                    Some(&sum) => (sum, true),
                    None => {
                        new_keys += 1;
                        (0, false)
                    }
                },
            };
            let sum = current
                .checked_add(item.delta)
                .ok_or_else(|| overflow(&item.key, item.delta))?;
            sums.insert(key, (g, sum, existed));
        }
        self.reserve_keys(new_keys)?;
        // Write pass: cannot fail.
        for (key, (g, sum, _)) in sums {
            guards[g].1.deltas.insert(key.into(), sum);
        }
        let generation = guards.first().map_or_else(
            || self.generation.load(Ordering::Acquire),
            |(_, g)| g.generation,
        );
        drop(guards);
        self.note_inserted(new_keys);
        Ok(generation)
    }

    fn reserve_keys(&self, n: usize) -> Result<(), AddError> {
        if n > 0 && self.live_keys.load(Ordering::Relaxed) + n > self.max_pending_keys {
            return Err(AddError::Full {
                limit: self.max_pending_keys,
            });
        }
        Ok(())
    }

    fn note_inserted(&self, n: usize) {
        if n == 0 {
            return;
        }
        let before = self.live_keys.fetch_add(n, Ordering::Relaxed);
        if before == 0 {
            let now = u64::try_from(self.epoch.elapsed().as_micros())
                .unwrap_or(u64::MAX)
                .max(1);
            let _ = self
                .live_since
                .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        }
        if before < self.flush_max_keys && before + n >= self.flush_max_keys {
            self.flush_now.notify_one();
        }
    }

    /// Freezes the live generation into a batch and starts the next one. Returns `None`, and
    /// starts nothing, when no key is pending.
    ///
    /// # Panics
    ///
    /// If a batch is still in flight: the flusher must `complete` one batch before sealing
    /// the next, so that a failed batch is retried as it was and never merged with newer
    /// deltas.
    pub fn seal(&self) -> Option<Arc<Sealed>> {
        if self.live_keys.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut inflight = self
            .inflight
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        assert!(inflight.is_none(), "seal called while a batch is in flight");
        let seq = self.generation.load(Ordering::Acquire);
        let since = self.live_since.swap(0, Ordering::Relaxed);
        let mut taken = Vec::with_capacity(SHARDS);
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            shard.generation = seq + 1;
            let capacity = shard.deltas.len() / 2;
            taken.push(mem::replace(
                &mut shard.deltas,
                HashMap::with_capacity_and_hasher(capacity, self.hasher.clone()),
            ));
        }
        self.generation.store(seq + 1, Ordering::Release);
        let sealed = Arc::new(Sealed {
            seq,
            oldest: (since > 0).then(|| self.epoch + Duration::from_micros(since)),
            shards: taken,
        });
        self.live_keys.fetch_sub(sealed.len(), Ordering::Relaxed);
        *inflight = Some(Arc::clone(&sealed));
        Some(sealed)
    }

    /// Records that the store applied batch `seq` and drops it from memory.
    pub fn complete(&self, seq: u64) {
        let mut inflight = self
            .inflight
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if inflight.as_ref().is_some_and(|b| b.seq == seq) {
            *inflight = None;
        }
        self.applied.fetch_max(seq, Ordering::AcqRel);
    }

    /// The batch sealed but not yet completed, if any.
    pub fn inflight(&self) -> Option<Arc<Sealed>> {
        self.inflight
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// What this instance holds for `key` that the store may not have yet, together with the
    /// seq of the last batch this instance knows applied; one consistent view against `seal`
    /// and `complete`.
    pub fn pending(&self, key: &str) -> (Pending, u64) {
        let inflight = self.inflight.read().unwrap_or_else(PoisonError::into_inner);
        let shard = self.shard_of(key);
        let applied = self.applied.load(Ordering::Acquire);
        let live = lock(&self.shards[shard]).deltas.get(key).copied();
        let inflight = inflight
            .as_ref()
            .and_then(|b| b.get(shard, key).map(|d| (b.seq, d)));
        (Pending { live, inflight }, applied)
    }

    /// Seq of the last batch the store applied for this instance.
    pub fn applied_seq(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// Number of the live generation: the seq its batch will get.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Distinct keys pending in the live generation.
    pub fn live_keys(&self) -> usize {
        self.live_keys.load(Ordering::Relaxed)
    }

    /// Whether new keys are being refused for lack of room.
    pub fn is_full(&self) -> bool {
        self.live_keys() >= self.max_pending_keys
    }

    /// Age of the oldest delta not yet applied to the store.
    pub fn lag(&self) -> Duration {
        let inflight = self.inflight().and_then(|b| b.oldest);
        let since = self.live_since.load(Ordering::Relaxed);
        let live = (since > 0).then(|| self.epoch + Duration::from_micros(since));
        inflight.or(live).map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// Asks the flusher to flush now rather than at the end of its interval.
    pub fn request_flush(&self) {
        self.flush_now.notify_one();
    }

    /// Resolves when a flush is requested (the flusher waits on this).
    pub async fn flush_requested(&self) {
        self.flush_now.notified().await;
    }
}

fn overflow(key: &Key, delta: i64) -> AddError {
    AddError::Overflow {
        key: key.clone(),
        delta,
    }
}
