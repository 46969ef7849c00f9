//! Jepsen-style crash tests: the real binary under concurrent load is killed with SIGKILL at
//! random moments, restarted on the same data directory, and finally stopped with SIGTERM;
//! then every key's stored value is checked against what the client saw.
//!
//! With positive deltas, for every key:
//! - `ack=journal`: sum of acknowledged deltas ≤ stored value ≤ sum of attempted deltas
//!   (nothing acknowledged is lost, nothing is counted twice);
//! - `ack=memory`: stored ≤ attempted (nothing counted twice), and the acknowledged value
//!   lost is measured, printed, and bounded by what was acknowledged in the last
//!   [`MEMORY_LOSS_WINDOW`] before each kill (the documented "last flush interval").

use std::time::{Duration, Instant};

use crate::common::data_dir;
use crate::pg::{PgDatabase, shout};
use crate::support::{Direct, Ledger, Load, Rng, Tally, TallyConfig, seed};

/// Distinct keys the load spreads over.
const KEYS: usize = 200;
/// Requests in flight at any time (one per load worker).
const IN_FLIGHT: usize = 32;
/// Flush interval of the binary under test.
const FLUSH_INTERVAL: &str = "100ms";
/// `ack=journal`: kill -9 cycles per backend. A cycle (start + replay, 200–800 ms of load,
/// kill, reap) takes about 0.5–1 s on a 2-core machine, so 20 cycles cost ~10–15 s per
/// backend; [`BUDGET`] caps it on a slower machine.
const JOURNAL_CYCLES: usize = 20;
/// `ack=journal`: when to kill, after the load started (uniform, seeded).
const JOURNAL_KILL_AFTER_MS: (u64, u64) = (200, 800);
/// `ack=memory`: fewer, longer cycles, so that most of each cycle's acknowledged value is
/// older than the loss window and the bound below says something: ~2.5 s a cycle, so 5
/// cycles cost ~12 s per backend.
const MEMORY_CYCLES: usize = 5;
const MEMORY_KILL_AFTER_MS: (u64, u64) = (1_500, 2_500);
/// `ack=memory` loses what was accepted since the last committed flush: about one flush
/// interval (100 ms) plus one commit. The bound allows 10× that for a busy 2-core machine:
/// value acknowledged more than this long before a kill must be in the store.
const MEMORY_LOSS_WINDOW: Duration = Duration::from_secs(1);
/// Load during the final run, before the SIGTERM (the drain must keep every 202).
const FINAL_LOAD: Duration = Duration::from_millis(300);
/// No new cycle starts after this long (per backend and ack level), whatever the count.
const BUDGET: Duration = Duration::from_secs(35);
/// A load never runs longer than this, even if the kill never comes.
const LOAD_CAP: Duration = Duration::from_secs(10);

struct Plan {
    ack: &'static str,
    cycles: usize,
    kill_after_ms: (u64, u64),
}

struct Outcome {
    ledger: Ledger,
    /// Stored value of each load key after the clean stop.
    stored: Vec<i128>,
    cycles: usize,
    /// Value acknowledged within [`MEMORY_LOSS_WINDOW`] before a kill (or after it).
    acked_near_kills: i128,
    seed: u64,
    elapsed: Duration,
}

/// Runs the kill -9 cycles of `plan`, then a final run stopped with SIGTERM, and reads the
/// store directly.
async fn crash_cycles(db: Option<&PgDatabase>, plan: &Plan) -> Outcome {
    let dir = data_dir();
    let config = TallyConfig::new(dir.path(), db, plan.ack, FLUSH_INTERVAL);
    let name = format!("crash {} ack={}", config.backend(), plan.ack);
    let seed = seed();
    let mut rng = Rng::new(seed);
    let mut ledger = Ledger::new(KEYS);
    let mut acked_near_kills = 0i128;
    let started = Instant::now();
    let mut cycles = 0;
    while cycles < plan.cycles && started.elapsed() < BUDGET {
        let mut tally = Tally::start(&config).await;
        let load = Load::start(&tally.address, KEYS, IN_FLIGHT, &mut rng, LOAD_CAP);
        let after = Duration::from_millis(rng.range(plan.kill_after_ms.0, plan.kill_after_ms.1));
        tokio::time::sleep(after).await;
        let killed_at = Instant::now();
        tally.kill9().await;
        let sent = load.finish().await;
        acked_near_kills += sent
            .iter()
            .filter(|s| s.acked() && s.at + MEMORY_LOSS_WINDOW > killed_at)
            .map(|s| i128::from(s.delta))
            .sum::<i128>();
        let counts = ledger.record(&sent);
        cycles += 1;
        eprintln!(
            "{name} cycle {cycles}: kill -9 after {after:?}; {}/{} requests acknowledged/attempted",
            counts.acked, counts.attempted
        );
    }

    let mut tally = Tally::start(&config).await;
    let load = Load::start(&tally.address, KEYS, IN_FLIGHT, &mut rng, LOAD_CAP);
    tokio::time::sleep(FINAL_LOAD).await;
    let status = tally.terminate().await;
    let sent = load.finish().await;
    let counts = ledger.record(&sent);
    eprintln!(
        "{name} final run: SIGTERM under load; {}/{} requests acknowledged/attempted",
        counts.acked, counts.attempted
    );
    assert!(
        status.success(),
        "{name}: SIGTERM must drain and exit 0, got {status}; log tail:\n{}",
        tally.log_tail()
    );
    drop(tally);

    let counters = Direct::open(dir.path(), db).await.counters().await;
    let stored = ledger.stored(&counters);
    let unknown: Vec<&String> = counters.keys().filter(|k| !k.starts_with("key-")).collect();
    assert!(unknown.is_empty(), "{name}: keys nobody sent: {unknown:?}");
    assert!(
        ledger.requests_acked >= 100,
        "{name}: too few acknowledged requests ({}) for the test to mean anything",
        ledger.requests_acked
    );
    assert!(
        cycles >= 2,
        "{name}: only {cycles} kill cycles fit in {BUDGET:?}"
    );
    Outcome {
        ledger,
        stored,
        cycles,
        acked_near_kills,
        seed,
        elapsed: started.elapsed(),
    }
}

