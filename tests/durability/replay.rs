//! Journal replay with a healthy database: increments acknowledged under `ack=journal` but
//! never flushed (the flush interval is an hour) survive `kill -9`, are in the store as soon
//! as the restarted instance serves (start-up replays, then flushes, then binds), and are
//! not counted again by later restarts.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use tokio::task::JoinSet;

use crate::common::data_dir;
use crate::pg::{PgDatabase, shout};
use crate::support::{Direct, Tally, TallyConfig, eventually, key_name};

const KEYS: usize = 50;
/// Added to every key in the second round, after the first restart.
const SECOND_ROUND: i64 = 1_000;
/// Lets whatever the flusher does right after start-up happen before the first increment
/// arrives, so that with a one-hour interval nothing is flushed before the kill.
const SETTLE: Duration = Duration::from_millis(200);
/// Pending-key cap of the restart in the split-replay test: a replay of [`KEYS`] keys then
/// does not fit in one batch.
const SPLIT_CAP: usize = 10;
/// Longest wait for the stalled replay to reach the lock.
const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends `value(i)` to every key concurrently; all must be acknowledged.
async fn send_round(address: &str, value: impl Fn(usize) -> i64) {
    let client = reqwest::Client::new();
    let mut tasks = JoinSet::new();
    for i in 0..KEYS {
        let (client, url, delta) = (client.clone(), format!("{address}/increment"), value(i));
        tasks.spawn(async move {
            client
                .post(url)
                .json(&json!({ "key": key_name(i), "value": delta }))
                .send()
                .await
                .map_or(0, |r| r.status().as_u16())
        });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.expect("request task"), 202);
    }
}

fn expected(rounds: &[&dyn Fn(usize) -> i64]) -> HashMap<String, i64> {
    (0..KEYS)
        .map(|i| (key_name(i), rounds.iter().map(|f| f(i)).sum()))
        .collect()
}

