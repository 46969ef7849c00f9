//! Component benchmarks: memory per pending key, and flush capacity into PostgreSQL.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tally::aggregate::Aggregator;
use tally::flush::{Flushed, Flusher};
use tally::key::Key;
use tally::store::{Applied, Batch, PgStore, Store};

use crate::pg::{self, BenchDb};

/// Resident memory of N distinct pending keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Memory {
    pub keys: usize,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    pub bytes_per_key: f64,
    /// Average length of the keys themselves (`k0` .. `k999999`).
    pub key_bytes_per_key: f64,
    /// `bytes_per_key - key_bytes_per_key`: the target is at most 100.
    pub overhead_bytes_per_key: f64,
}

fn rss_bytes() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page = u64::try_from(page).unwrap_or(4096);
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * page)
}

/// Adds `keys` distinct keys (value 1 each) to a fresh `Aggregator` and measures RSS.
pub fn measure_memory(keys: usize) -> anyhow::Result<Memory> {
    let agg = Aggregator::new(1, 0, usize::MAX, usize::MAX);
    let before = rss_bytes();
    let mut key_bytes = 0usize;
    for i in 0..keys {
        let key = Key::parse(format!("k{i}"), 256).context("benchmark keys are valid")?;
        key_bytes += key.as_str().len();
        agg.add(&key, 1)
            .context("the aggregator has room for every key")?;
    }
    let after = rss_bytes();
    if agg.live_keys() != keys {
        bail!("expected {keys} pending keys, found {}", agg.live_keys());
    }
    let per_key = after.saturating_sub(before) as f64 / keys.max(1) as f64;
    let key_avg = key_bytes as f64 / keys.max(1) as f64;
    std::hint::black_box(&agg);
    Ok(Memory {
        keys,
        rss_before_bytes: before,
        rss_after_bytes: after,
        bytes_per_key: per_key,
        key_bytes_per_key: key_avg,
        overhead_bytes_per_key: per_key - key_avg,
    })
}

/// `tally-bench memory`.
pub fn memory_command(keys: usize, json: bool) -> anyhow::Result<bool> {
    let m = measure_memory(keys)?;
    if json {
        println!("{}", serde_json::to_string(&m)?);
    } else {
        println!(
            "{} distinct pending keys: RSS {:.1} MiB -> {:.1} MiB, {:.1} bytes per key, of which \
             {:.1} are the key's own bytes: {:.1} bytes of overhead per key (target <= 100)",
            m.keys,
            m.rss_before_bytes as f64 / 1048576.0,
            m.rss_after_bytes as f64 / 1048576.0,
            m.bytes_per_key,
            m.key_bytes_per_key,
            m.overhead_bytes_per_key
        );
    }
    Ok(true)
}

/// Runs `tally-bench memory --json` in a fresh process, so its RSS is not this one's.
pub async fn memory_child(self_bin: &Path, keys: usize) -> anyhow::Result<Memory> {
    let out = tokio::process::Command::new(self_bin)
        .args(["memory", "--json", "--keys", &keys.to_string()])
        .output()
        .await
        .context("cannot run tally-bench memory")?;
    if !out.status.success() {
        bail!(
            "tally-bench memory failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("cannot read tally-bench memory's output")
}

/// One point of the flush-capacity benchmark.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CapacityPoint {
    pub keyspace: usize,
    pub batch: usize,
    /// `direct` (the upsert statement in a transaction, through tokio-postgres),
    /// `apply` (`PgStore::apply`: seq check, upsert, seq record) or `flusher`
    /// (`Flusher::flush`: seal, sort, apply, complete).
    pub method: String,
    pub batches: usize,
    pub keys: usize,
    pub seconds: f64,
    pub keys_per_s: f64,
    /// Keys/s of each round, to show the spread.
    pub rounds_keys_per_s: Vec<f64>,
    /// PostgreSQL CPU time per upserted key.
    pub pg_cpu_us_per_key: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Capacity {
    pub points: Vec<CapacityPoint>,
}

/// The statement `PgStore::apply` issues, copied verbatim (src/store/postgres.rs).
const UPSERT: &str = "INSERT INTO counters (key, value) \
     SELECT * FROM unnest($1::text[], $2::int8[]) \
     ON CONFLICT (key) DO UPDATE SET value = counters.value + EXCLUDED.value, updated_at = now()";

/// A small, fast, seeded generator: the same batches on every run.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Method {
    Direct,
    Apply,
    Flusher,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Direct => "direct",
            Method::Apply => "apply",
            Method::Flusher => "flusher",
        }
    }
}

/// Measures keys/s through tally's flusher and `PgStore::apply` against the bare statement,
/// side by side (interleaved), on a fresh database.
pub async fn flush_capacity(
    admin_url: &str,
    quick: bool,
    log: &mut dyn FnMut(String),
) -> anyhow::Result<Capacity> {
    let db = BenchDb::create(admin_url).await?;
    let result = capacity_in(&db, quick, log).await;
    if let Err(e) = db.drop_db().await {
        log(format!("(could not drop the capacity database: {e:#})"));
    }
    result
}