/// Keys whose stored value is outside `[lower, attempted]`, described.
fn violations(outcome: &Outcome, lower: impl Fn(usize) -> i128) -> Vec<String> {
    let l = &outcome.ledger;
    (0..KEYS)
        .filter(|&i| !(lower(i) <= outcome.stored[i] && outcome.stored[i] <= l.attempted[i]))
        .map(|i| {
            format!(
                "{}: acked {} stored {} attempted {}",
                crate::support::key_name(i),
                l.acked[i],
                outcome.stored[i],
                l.attempted[i]
            )
        })
        .collect()
}

async fn acknowledged_increments_survive_kill_9(db: Option<&PgDatabase>) {
    let backend = if db.is_some() { "postgres" } else { "sqlite" };
    let plan = Plan {
        ack: "journal",
        cycles: JOURNAL_CYCLES,
        kill_after_ms: JOURNAL_KILL_AFTER_MS,
    };
    let outcome = crash_cycles(db, &plan).await;
    let l = &outcome.ledger;
    let bad = violations(&outcome, |i| l.acked[i]);
    assert!(
        bad.is_empty(),
        "crash {backend} ack=journal (seed {}): {} of {KEYS} keys outside acked ≤ stored ≤ attempted:\n{}",
        outcome.seed,
        bad.len(),
        bad.join("\n")
    );
    shout(&format!(
        "crash {backend} ack=journal: {} kill -9 cycles + SIGTERM in {:.1?} (seed {}), {KEYS} keys, \
         {}/{} requests acknowledged/attempted, value acked {} ≤ stored {} ≤ attempted {} for every key; \
         other statuses {:?}",
        outcome.cycles,
        outcome.elapsed,
        outcome.seed,
        l.requests_acked,
        l.requests_attempted,
        l.acked_total(),
        outcome.stored.iter().sum::<i128>(),
        l.attempted_total(),
        l.other_statuses,
    ));
}

async fn memory_ack_loses_at_most_the_last_flush_interval(db: Option<&PgDatabase>) {
    let backend = if db.is_some() { "postgres" } else { "sqlite" };
    let plan = Plan {
        ack: "memory",
        cycles: MEMORY_CYCLES,
        kill_after_ms: MEMORY_KILL_AFTER_MS,
    };
    let outcome = crash_cycles(db, &plan).await;
    let l = &outcome.ledger;
    // Nothing counted twice, whatever the ack level.
    let bad = violations(&outcome, |_| i128::MIN);
    assert!(
        bad.is_empty(),
        "crash {backend} ack=memory (seed {}): {} keys store more than was attempted:\n{}",
        outcome.seed,
        bad.len(),
        bad.join("\n")
    );
    let lost: i128 = (0..KEYS)
        .map(|i| (l.acked[i] - outcome.stored[i]).max(0))
        .sum();
    let acked = l.acked_total();
    shout(&format!(
        "crash {backend} ack=memory: {} kill -9 cycles + SIGTERM in {:.1?} (seed {}), {KEYS} keys, \
         {}/{} requests acknowledged/attempted; acknowledged value lost: {lost} of {acked} ({:.2}%), \
         bound (value acked within {MEMORY_LOSS_WINDOW:?} of a kill): {}",
        outcome.cycles,
        outcome.elapsed,
        outcome.seed,
        l.requests_acked,
        l.requests_attempted,
        lost as f64 * 100.0 / acked.max(1) as f64,
        outcome.acked_near_kills,
    ));
    assert!(
        lost <= outcome.acked_near_kills,
        "crash {backend} ack=memory (seed {}): lost {lost} acknowledged, more than the {} \
         acknowledged within {MEMORY_LOSS_WINDOW:?} of a kill",
        outcome.seed,
        outcome.acked_near_kills
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_journal_ack_loses_no_acknowledged_increment_across_kill_9() {
    acknowledged_increments_survive_kill_9(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_journal_ack_loses_no_acknowledged_increment_across_kill_9() {
    let Some(db) = PgDatabase::create("crash_journal").await else {
        return;
    };
    acknowledged_increments_survive_kill_9(Some(&db)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_memory_ack_loses_at_most_the_last_flush_interval_on_kill_9() {
    memory_ack_loses_at_most_the_last_flush_interval(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_memory_ack_loses_at_most_the_last_flush_interval_on_kill_9() {
    let Some(db) = PgDatabase::create("crash_memory").await else {
        return;
    };
    memory_ack_loses_at_most_the_last_flush_interval(Some(&db)).await;
}
