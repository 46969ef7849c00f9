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
//! - the number of pending entries (distinct keys of the live generation plus those of the
//!   batch in flight) is capped: back-pressure instead of unbounded memory, however long the
//!   store stays unreachable.

use std::collections::HashMap;
use std::mem;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::key::{Increment, Key};
use crate::store::DeadLetter;

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
    /// Deltas set aside before the batch is written, recorded with it (journal replay's).
    pub(crate) dead_letters: Vec<DeadLetter>,
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

    /// A batch assembled outside the aggregator: journal replay writes each journal
    /// generation as the batch it would have been. It is written directly, never put in
    /// flight, so its deltas need not be split by shard.
    pub(crate) fn from_deltas(
        seq: u64,
        deltas: impl IntoIterator<Item = (Box<str>, i64)>,
        dead_letters: Vec<DeadLetter>,
    ) -> Self {
        Self {
            seq,
            oldest: None,
            shards: vec![deltas.into_iter().collect()],
            dead_letters,
        }
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
    /// Distinct keys in the batch in flight: set by `seal`, cleared by `complete`. Counted
    /// against the cap with `live_keys`, because a batch retried through an outage holds its
    /// memory until the store takes it.
    inflight_keys: AtomicUsize,
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
            inflight_keys: AtomicUsize::new(0),
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
    /// key is new to the live generation and the cap on pending keys is reached (checked
    /// without a global lock, so concurrent inserts may pass it by at most one key per
    /// thread). A key pending only in the batch in flight is new to the live generation: it
    /// takes a second entry of memory, so it counts again.
    pub fn add(&self, key: &Key, delta: i64) -> Result<u64, AddError> {
        let mut shard = lock(&self.shards[self.shard_of(key.as_str())]);
        let generation = shard.generation;
        if let Some(sum) = shard.deltas.get_mut(key.as_str()) {
            *sum = sum.checked_add(delta).ok_or_else(|| overflow(key, delta))?;
            return Ok(generation);
        }
        self.reserve_keys(1)?;
        shard.deltas.insert(key.as_str().into(), delta);
        // Counted before the shard lock is released: `seal` subtracts every key it takes, so
        // a key it can take must already be counted, or `live_keys` wraps below zero.
        self.note_inserted(1);
        drop(shard);
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
        let mut sums: HashMap<&str, (usize, i64), ahash::RandomState> =
            HashMap::with_capacity_and_hasher(order.len(), ahash::RandomState::new());
        let mut new_keys = 0;
        for &(s, item) in &order {
            let g = shard(&guards, s).expect("every involved shard is locked");
            let key = item.key.as_str();
            let current = match sums.get(key) {
                Some(&(_, sum)) => sum,
                None => guards[g].1.deltas.get(key).copied().unwrap_or_else(|| {
                    new_keys += 1;
                    0
                }),
            };
            let sum = current
                .checked_add(item.delta)
                .ok_or_else(|| overflow(&item.key, item.delta))?;
            sums.insert(key, (g, sum));
        }
        self.reserve_keys(new_keys)?;
        // Write pass: cannot fail.
        for (key, (g, sum)) in sums {
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
        if n > 0 && self.pending_keys() + n > self.max_pending_keys {
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
            dead_letters: Vec::new(),
        });
        // In-flight first: between the two the count is briefly high (a new key may be
        // refused), never low (the cap could be passed).
        self.inflight_keys.store(sealed.len(), Ordering::Relaxed);
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
            self.inflight_keys.store(0, Ordering::Relaxed);
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

    /// Keys not yet in the store: those of the live generation plus those of the batch in
    /// flight (a key in both counts twice: it takes two entries). What `--max-pending-keys`
    /// caps and `tally_pending_keys` shows.
    pub fn pending_keys(&self) -> usize {
        self.live_keys.load(Ordering::Relaxed) + self.inflight_keys.load(Ordering::Relaxed)
    }

    /// Whether new keys are being refused for lack of room.
    pub fn is_full(&self) -> bool {
        self.pending_keys() >= self.max_pending_keys
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::thread;

    use proptest::prelude::*;

    use super::*;

    fn key(s: &str) -> Key {
        Key::parse(s, 256).expect("valid test key")
    }

    fn inc(k: &str, delta: i64) -> Increment {
        Increment { key: key(k), delta }
    }

    /// Every key's sum in a sealed batch.
    fn sums(batch: &Sealed) -> BTreeMap<String, i64> {
        batch
            .sorted()
            .into_iter()
            .map(|(k, d)| (k.to_owned(), d))
            .collect()
    }

    /// Everything pending in the live generation, by sealing it.
    fn drain(agg: &Aggregator) -> BTreeMap<String, i64> {
        match agg.seal() {
            Some(batch) => {
                agg.complete(batch.seq);
                sums(&batch)
            }
            None => BTreeMap::new(),
        }
    }

    fn live(agg: &Aggregator, k: &str) -> Option<i64> {
        agg.pending(k).0.live
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Concurrent adds (single and batched) from many threads sum exactly.
        #[test]
        fn concurrent_adds_from_many_threads_sum_exactly(
            threads in prop::collection::vec(
                prop::collection::vec((0u8..12, -1_000_000i64..1_000_000, any::<bool>()), 1..200),
                2..8,
            ),
        ) {
            let agg = Aggregator::new(1, 0, usize::MAX, usize::MAX);
            thread::scope(|s| {
                for ops in &threads {
                    let agg = &agg;
                    s.spawn(move || {
                        for chunk in ops.chunks(3) {
                            let items: Vec<Increment> = chunk
                                .iter()
                                .map(|(k, d, _)| inc(&format!("k{k}"), *d))
                                .collect();
                            if chunk[0].2 {
                                agg.add_all(&items).expect("no overflow at these sizes");
                            } else {
                                for item in &items {
                                    agg.add(&item.key, item.delta).expect("no overflow");
                                }
                            }
                        }
                    });
                }
            });
            let mut want: BTreeMap<String, i64> = BTreeMap::new();
            for (k, d, _) in threads.iter().flatten() {
                *want.entry(format!("k{k}")).or_default() += d;
            }
            prop_assert_eq!(agg.live_keys(), want.len());
            prop_assert_eq!(drain(&agg), want);
            prop_assert_eq!(agg.live_keys(), 0);
        }

        /// `add` and `add_all` against a model: refused on overflow and on the key cap,
        /// never wrapped, and a refused batch changes nothing.
        #[test]
        fn adds_match_a_model_with_overflow_and_the_key_cap(
            ops in prop::collection::vec(
                prop::collection::vec(
                    (0u8..6, prop_oneof![
                        Just(i64::MAX), Just(i64::MIN), Just(1i64), Just(-1i64),
                        -10i64..10, any::<i64>(),
                    ]),
                    1..4,
                ),
                1..40,
            ),
            cap in 1usize..6,
        ) {
            let agg = Aggregator::new(1, 0, cap, usize::MAX);
            let mut model: BTreeMap<String, i64> = BTreeMap::new();
            for op in &ops {
                let items: Vec<Increment> =
                    op.iter().map(|(k, d)| inc(&format!("k{k}"), *d)).collect();
                // The model's answer: overflow first, then the cap on new keys.
                let mut next = model.clone();
                let mut overflow = false;
                for item in &items {
                    let sum = next.entry(item.key.to_string()).or_default();
                    match sum.checked_add(item.delta) {
                        Some(s) => *sum = s,
                        None => overflow = true,
                    }
                }
                let full = next.len() > cap;
                let got = if items.len() == 1 {
                    agg.add(&items[0].key, items[0].delta)
                } else {
                    agg.add_all(&items)
                };
                match got {
                    Ok(_) => {
                        prop_assert!(!overflow && !full, "accepted {op:?} on {model:?}");
                        model = next;
                    }
                    Err(AddError::Overflow { .. }) => prop_assert!(overflow, "{op:?}"),
                    Err(AddError::Full { limit }) => {
                        prop_assert!(full && !overflow, "{op:?}");
                        prop_assert_eq!(limit, cap);
                    }
                }
                for k in 0..6 {
                    let k = format!("k{k}");
                    prop_assert_eq!(live(&agg, &k), model.get(&k).copied(), "key {}", k);
                }
                prop_assert_eq!(agg.live_keys(), model.len());
            }
        }
    }

    /// Sealing generations while other threads keep adding: every delta lands in exactly
    /// one batch, the one whose seq `add` returned.
    #[test]
    fn sealing_while_adds_continue_loses_and_duplicates_nothing() {
        const THREADS: u64 = 8;
        const ADDS: u64 = 20_000;
        let agg = Aggregator::new(1, 0, usize::MAX, usize::MAX);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (per_thread, batches) = thread::scope(|s| {
            let adders: Vec<_> = (0..THREADS)
                .map(|t| {
                    let agg = &agg;
                    s.spawn(move || {
                        // What this thread put in each generation: (seq, key) -> sum.
                        let mut sent: BTreeMap<(u64, String), i64> = BTreeMap::new();
                        for i in 0..ADDS {
                            let k = format!("k{}", (i * 7 + t) % 64);
                            let delta = i64::try_from(i % 97).expect("small") - 40;
                            let seq = if i % 5 == 0 {
                                agg.add_all(&[inc(&k, delta), inc("shared", 1)])
                                    .expect("no overflow")
                            } else {
                                agg.add(&key(&k), delta).expect("no overflow")
                            };
                            *sent.entry((seq, k)).or_default() += delta;
                            if i % 5 == 0 {
                                *sent.entry((seq, "shared".to_owned())).or_default() += 1;
                            }
                        }
                        sent
                    })
                })
                .collect();
            let sealer = s.spawn(|| {
                let mut batches = Vec::new();
                while !stop.load(Ordering::Acquire) {
                    if let Some(batch) = agg.seal() {
                        agg.complete(batch.seq);
                        batches.push(batch);
                    }
                    // Never more keys than exist, even for a moment (a key counted after
                    // `seal` took it would make the count wrap below zero).
                    let live = agg.live_keys();
                    assert!(live <= 64 + 1, "live_keys is {live}");
                    thread::yield_now();
                }
                batches
            });
            let per_thread: Vec<_> = adders
                .into_iter()
                .map(|h| h.join().expect("adder panicked"))
                .collect();
            stop.store(true, Ordering::Release);
            (per_thread, sealer.join().expect("sealer panicked"))
        });
        let mut batches = batches;
        batches.extend(agg.seal());
        assert!(
            batches.len() > 2,
            "only {} generations were sealed: the test did not race",
            batches.len()
        );
        assert!(
            batches.windows(2).all(|w| w[0].seq < w[1].seq),
            "seqs grow with every seal"
        );
        // Per generation and key: what the batch holds == what the threads said they put in.
        let mut want: BTreeMap<(u64, String), i64> = BTreeMap::new();
        for sent in &per_thread {
            for (k, d) in sent {
                *want.entry(k.clone()).or_default() += d;
            }
        }
        let got: BTreeMap<(u64, String), i64> = batches
            .iter()
            .flat_map(|b| sums(b).into_iter().map(move |(k, d)| ((b.seq, k), d)))
            .collect();
        assert_eq!(got, want);
        // And the totals equal what was sent.
        let total: i64 = got.values().sum();
        let sent: i64 = (0..THREADS)
            .map(|_| {
                (0..ADDS)
                    .map(|i| i64::try_from(i % 97).expect("small") - 40 + i64::from(i % 5 == 0))
                    .sum::<i64>()
            })
            .sum();
        assert_eq!(total, sent);
        assert_eq!(agg.live_keys(), 0);
    }

    /// Every add inserts a fresh key while generations are sealed: the count of pending keys
    /// must never count a key `seal` already took (it would wrap below zero, and the next
    /// add would see an absurd count).
    #[test]
    fn the_pending_key_count_stays_exact_while_sealing() {
        const THREADS: usize = 8;
        const ADDS: usize = 30_000;
        let agg = Aggregator::new(1, 0, usize::MAX / 2, usize::MAX);
        let stop = std::sync::atomic::AtomicBool::new(false);
        let sealed = thread::scope(|s| {
            let sealer = s.spawn(|| {
                let mut keys = 0;
                while !stop.load(Ordering::Acquire) {
                    if let Some(batch) = agg.seal() {
                        agg.complete(batch.seq);
                        keys += batch.len();
                    }
                    let live = agg.live_keys();
                    assert!(live <= THREADS * ADDS, "live_keys is {live}");
                }
                keys
            });
            let adders: Vec<_> = (0..THREADS)
                .map(|t| {
                    let agg = &agg;
                    s.spawn(move || {
                        for i in 0..ADDS {
                            agg.add(&key(&format!("{t}-{i}")), 1).expect("room");
                        }
                    })
                })
                .collect();
            for adder in adders {
                adder.join().expect("adder panicked");
            }
            stop.store(true, Ordering::Release);
            sealer.join().expect("sealer panicked")
        });
        assert_eq!(sealed + drain(&agg).len(), THREADS * ADDS);
        assert_eq!(agg.live_keys(), 0);
    }

    #[test]
    fn add_all_adds_nothing_when_one_item_would_overflow() {
        let agg = Aggregator::new(1, 0, 100, usize::MAX);
        agg.add(&key("a"), i64::MAX).expect("fits");
        let before = agg.live_keys();
        let err = agg
            .add_all(&[inc("b", 1), inc("a", 1), inc("c", 2)])
            .expect_err("a would overflow");
        assert_eq!(
            err,
            AddError::Overflow {
                key: key("a"),
                delta: 1
            }
        );
        assert_eq!(
            (live(&agg, "a"), live(&agg, "b"), live(&agg, "c")),
            (Some(i64::MAX), None, None)
        );
        assert_eq!(agg.live_keys(), before);
        // Overflow within the batch itself, on a key not yet pending.
        agg.add_all(&[inc("d", i64::MIN), inc("e", 1), inc("d", -1)])
            .expect_err("d would overflow");
        assert_eq!((live(&agg, "d"), live(&agg, "e")), (None, None));
        assert_eq!(agg.live_keys(), before);
    }

    #[test]
    fn add_all_adds_nothing_when_the_pending_key_cap_would_be_passed() {
        let agg = Aggregator::new(1, 0, 3, usize::MAX);
        agg.add_all(&[inc("a", 1), inc("b", 1)])
            .expect("room for two");
        let err = agg
            .add_all(&[inc("a", 5), inc("c", 1), inc("d", 1)])
            .expect_err("four keys > cap of three");
        assert_eq!(err, AddError::Full { limit: 3 });
        assert_eq!(
            (live(&agg, "a"), live(&agg, "c"), live(&agg, "d")),
            (Some(1), None, None)
        );
        assert!(!agg.is_full());
        // Existing keys are always accepted, one new key fits, then the cap holds.
        agg.add_all(&[inc("a", 5), inc("b", 1), inc("c", 1)])
            .expect("one new key fits");
        assert!(agg.is_full());
        assert_eq!(agg.add(&key("d"), 1), Err(AddError::Full { limit: 3 }));
        agg.add(&key("a"), 1)
            .expect("an existing key needs no room");
        // Sealing makes room again.
        assert_eq!(drain(&agg).len(), 3);
        agg.add(&key("d"), 1).expect("room after the seal");
    }

    /// A batch retried through a store outage holds its keys: they count against the cap
    /// until the store takes the batch, so memory stays bounded however long it lasts.
    #[test]
    fn keys_of_the_batch_in_flight_count_against_the_cap() {
        let agg = Aggregator::new(1, 0, 3, usize::MAX);
        for k in ["a", "b", "c"] {
            agg.add(&key(k), 1).expect("under the cap");
        }
        let batch = agg.seal().expect("three keys pending");
        assert_eq!(agg.pending_keys(), 3, "sealed keys are still pending");
        assert!(agg.is_full());
        assert_eq!(
            agg.add(&key("d"), 1),
            Err(AddError::Full { limit: 3 }),
            "a new key while the batch is in flight"
        );
        assert_eq!(
            agg.add_all(&[inc("a", 1), inc("e", 1)]),
            Err(AddError::Full { limit: 3 }),
            "a key only in flight takes a new live entry"
        );
        agg.complete(batch.seq);
        assert_eq!(agg.pending_keys(), 0, "the store has the batch");
        assert!(
            agg.add(&key("d"), 1).is_ok(),
            "room again once it is applied"
        );
        assert_eq!(agg.pending_keys(), 1);
    }

    #[test]
    fn an_overflowing_add_is_refused_not_wrapped() {
        let agg = Aggregator::new(1, 0, 100, usize::MAX);
        agg.add(&key("up"), i64::MAX - 1).expect("fits");
        agg.add(&key("up"), 1).expect("reaches MAX exactly");
        assert_eq!(
            agg.add(&key("up"), 1),
            Err(AddError::Overflow {
                key: key("up"),
                delta: 1
            })
        );
        assert_eq!(live(&agg, "up"), Some(i64::MAX));
        agg.add(&key("down"), i64::MIN).expect("fits");
        assert!(matches!(
            agg.add(&key("down"), -1),
            Err(AddError::Overflow { .. })
        ));
        assert_eq!(live(&agg, "down"), Some(i64::MIN));
        // Moving back from the edge is fine.
        agg.add(&key("up"), i64::MIN).expect("MAX + MIN = -1");
        assert_eq!(live(&agg, "up"), Some(-1));
    }

    #[test]
    fn seal_returns_none_and_starts_nothing_when_empty() {
        let agg = Aggregator::new(7, 6, 100, usize::MAX);
        assert!(agg.seal().is_none());
        assert_eq!(agg.generation(), 7);
        assert_eq!(agg.add(&key("a"), 1), Ok(7));
        let batch = agg.seal().expect("one key pending");
        assert_eq!((batch.seq, batch.len()), (7, 1));
        assert_eq!(agg.generation(), 8);
        agg.complete(batch.seq);
        assert_eq!(agg.applied_seq(), 7);
        assert!(agg.inflight().is_none());
        assert!(agg.seal().is_none());
        assert_eq!(agg.generation(), 8);
        assert_eq!(agg.add(&key("b"), 1), Ok(8));
    }
}