async fn capacity_in(
    db: &BenchDb,
    quick: bool,
    log: &mut dyn FnMut(String),
) -> anyhow::Result<Capacity> {
    let store = PgStore::connect(&db.url, 2)
        .await
        .context("PgStore::connect")?;
    let mut direct = pg::connect(&db.url).await?;
    let statement = direct.prepare(UPSERT).await?;
    let aggregator = Arc::new(Aggregator::new(1, 0, usize::MAX, usize::MAX));
    let flusher = Flusher::new(
        Arc::clone(&aggregator),
        Arc::new(store.clone()),
        "bench-flusher".into(),
        Duration::from_secs(1),
    );
    let mut apply_seq = 1u64;
    let keyspaces: &[usize] = if quick {
        &[100_000]
    } else {
        &[100_000, 1_000_000]
    };
    let sizes: &[usize] = if quick {
        &[1_000, 10_000]
    } else {
        &[1_000, 10_000, 100_000]
    };
    let target = Duration::from_secs_f64(if quick { 0.4 } else { 2.0 });
    let rounds = if quick { 1 } else { 2 };
    let methods = [Method::Direct, Method::Apply, Method::Flusher];
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut points = Vec::new();
    for &keyspace in keyspaces {
        direct
            .batch_execute("TRUNCATE counters")
            .await
            .context("TRUNCATE counters")?;
        let ks = i64::try_from(keyspace)?;
        direct
            .execute(
                "INSERT INTO counters (key, value) SELECT 'k' || g, 0 FROM generate_series(0, $1::int8 - 1) g",
                &[&ks],
            )
            .await
            .context("cannot pre-populate the keyspace")?;
        direct.batch_execute("VACUUM ANALYZE counters").await?;
        let names: Vec<String> = (0..keyspace).map(|i| format!("k{i}")).collect();
        let mut perm: Vec<u32> = (0..u32::try_from(keyspace)?).collect();
        for &size in sizes {
            // Per method: (keys, seconds, cpu seconds, batches, per-round rates).
            let mut acc: Vec<(usize, f64, f64, usize, Vec<f64>)> = methods
                .iter()
                .map(|_| (0, 0.0, 0.0, 0, Vec::new()))
                .collect();
            for round in 0..rounds {
                // Rotate the order every round, so no method always follows the same one.
                for k in 0..methods.len() {
                    let m = (k + round) % methods.len();
                    let method = methods[m];
                    let (mut keys, mut secs, mut cpu, mut batches) =
                        (0usize, 0.0f64, 0.0f64, 0usize);
                    let backends = db.backend_pids().await?;
                    while (secs < target.as_secs_f64() || batches < 3) && batches < 500 {
                        // A batch of `size` distinct keys: a partial Fisher-Yates shuffle.
                        for i in 0..size {
                            let j = i + rng.below(keyspace - i);
                            perm.swap(i, j);
                        }
                        let mut entries: Vec<(&str, i64)> = perm[..size]
                            .iter()
                            .map(|&i| (names[i as usize].as_str(), 1))
                            .collect();
                        entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
                        let cpu0 = pg::snapshot(&backends);
                        let started;
                        match method {
                            Method::Direct => {
                                started = Instant::now();
                                let (k, d): (Vec<&str>, Vec<i64>) = entries.iter().copied().unzip();
                                let tx = direct.transaction().await?;
                                tx.execute(&statement, &[&k, &d]).await?;
                                tx.commit().await?;
                            }
                            Method::Apply => {
                                started = Instant::now();
                                let applied = store
                                    .apply(Batch {
                                        instance_id: "bench-apply",
                                        epoch: 0,
                                        seq: apply_seq,
                                        applied: 0,
                                        entries: &entries,
                                        dead_letters: &[],
                                    })
                                    .await
                                    .context("PgStore::apply")?;
                                if applied != Applied::Committed {
                                    bail!("PgStore::apply skipped seq {apply_seq}");
                                }
                                apply_seq += 1;
                            }
                            Method::Flusher => {
                                let parsed: Vec<Key> = entries
                                    .iter()
                                    .map(|(k, _)| Key::parse(*k, 256))
                                    .collect::<Result<_, _>>()?;
                                for k in &parsed {
                                    aggregator.add(k, 1)?;
                                }
                                started = Instant::now();
                                match flusher.flush().await {
                                    Flushed::Batch { keys: n, .. } if n == size => {}
                                    other => bail!("flusher wrote {other:?}, expected {size} keys"),
                                }
                            }
                        }
                        secs += started.elapsed().as_secs_f64();
                        cpu += pg::used_between(&cpu0, &pg::snapshot(&backends));
                        keys += size;
                        batches += 1;
                    }
                    let a = &mut acc[m];
                    a.0 += keys;
                    a.1 += secs;
                    a.2 += cpu;
                    a.3 += batches;
                    a.4.push(keys as f64 / secs.max(1e-9));
                }
            }
            for (m, &method) in methods.iter().enumerate() {
                let (keys, secs, cpu, batches, rates) = acc[m].clone();
                let point = CapacityPoint {
                    keyspace,
                    batch: size,
                    method: method.name().into(),
                    batches,
                    keys,
                    seconds: secs,
                    keys_per_s: keys as f64 / secs.max(1e-9),
                    rounds_keys_per_s: rates,
                    pg_cpu_us_per_key: cpu * 1e6 / keys.max(1) as f64,
                };
                log(format!(
                    "keyspace {keyspace:>9}  batch {size:>7}  {:<8} {:>9.0} keys/s  ({:.1} µs PG CPU/key)",
                    point.method, point.keys_per_s, point.pg_cpu_us_per_key
                ));
                points.push(point);
            }
        }
    }
    Ok(Capacity { points })
}