async fn journal_replays_after_kill_9_exactly_once(db: Option<&PgDatabase>) {
    let dir = data_dir();
    let config = TallyConfig::new(dir.path(), db, "journal", "1h");
    let backend = config.backend();
    let direct = Direct::open(dir.path(), db).await;
    let first = |i: usize| i as i64 + 1;
    let second = |_: usize| SECOND_ROUND;

    let mut tally = Tally::start(&config).await;
    tokio::time::sleep(SETTLE).await;
    send_round(&tally.address, first).await;
    assert!(
        direct.counters().await.is_empty(),
        "nothing may be flushed before the kill, or replay proves nothing"
    );
    tally.kill9().await;

    // Restart 1: the first round is in the store before the instance serves.
    let mut tally = Tally::start(&config).await;
    assert_eq!(
        direct.counters().await,
        expected(&[&first]),
        "after restart 1, the replayed first round is in the store"
    );
    tokio::time::sleep(SETTLE).await;
    send_round(&tally.address, second).await;
    tally.kill9().await;

    // Restart 2: the second round replays; the first (already applied) does not again.
    let mut tally = Tally::start(&config).await;
    let both = expected(&[&first, &second]);
    assert_eq!(
        direct.counters().await,
        both,
        "after restart 2, both rounds once each"
    );
    let status = tally.terminate().await;
    assert!(status.success(), "clean exit, got {status}");

    // Restart 3 after a clean stop: nothing to replay, nothing doubled.
    let mut tally = Tally::start(&config).await;
    assert_eq!(direct.counters().await, both, "after restart 3, unchanged");
    let status = tally.terminate().await;
    assert!(status.success(), "clean exit, got {status}");
    shout(&format!(
        "replay {backend}: {KEYS} keys × 2 rounds acknowledged under ack=journal, flush interval 1h, \
         kill -9 after each; in the store at each restart, once"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_journal_replay_after_kill_9_stores_acknowledged_increments_exactly_once() {
    journal_replays_after_kill_9_exactly_once(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_journal_replay_after_kill_9_stores_acknowledged_increments_exactly_once() {
    let Some(db) = PgDatabase::create("replay").await else {
        return;
    };
    journal_replays_after_kill_9_exactly_once(Some(&db)).await;
}

/// A crash in the middle of a replay that takes several batches must lose nothing: the
/// store's seq and the journal trimming may never count as applied what is not written
/// yet. PostgreSQL only: uncommitted inserts by the test hold chosen rows, which stalls a
/// batch that touches them at a chosen point.
///
/// The first run leaves two unapplied generations in the journal: G (keys 0..25), sealed
/// but stuck on a held row, and G+1 (keys 25..50). The restart replays with a pending-key
/// cap far below the replay's size, and is killed while its last batch waits on another
/// held row. The next start must hold every key exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_crash_in_the_middle_of_a_replay_loses_no_acknowledged_increment() {
    let Some(db) = PgDatabase::create("replay_split").await else {
        return;
    };
    let dir = data_dir();
    let config = TallyConfig::new(dir.path(), Some(&db), "journal", "1h");
    let direct = Direct::open(dir.path(), Some(&db)).await;
    let monitor = crate::pg::client(&db.url).await;
    let half = KEYS / 2;

    // First run: the flush of G (triggered by --flush-max-keys) waits on a held row of G.
    let mut first = config.clone();
    first.extra = vec!["--flush-max-keys".into(), half.to_string()];
    let mut tally = Tally::start(&first).await;
    let blocker = hold_row(&db, &key_name(half / 2)).await;
    tokio::time::sleep(SETTLE).await;
    send_in_order(&tally.address, 0..half).await;
    wait_for_lock(
        &monitor,
        "the flush of the first generation waits on the held row",
    )
    .await;
    send_in_order(&tally.address, half..KEYS).await;
    tally.kill9().await;
    blocker.batch_execute("ROLLBACK").await.expect("release");
    assert!(
        direct.counters().await.is_empty(),
        "nothing written by the first run"
    );

    // Restart, capped: the replay stalls on the last key's row, and is killed there.
    let blocker = hold_row(&db, &key_name(KEYS - 1)).await;
    let mut capped = config.clone();
    capped.extra = vec!["--max-pending-keys".into(), SPLIT_CAP.to_string()];
    let mut tally = Tally::spawn(&capped);
    wait_for_lock(&monitor, "the replay waits on the held row").await;
    let written_before_kill = direct.counters().await.len();
    tally.kill9().await;
    blocker.batch_execute("ROLLBACK").await.expect("release");

    let mut tally = Tally::start(&config).await;
    assert_eq!(
        direct.counters().await,
        expected(&[&|_| 1]),
        "every acknowledged increment is in the store, once, after a crash in the middle of \
         a replay ({written_before_kill} of {KEYS} keys were written before the kill)"
    );
    let status = tally.terminate().await;
    assert!(status.success(), "clean exit, got {status}");
    shout(&format!(
        "replay split postgres: 2 generations of {KEYS} keys replayed with --max-pending-keys \
         {SPLIT_CAP}, kill -9 with {written_before_kill} keys written; all {KEYS} in the store, \
         once, after the next start"
    ));
}

/// Sends +1 to each key of `keys`, one request at a time (so the journal holds them in
/// that order); all must be acknowledged.
async fn send_in_order(address: &str, keys: std::ops::Range<usize>) {
    let client = reqwest::Client::new();
    for i in keys {
        let status = client
            .post(format!("{address}/increment"))
            .json(&json!({ "key": key_name(i), "value": 1 }))
            .send()
            .await
            .map_or(0, |r| r.status().as_u16());
        assert_eq!(status, 202, "{}", key_name(i));
    }
}

/// A connection whose open transaction has inserted `key`: tally's upsert of that key
/// waits until it rolls back.
pub(crate) async fn hold_row(db: &PgDatabase, key: &str) -> tokio_postgres::Client {
    let client = crate::pg::client(&db.url).await;
    client
        .batch_execute(&format!(
            "BEGIN; INSERT INTO counters (key, value) VALUES ('{key}', 0)"
        ))
        .await
        .expect("hold a row");
    client
}

/// Waits until some session of this database waits on a lock.
pub(crate) async fn wait_for_lock(monitor: &tokio_postgres::Client, what: &str) {
    eventually(STALL_TIMEOUT, what, || async move {
        crate::pg::sessions_waiting_on_a_lock(monitor).await > 0
    })
    .await;
}

/// Peak resident memory of process `pid` (`VmHWM`), in bytes.
fn peak_memory(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM in /proc/<pid>/status");
    kib * 1024
}

/// A journal that grew through a long database outage holds millions of requests for the
/// same keys. Replay sums them per batch as it reads them: its memory is that of the keys
/// and of one segment, not of every request. (It used to hold every record at once: about
/// three times the journal's size on disk, so a restart after an outage of hours could run
/// out of memory and never start.) Only SQLite: this is the journal's side of replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_holds_the_keys_in_memory_not_every_request() {
    const RECORDS: usize = 8_000;
    const ENTRIES: usize = 1_000;
    const WRITERS: usize = 40;
    let dir = data_dir();
    let journal_dir = dir.path().join("journal");
    {
        // Small segments: replay holds one segment's bytes at a time, and with the default
        // 64 MiB that buffer, not the records, would be most of what is measured.
        let options = tally::journal::JournalOptions {
            segment_bytes: 4 << 20,
            ..tally::journal::JournalOptions::default()
        };
        let (journal, _) =
            tally::journal::Journal::open(&journal_dir, options).expect("open a journal");
        let journal = std::sync::Arc::new(journal);
        let mut writers = JoinSet::new();
        for _ in 0..WRITERS {
            let journal = std::sync::Arc::clone(&journal);
            writers.spawn(async move {
                let keys: Vec<String> = (0..KEYS).map(key_name).collect();
                let entries: Vec<(&str, i64)> =
                    (0..ENTRIES).map(|i| (keys[i % KEYS].as_str(), 1)).collect();
                for _ in 0..RECORDS / WRITERS {
                    journal.append(1, &entries).await.expect("append");
                }
            });
        }
        while let Some(done) = writers.join_next().await {
            done.expect("writer");
        }
    }
    let on_disk: u64 = std::fs::read_dir(&journal_dir)
        .expect("list the journal")
        .map(|e| e.expect("entry").metadata().expect("stat").len())
        .sum();

    let config = TallyConfig::new(dir.path(), None, "journal", "1h");
    let mut tally = Tally::start(&config).await;
    let peak = peak_memory(tally.pid());
    let counters = Direct::open(dir.path(), None).await.counters().await;
    let per_key = (RECORDS * ENTRIES / KEYS) as i64;
    assert_eq!(counters.len(), KEYS);
    assert!(counters.values().all(|&v| v == per_key), "{counters:?}");
    assert!(
        peak < on_disk / 2,
        "replaying {} MB of journal took {} MB at peak",
        on_disk >> 20,
        peak >> 20
    );
    assert!(tally.terminate().await.success());
    shout(&format!(
        "replay memory: {} requests ({} MB of journal) replayed in {} MB at peak",
        RECORDS,
        on_disk >> 20,
        peak >> 20
    ));
}

/// Names and sizes of the files in `dir`.
fn listing(dir: &std::path::Path) -> Vec<(String, u64)> {
    let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| {
            let e = e.expect("entry");
            let len = e.metadata().expect("stat").len();
            (e.file_name().to_string_lossy().into_owned(), len)
        })
        .collect();
    files.sort();
    files
}

/// `tally-journal` prints a journal's increments, each batch summed per key, as NDJSON
/// `POST /increments` takes (a zero sum too; a sum beyond 64 bits left out and named), and
/// changes nothing: not even a torn tail, which a start would cut.
#[tokio::test]
async fn tally_journal_prints_each_batch_summed_and_changes_nothing() {
    let dir = data_dir();
    let journal_dir = dir.path().join("journal");
    {
        let (journal, _) =
            tally::journal::Journal::open(&journal_dir, tally::journal::JournalOptions::default())
                .expect("open a journal");
        for (seq, entries) in [
            (1, vec![("a", 2), ("b", 1), ("z", 1)]),
            (1, vec![("a", 3), ("z", -1)]),
            (2, vec![("big", i64::MAX)]),
            (2, vec![("big", 5), ("c", 7)]),
        ] {
            journal.append(seq, &entries).await.expect("append");
        }
    }
    let segment = std::fs::read_dir(&journal_dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|e| e == "log"))
        .expect("a segment");
    let mut torn = std::fs::read(&segment).expect("read");
    torn.extend_from_slice(b"torn");
    std::fs::write(&segment, &torn).expect("tear the tail");
    let before = listing(&journal_dir);

    let run = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally-journal"))
            .args(args)
            .output()
            .expect("run tally-journal");
        assert!(out.status.success(), "{out:?}");
        let mut sums: HashMap<String, i64> = HashMap::new();
        for line in String::from_utf8(out.stdout).expect("UTF-8").lines() {
            let item: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(line).expect("a JSON object per line");
            assert_eq!(item.len(), 2, "only key and value: {line}");
            let key = item["key"].as_str().expect("a string key").to_owned();
            let value = item["value"].as_i64().expect("a 64-bit value");
            assert!(
                sums.insert(key, value).is_none(),
                "one line per key and batch"
            );
        }
        (sums, String::from_utf8(out.stderr).expect("UTF-8"))
    };
    let data = dir.path().as_os_str();
    let (all, report) = run(&["--data-dir".as_ref(), data]);
    let want = HashMap::from([
        ("a".to_owned(), 5),
        ("b".to_owned(), 1),
        ("z".to_owned(), 0),
        ("c".to_owned(), 7),
    ]);
    assert_eq!(all, want);
    assert!(report.contains("batch 1: 2 requests, 3 keys"), "{report}");
    assert!(
        report.contains("\"big\" sums to 9223372036854775812, beyond 64 bits: left out"),
        "{report}"
    );
    assert!(report.contains("torn or corrupt"), "{report}");
    let (above_one, _) = run(&[
        "--journal-dir".as_ref(),
        journal_dir.as_os_str(),
        "--above".as_ref(),
        "1".as_ref(),
    ]);
    assert_eq!(above_one, HashMap::from([("c".to_owned(), 7)]));
    assert_eq!(
        listing(&journal_dir),
        before,
        "no file added, removed or resized"
    );
    assert_eq!(
        std::fs::read(&segment).expect("read"),
        torn,
        "the tail is left"
    );

    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_tally-journal"))
        .arg("--data-dir")
        .arg(dir.path().join("nowhere"))
        .output()
        .expect("run tally-journal");
    assert_eq!(
        missing.status.code(),
        Some(2),
        "a missing journal: {missing:?}"
    );
}
