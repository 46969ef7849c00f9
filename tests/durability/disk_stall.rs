//! A journal disk that stops answering (a frozen or detached volume) under `ack=journal`:
//! once a write and fsync has run past `--journal-stalled-after`, `/readyz` answers 503 and
//! says why, `tally_journal_stalled` is 1 and one warning is logged. No increment is answered
//! 202 while the disk is frozen; those that wait past `--request-timeout` get `503 timeout`
//! (outcome unknown), the others 202 once the disk answers. Then readiness comes back, one
//! line says so, and the store holds every increment sent exactly once: a timed-out one was
//! taken, and is counted, but never twice. With PostgreSQL, where the flusher shares a
//! thread with the accept loop, a flush during the stall does not hold that thread: the
//! journal's own writer thread deletes the segments it makes deletable. An idle instance
//! notices the stall too: its journal probes a disk it has not written to for a while.
//!
//! The stall is a real one: the journal directory is an ext4 filesystem of its own (a loop
//! device) that the test freezes with `fsfreeze`, which blocks every write and fsync in it
//! until it is thawed. That needs root and loop devices. Without them the tests say SKIPPED
//! loudly, and fails instead with `TALLY_REQUIRE_DISK_STALL=1` (`.ci/run` sets it as root).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::data_dir;
use crate::journal::journal_segments;
use crate::metrics::metric;
use crate::pg::{PgDatabase, shout};
use crate::support::{
    Direct, Tally, TallyConfig, assert_logged_once, eventually, increment, increment_answer,
};

/// `--journal-stalled-after` of the child.
const STALLED_AFTER: &str = "1s";
/// How long the disk stays frozen: well past `STALLED_AFTER` and tally's once-a-second
/// watch, and past `REQUEST_TIMEOUT`.
const FROZEN_FOR: Duration = Duration::from_secs(4);
/// `--request-timeout` of the child: requests on a serving thread that is not stuck in the
/// write get `503 timeout` while the disk is still frozen.
const REQUEST_TIMEOUT: &str = "3s";
/// Increments sent while the disk is frozen, each to a key of its own.
const WHILE_FROZEN: usize = 16;

/// A filesystem of its own, mounted at `mountpoint`; thawed and unmounted on drop.
struct Disk {
    mountpoint: PathBuf,
}

