//! Micro-benchmarks of the aggregator's hot path: `Aggregator::add` on a key that is already
//! pending (the common case under load), on a new key (an insert into a shard map), and on one
//! hot key hammered from several threads at once (shard-lock contention).
//!
//! Run with `cargo bench --bench aggregator`; `docs/benchmarks.md` records the figures.

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tally::aggregate::Aggregator;
use tally::key::Key;

/// Keys `k0..k{n}`, as the HTTP benchmark draws them.
fn keys(n: usize) -> Vec<Key> {
    (0..n)
        .map(|i| Key::parse(format!("k{i}"), 256).expect("benchmark keys are valid"))
        .collect()
}

/// An aggregator that never refuses a key and never asks for a flush during the benchmark.
fn aggregator() -> Aggregator {
    Aggregator::new(1, 0, usize::MAX, usize::MAX)
}

fn existing_keys(c: &mut Criterion) {
    let mut group = c.benchmark_group("add_existing_key");
    group.throughput(Throughput::Elements(1));
    for n in [1_000usize, 100_000] {
        let keys = keys(n);
        let agg = aggregator();
        for k in &keys {
            agg.add(k, 1).expect("room for every key");
        }
        let mut i = 0usize;
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                // A cheap stride through the keyspace, so the caches see a realistic spread.
                i = (i + 7919) % n;
                black_box(agg.add(&keys[i], 1)).expect("no overflow")
            });
        });
    }
    group.finish();
}

fn new_keys(c: &mut Criterion) {
    let mut group = c.benchmark_group("add_new_key");
    group.throughput(Throughput::Elements(1));
    // Each iteration inserts a key the aggregator has not seen. Keys are built outside the
    // timed region; a fresh aggregator every 1M keys keeps the maps at a realistic size.
    const PER_AGGREGATOR: usize = 1_000_000;
    let keys = keys(PER_AGGREGATOR);
    group.bench_function("distinct", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters as usize;
            while left > 0 {
                let n = left.min(PER_AGGREGATOR);
                let agg = aggregator();
                let started = Instant::now();
                for k in &keys[..n] {
                    black_box(agg.add(k, 1)).expect("room for every key");
                }
                total += started.elapsed();
                drop(agg);
                left -= n;
            }
            total
        });
    });
    group.finish();
}

fn contended_hot_key(c: &mut Criterion) {
    let mut group = c.benchmark_group("add_hot_key_contended");
    group.throughput(Throughput::Elements(1));
    let key = Key::parse("hot", 256).expect("valid key");
    for threads in [1usize, 2, 4] {
        group.bench_function(BenchmarkId::new("threads", threads), |b| {
            b.iter_custom(|iters| {
                let agg = Arc::new(aggregator());
                let per_thread = (iters as usize).div_ceil(threads);
                let start = Arc::new(Barrier::new(threads + 1));
                let handles: Vec<_> = (0..threads)
                    .map(|_| {
                        let agg = Arc::clone(&agg);
                        let key = key.clone();
                        let start = Arc::clone(&start);
                        thread::spawn(move || {
                            start.wait();
                            for _ in 0..per_thread {
                                black_box(agg.add(&key, 1)).expect("no overflow");
                            }
                        })
                    })
                    .collect();
                start.wait();
                let started = Instant::now();
                for h in handles {
                    h.join().expect("benchmark thread");
                }
                // Wall time for `iters` adds spread over the threads: the per-add cost as the
                // service sees it (throughput), not the per-thread latency.
                started.elapsed()
            });
        });
    }
    group.finish();
}

fn seal_and_sort(c: &mut Criterion) {
    // The flusher's own work per batch besides the database: seal the live generation, sort
    // the batch by key, drop it after the commit.
    let mut group = c.benchmark_group("seal_sort_drop");
    for n in [10_000usize, 100_000] {
        let keys = keys(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let agg = aggregator();
                    for k in &keys {
                        agg.add(k, 1).expect("room for every key");
                    }
                    let started = Instant::now();
                    let sealed = agg.seal().expect("keys are pending");
                    let sorted = sealed.sorted();
                    black_box(&sorted);
                    drop(sorted);
                    agg.complete(sealed.seq);
                    drop(sealed);
                    total += started.elapsed();
                }
                total
            });
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20);
    targets = existing_keys, new_keys, contended_hot_key, seal_and_sort
}
criterion_main!(benches);