impl Disk {
    /// Makes a 256 MiB ext4 image in `scratch` and mounts it at `mountpoint` (empty), or
    /// says why it cannot.
    fn mount(scratch: &Path, mountpoint: &Path) -> Result<Self, String> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root (mount and fsfreeze need it)".to_owned());
        }
        let image = scratch.join("journal-disk.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(256 << 20))
            .map_err(|e| format!("cannot create {}: {e}", image.display()))?;
        run("mkfs.ext4", &["-q", "-F", path(&image)])?;
        std::fs::create_dir_all(mountpoint).map_err(|e| e.to_string())?;
        run("mount", &["-o", "loop", path(&image), path(mountpoint)])?;
        let disk = Self {
            mountpoint: mountpoint.to_owned(),
        };
        // The journal's directory holds only what tally puts there.
        std::fs::remove_dir(mountpoint.join("lost+found")).map_err(|e| e.to_string())?;
        Ok(disk)
    }

    fn freeze(&self) {
        run("fsfreeze", &["--freeze", path(&self.mountpoint)]).expect("freeze the journal's disk");
    }

    fn thaw(&self) {
        run("fsfreeze", &["--unfreeze", path(&self.mountpoint)]).expect("thaw the journal's disk");
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = run("fsfreeze", &["--unfreeze", path(&self.mountpoint)]);
        // A killed tally may take a moment to let go of the mount.
        for _ in 0..50 {
            if run("umount", &[path(&self.mountpoint)]).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = run("umount", &["--lazy", path(&self.mountpoint)]);
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temporary path")
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The flags both tests run tally with, then `more`: a stall reported after
/// `STALLED_AFTER`, requests timing out after `REQUEST_TIMEOUT`, and two serving threads,
/// one to be stuck in the commit and one to answer (whatever the machine's cores).
fn stall_flags(more: &[&str]) -> Vec<String> {
    [
        "--journal-stalled-after",
        STALLED_AFTER,
        "--request-timeout",
        REQUEST_TIMEOUT,
        "--http-threads",
        "2",
    ]
    .iter()
    .chain(more)
    .map(|&flag| flag.to_owned())
    .collect()
}

/// A GET on a connection of its own, given up after a second: a stalled commit holds the
/// serving thread that runs it, with its connections, so an attempt may land there.
async fn get(address: &str, route: &str) -> Option<(u16, String)> {
    let client = unpooled().timeout(Duration::from_secs(1)).build();
    let response = client
        .expect("a client")
        .get(format!("{address}{route}"))
        .send()
        .await
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// Asks `route` on fresh connections until `check` accepts an answer; panics after 10 s.
async fn until(address: &str, route: &str, what: &str, check: impl Fn(u16, &str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    while Instant::now() < deadline {
        if let Some((status, body)) = get(address, route).await {
            if check(status, &body) {
                return;
            }
            // The start of it: enough to say why, short enough to read.
            last = Some((status, body.chars().take(300).collect::<String>()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: {route} never said so within 10 s; last answer {last:?}");
}

/// A client that opens a connection per request, so that each may land on either serving
/// thread.
fn unpooled() -> reqwest::ClientBuilder {
    reqwest::Client::builder().pool_max_idle_per_host(0)
}

/// Waits until `/metrics` shows `series` at `value`.
async fn until_metric_is(address: &str, series: &str, value: f64) {
    let what = format!("{series} {value}");
    until(address, "/metrics", &what, |s, body| {
        s == 200 && metric(body, series) == value
    })
    .await;
}

/// Stops `tally` with SIGTERM once the stall is over, and checks that its log has one line
/// when the disk stalled and one when it answered again.
async fn stop_having_logged_one_stall(tally: &mut Tally) {
    // The watch logs the end within a second of it.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let status = tally.terminate().await;
    assert!(status.success(), "SIGTERM drains and exits 0: {status}");
    let log = tally.log();
    assert_logged_once(
        &log,
        "The journal's disk is stalled",
        "when the disk stalls",
    );
    assert_logged_once(
        &log,
        "The journal's disk answered again",
        "when it answers again",
    );
}

/// The journal directory of `dir` on a disk of its own, or `None` after saying loudly why
/// not (a panic instead with `TALLY_REQUIRE_DISK_STALL=1`).
fn journal_disk(dir: &Path) -> Option<Disk> {
    match Disk::mount(dir, &dir.join("journal")) {
        Ok(disk) => Some(disk),
        Err(why) if std::env::var("TALLY_REQUIRE_DISK_STALL").is_ok_and(|v| v == "1") => {
            panic!("TALLY_REQUIRE_DISK_STALL=1, but no filesystem can be frozen here: {why}")
        }
        Err(why) => {
            shout(&format!(
                "SKIPPED disk stall test: {why}. Run the tests as root on a machine with loop \
                 devices; TALLY_REQUIRE_DISK_STALL=1 (.ci/run as root) makes this fatal."
            ));
            None
        }
    }
}

/// A tally on SQLite whose journal directory is on a disk of its own (see [`journal_disk`]),
/// run with [`stall_flags`].
async fn sqlite_with_a_journal_disk() -> Option<(tempfile::TempDir, Disk, Tally)> {
    let dir = data_dir();
    let disk = journal_disk(dir.path())?;
    let mut config = TallyConfig::new(dir.path(), None, "journal", "100ms");
    config.extra = stall_flags(&[]);
    let tally = Tally::start(&config).await;
    Some((dir, disk, tally))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_journal_disk_fails_readiness_and_says_so_then_answers_every_request() {
    let Some((dir, disk, mut tally)) = sqlite_with_a_journal_disk().await else {
        return;
    };
    let address = tally.address.clone();
    let client = unpooled().build().expect("a client");
    assert_eq!(increment(&client, &address, "before").await, 202);
    until(&address, "/readyz", "ready before the stall", |s, _| {
        s == 200
    })
    .await;

    disk.freeze();
    let frozen = Instant::now();
    let waiting: Vec<_> = (0..WHILE_FROZEN)
        .map(|i| {
            let (client, address) = (client.clone(), address.clone());
            tokio::spawn(async move {
                increment_answer(&client, &address, &format!("frozen-{i:02}")).await
            })
        })
        .collect();
    until(&address, "/readyz", "not ready while stalled", |s, body| {
        s == 503 && body.contains("journal's disk is stalled")
    })
    .await;
    until_metric_is(&address, "tally_journal_stalled", 1.0).await;
    let noticed = frozen.elapsed();
    tokio::time::sleep(FROZEN_FOR.saturating_sub(frozen.elapsed())).await;
    let mut answers = Vec::new();
    let mut after_thaw = Vec::new();
    for w in waiting {
        if w.is_finished() {
            answers.push(w.await.expect("the increment's task"));
        } else {
            after_thaw.push(w);
        }
    }
    let timeout = (503, "timeout".to_owned());
    assert!(
        answers.iter().all(|a| *a == timeout),
        "while the disk is frozen, only 503 timeout answers: {answers:?}"
    );
    disk.thaw();
    for w in after_thaw {
        answers.push(w.await.expect("the increment's task"));
    }
    assert!(
        answers.iter().all(|a| a.0 == 202 || *a == timeout),
        "every increment that waited is answered 202 once the disk answers, or 503 timeout: \
         {answers:?}"
    );
    let timed_out = answers.iter().filter(|a| **a == timeout).count();
    until(&address, "/readyz", "ready again", |s, _| s == 200).await;
    until_metric_is(&address, "tally_journal_stalled", 0.0).await;
    until_metric_is(&address, "tally_journal_stalls_total", 1.0).await;
    stop_having_logged_one_stall(&mut tally).await;

    let counters = Direct::open(dir.path(), None).await.counters().await;
    let mut expected: std::collections::HashMap<String, i64> = (0..WHILE_FROZEN)
        .map(|i| (format!("frozen-{i:02}"), 1))
        .collect();
    expected.insert("before".to_owned(), 1);
    assert_eq!(
        counters, expected,
        "every increment sent is stored once, a timed-out one too (taken, outcome unknown)"
    );
    drop(disk);
    shout(&format!(
        "disk stall ack=journal sqlite: the journal's disk frozen for {FROZEN_FOR:?}; /readyz 503 \
         and tally_journal_stalled 1 after {noticed:.1?} (--journal-stalled-after {STALLED_AFTER}); \
         of {WHILE_FROZEN} increments sent meanwhile, {timed_out} got 503 timeout at \
         --request-timeout {REQUEST_TIMEOUT}, the rest 202 once thawed; all stored once"
    ));
}

/// An instance that gets no increments writes nothing to its journal, so a disk that stops
/// answering then would go unnoticed until the first increment hung on it: the journal
/// probes an idle disk (one byte written and fsynced after `--journal-stalled-after` without
/// a write), and the stall shows in `/readyz` before any increment is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_instance_notices_its_journal_disk_stalled_before_an_increment_waits() {
    let Some((dir, disk, mut tally)) = sqlite_with_a_journal_disk().await else {
        return;
    };
    let address = tally.address.clone();
    until(&address, "/readyz", "ready before the stall", |s, _| {
        s == 200
    })
    .await;

    disk.freeze();
    let frozen = Instant::now();
    until(
        &address,
        "/readyz",
        "not ready while idle and stalled",
        |s, body| s == 503 && body.contains("journal's disk is stalled"),
    )
    .await;
    until_metric_is(&address, "tally_journal_stalled", 1.0).await;
    let noticed = frozen.elapsed();
    // The watch thread looks once a second: thawed at once, a stall just past
    // --journal-stalled-after could end before it logs one (seen once in CI). Wait for it.
    let tally_ref = &tally;
    eventually(
        Duration::from_secs(5),
        "the stall is logged while it lasts",
        || async move { tally_ref.log().contains("The journal's disk is stalled") },
    )
    .await;
    disk.thaw();
    until(&address, "/readyz", "ready again", |s, _| s == 200).await;
    until_metric_is(&address, "tally_journal_stalls_total", 1.0).await;
    let client = unpooled().build().expect("a client");
    assert_eq!(increment(&client, &address, "after").await, 202);
    stop_having_logged_one_stall(&mut tally).await;
    let counters = Direct::open(dir.path(), None).await.counters().await;
    assert_eq!(
        counters,
        std::iter::once(("after".to_owned(), 1)).collect(),
        "the increment after the thaw is stored once"
    );
    drop(disk);
    shout(&format!(
        "disk stall while idle: /readyz 503 and tally_journal_stalled 1 {noticed:.1?} after the \
         freeze with no increment sent (--journal-stalled-after {STALLED_AFTER})"
    ));
}

/// Batches of `BATCH_ITEMS` distinct keys sent before the freeze: about 3.5 MiB of
/// records, so with `--journal-segment-bytes 1048576` the journal closes segments, which
/// the next flush makes deletable. With `--flush-max-keys` one more than the batches' keys,
/// that flush comes with the first increment sent while the disk is frozen (it is added in
/// memory before its journal append, which then waits on the disk).
const BATCHES: usize = 16;
const BATCH_ITEMS: usize = 10_000;
/// How long the PostgreSQL test keeps the disk frozen at most: time to ask on fresh
/// connections, some of which may land on the serving thread stuck in the commit.
const PG_FROZEN_FOR: Duration = Duration::from_secs(8);

fn batch_key(i: usize) -> String {
    format!("batch-{i:05}")
}

/// With PostgreSQL the flusher runs on the runtime that also accepts connections. A flush
/// while the journal's disk is frozen makes closed segments deletable; deleting them must
/// not hold that runtime until the disk answers: new connections are answered and
/// `/readyz` says the disk is stalled while a commit is still stuck, and the segments go
/// once the disk is thawed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_journal_disk_does_not_hold_the_thread_that_accepts_connections() {
    let Some(db) = PgDatabase::create("disk_stall").await else {
        return;
    };
    let dir = data_dir();
    let Some(disk) = journal_disk(dir.path()) else {
        return;
    };
    // A flush only when the keys reach --flush-max-keys (the interval is far off).
    let mut config = TallyConfig::new(dir.path(), Some(&db), "journal", "1h");
    let max_keys = (BATCH_ITEMS + 1).to_string();
    config.extra = stall_flags(&[
        "--journal-segment-bytes",
        "1048576",
        "--flush-max-keys",
        &max_keys,
    ]);
    let mut tally = Tally::start(&config).await;
    let address = tally.address.clone();
    let client = unpooled().build().expect("a client");
    let store = Direct::open(dir.path(), Some(&db)).await;

    let body: Vec<_> = (0..BATCH_ITEMS)
        .map(|i| serde_json::json!({ "key": batch_key(i), "value": 1 }))
        .collect();
    for _ in 0..BATCHES {
        let status = client
            .post(format!("{address}/increments"))
            .json(&body)
            .send()
            .await
            .expect("an answer")
            .status();
        assert_eq!(status, 202, "a batch before the freeze");
    }
    disk.freeze();
    let frozen = Instant::now();
    let before_trim = journal_segments(dir.path()).len();
    assert!(
        before_trim > 1,
        "the batches closed segments ({before_trim} segment files)"
    );
    assert_eq!(
        store.value(&batch_key(0)).await,
        None,
        "no flush before the freeze"
    );
    // Its commit sticks on the frozen disk (for /readyz to see), and its key starts the
    // flush that makes the batches' segments deletable.
    let stuck = {
        let (client, address) = (client.clone(), address.clone());
        tokio::spawn(async move { increment_answer(&client, &address, "frozen").await })
    };
    while store.value(&batch_key(0)).await != Some(BATCHES as i64) {
        assert!(
            frozen.elapsed() < PG_FROZEN_FOR,
            "the flusher wrote the batches while the journal's disk was frozen"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let flushed_while_frozen = frozen.elapsed();
    // Fresh connections, accepted by the runtime that ran that flush.
    until(&address, "/readyz", "not ready while stalled", |s, body| {
        s == 503 && body.contains("journal's disk is stalled")
    })
    .await;
    let answered_while_frozen = frozen.elapsed();
    assert!(
        !stuck.is_finished(),
        "the increment's commit is still stuck when the answers come"
    );
    disk.thaw();
    let answer = stuck.await.expect("the increment's task");
    assert!(
        answer.0 == 202 || answer == (503, "timeout".to_owned()),
        "the increment that waited is answered 202 once the disk answers, or 503 timeout: \
         {answer:?}"
    );
    let thawed = Instant::now();
    while journal_segments(dir.path()).len() > 1 {
        assert!(
            thawed.elapsed() < Duration::from_secs(10),
            "the applied segments are deleted once the disk answers ({} left)",
            journal_segments(dir.path()).len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = tally.terminate().await;
    assert!(status.success(), "SIGTERM drains and exits 0: {status}");

    let mut expected: std::collections::HashMap<String, i64> = (0..BATCH_ITEMS)
        .map(|i| (batch_key(i), BATCHES as i64))
        .collect();
    expected.insert("frozen".to_owned(), 1);
    assert_eq!(
        store.counters().await,
        expected,
        "every increment stored once"
    );
    drop(disk);
    shout(&format!(
        "disk stall ack=journal postgres: {before_trim} segment files when frozen; the flusher \
         wrote the batches {flushed_while_frozen:.1?} into the freeze and fresh connections were \
         answered (/readyz 503 stalled) by {answered_while_frozen:.1?}; the applied segments \
         were deleted once thawed"
    ));
}
