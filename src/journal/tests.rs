//! Journal tests against real files in temporary directories.

use std::fs;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::*;
use std::time::Duration;

fn opts(segment_bytes: u64) -> JournalOptions {
    JournalOptions {
        segment_bytes,
        ..JournalOptions::default()
    }
}

/// What a test sees of a replay: every record, in the order it was read.
#[derive(Debug, Default, PartialEq, Eq)]
struct Records {
    records: Vec<ReplayedRecord>,
    max_seq: u64,
    cut_bytes: u64,
}

/// Opens the journal in `dir`, collecting the records it replays one by one.
fn open(dir: &Path, segment_bytes: u64) -> (Journal, Records) {
    let mut records = Vec::new();
    let (journal, cut_bytes) =
        Journal::open_with(dir, opts(segment_bytes), &mut |r| records.push(r))
            .expect("journal opens");
    let max_seq = records.iter().map(|r| r.seq).max().unwrap_or(0);
    let replay = Records {
        records,
        max_seq,
        cut_bytes,
    };
    (journal, replay)
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}

fn non_empty_segments(dir: &Path) -> Vec<PathBuf> {
    segment_files(dir)
        .into_iter()
        .filter(|p| fs::metadata(p).expect("stat").len() > 0)
        .collect()
}

/// Appends one single-entry record per seq, one after the other (one group each).
async fn append_seqs(journal: &Journal, seqs: impl IntoIterator<Item = u64>) {
    for seq in seqs {
        let key = format!("k{seq:02}");
        journal
            .append(seq, &[(key.as_str(), seq as i64)])
            .await
            .expect("append");
    }
}

fn seqs(replay: &Records) -> Vec<u64> {
    replay.records.iter().map(|r| r.seq).collect()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_replay_exactly_in_per_task_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    const TASKS: usize = 12;
    const PER_TASK: usize = 25;
    {
        // Small segments so rotation happens while appends race.
        let (journal, replay) = open(dir.path(), 2048);
        assert!(replay.records.is_empty());
        let journal = Arc::new(journal);
        let mut set = tokio::task::JoinSet::new();
        for t in 0..TASKS {
            let journal = Arc::clone(&journal);
            set.spawn(async move {
                for i in 0..PER_TASK {
                    let key = format!("task{t}");
                    let other = format!("extra-ü-{i}");
                    let entries = [(key.as_str(), i as i64), (other.as_str(), -(t as i64))];
                    journal
                        .append(i as u64 + 1, &entries)
                        .await
                        .expect("append");
                }
            });
        }
        while let Some(done) = set.join_next().await {
            done.expect("task");
        }
    }
    assert!(segment_files(dir.path()).len() > 2, "expected rotation");

    let (_journal, replay) = open(dir.path(), 2048);
    assert_eq!(replay.records.len(), TASKS * PER_TASK);
    assert_eq!(replay.max_seq, PER_TASK as u64);
    assert_eq!(replay.cut_bytes, 0);
    for t in 0..TASKS {
        let key = format!("task{t}");
        let mine: Vec<&ReplayedRecord> = replay
            .records
            .iter()
            .filter(|r| r.entries[0].0 == key)
            .collect();
        assert_eq!(mine.len(), PER_TASK, "task {t}");
        for (i, rec) in mine.iter().enumerate() {
            assert_eq!(rec.seq, i as u64 + 1);
            let want = vec![
                (key.clone(), i as i64),
                (format!("extra-ü-{i}"), -(t as i64)),
            ];
            assert_eq!(rec.entries, want, "task {t} record {i}");
        }
    }
}

#[test]
fn group_commit_groups_concurrent_appends() {
    const N: usize = 200;
    let dir = tempfile::tempdir().expect("tempdir");
    let syncs = Arc::new(AtomicUsize::new(0));
    let records = Arc::new(AtomicUsize::new(0));
    // The first group's callback holds the writer until every task has queued its append,
    // so the rest must arrive as (at most a few) groups. No timing assumptions.
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let gate = Mutex::new(Some(gate));
    let on_sync = {
        let (syncs, records) = (Arc::clone(&syncs), Arc::clone(&records));
        Arc::new(move |stats: GroupStats| {
            syncs.fetch_add(1, Ordering::SeqCst);
            records.fetch_add(stats.records, Ordering::SeqCst);
            assert!(stats.bytes > 0);
            if let Some(gate) = gate.lock().expect("gate").take() {
                let _ = gate.recv();
            }
        })
    };
    let options = JournalOptions {
        on_sync: Some(on_sync),
        ..JournalOptions::default()
    };
    let (journal, _) = Journal::open(dir.path(), options).expect("open");
    let journal = Arc::new(journal);
    rt().block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..N {
            let journal = Arc::clone(&journal);
            set.spawn(async move { journal.append(1, &[("k", i as i64)]).await });
        }
        // Current-thread runtime: yielding lets every spawned task run up to its await,
        // i.e. queue its record.
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        release.send(()).expect("gate open");
        while let Some(done) = set.join_next().await {
            done.expect("task").expect("append");
        }
    });
    assert_eq!(records.load(Ordering::SeqCst), N);
    let syncs = syncs.load(Ordering::SeqCst);
    assert!(syncs < N / 10, "{syncs} fsyncs for {N} records");
}

/// Counts the wake-ups of a future polled by hand.
struct CountingWaker(AtomicUsize);

impl std::task::Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A journal whose writer, after each group's fsync and before settling it, reports on the
/// first channel and then waits for a message on the second. Bind the sender after the
/// journal, so that a failing assertion drops the journal first: the held writer then goes
/// on, and the journal's drop can join it.
fn held(
    dir: &Path,
) -> (
    Journal,
    std::sync::mpsc::Receiver<()>,
    std::sync::mpsc::Sender<()>,
) {
    held_with(dir, JournalOptions::default())
}

/// [`held`], with `options` for everything but `on_sync`.
fn held_with(
    dir: &Path,
    options: JournalOptions,
) -> (
    Journal,
    std::sync::mpsc::Receiver<()>,
    std::sync::mpsc::Sender<()>,
) {
    let (synced, group_synced) = std::sync::mpsc::channel::<()>();
    let (go_on, permit) = std::sync::mpsc::channel::<()>();
    let hold = Mutex::new((synced, permit));
    let on_sync = Arc::new(move |_: GroupStats| {
        let hold = hold.lock().expect("hold");
        let _ = hold.0.send(());
        let _ = hold.1.recv();
    });
    let options = JournalOptions {
        on_sync: Some(on_sync),
        ..options
    };
    let (journal, _) = Journal::open(dir, options).expect("open");
    (journal, group_synced, go_on)
}

#[test]
fn a_commit_running_past_stalled_after_is_reported_until_it_completes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stalled_after = Duration::from_secs(1);
    let options = JournalOptions {
        stalled_after,
        ..JournalOptions::default()
    };
    // `on_sync` runs inside the group's commit: holding it there is a disk that does not
    // finish the write and fsync.
    let (journal, group_synced, go_on) = held_with(dir.path(), options);
    let journal = Arc::new(journal);
    // Bound after the journal, so that a failing assertion drops it first: the held commit
    // then goes on, and the journal's drop can join the writer.
    let go_on = go_on;
    assert_eq!(journal.stalled(), None, "nothing is being committed");
    let appended = std::time::Instant::now();
    let append = std::thread::spawn({
        let journal = Arc::clone(&journal);
        move || rt().block_on(journal.append(1, &[("k", 1)]))
    });
    group_synced.recv().expect("the group is being committed");
    assert_eq!(journal.stalled(), None, "a commit just begun is no stall");
    std::thread::sleep(stalled_after + Duration::from_millis(100));
    let running = journal.stalled().expect("stalled past stalled_after");
    // Its write began after the append did.
    assert!(
        running >= stalled_after && running <= appended.elapsed(),
        "reported {running:?}, {:?} after the append",
        appended.elapsed()
    );
    assert_eq!(journal.stalls(), 0, "counted as it ends");
    go_on.send(()).expect("let the commit complete");
    append.join().expect("append thread").expect("append");
    assert_eq!(journal.stalled(), None, "the commit completed");
    assert_eq!(journal.stalls(), 1, "one stall, ended");
    // A commit let through at once is no stall.
    go_on.send(()).expect("let the next commit through");
    rt().block_on(journal.append(2, &[("k", 1)]))
        .expect("append");
    assert_eq!(journal.stalls(), 1, "a quick commit is not counted");
}

#[test]
fn a_commit_that_panics_is_not_reported_as_a_stall() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = JournalOptions {
        stalled_after: Duration::from_millis(10),
        // Runs inside the group's commit, on the writer thread, which the panic ends.
        on_sync: Some(Arc::new(|_: GroupStats| panic!("a commit that panics"))),
        ..JournalOptions::default()
    };
    let (journal, _) = Journal::open(dir.path(), options).expect("open");
    let outcome = rt().block_on(journal.append(1, &[("k", 1)]));
    assert!(outcome.is_err(), "nobody made it durable: {outcome:?}");
    assert_eq!(journal.stalled(), None, "the commit ended, by a panic");
}

#[test]
fn a_commit_wakes_only_the_waiters_of_its_own_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, group_synced, go_on) = held(dir.path());
    let journal = Arc::new(journal);
    // Bound after the journal, so that a failing assertion drops it first: the held writer
    // then goes on, and the journal's drop can join it.
    let go_on = go_on;
    let first = std::thread::spawn({
        let journal = Arc::clone(&journal);
        move || rt().block_on(journal.append(1, &[("first", 1)]))
    });
    group_synced.recv().expect("first group synced");

    // Queued while the first group is being committed: it belongs to the next group.
    let counting = || Arc::new(CountingWaker(AtomicUsize::new(0)));
    let (queued, gathering, committing) = (counting(), counting(), counting());
    fn poll<F: Future>(future: &mut Pin<Box<F>>, wakes: &Arc<CountingWaker>) -> Poll<F::Output> {
        let waker = std::task::Waker::from(Arc::clone(wakes));
        future
            .as_mut()
            .poll(&mut std::task::Context::from_waker(&waker))
    }
    let mut second = Box::pin(journal.append(1, &[("second", 2)]));
    assert!(poll(&mut second, &queued).is_pending());
    // Polled again (by another waker) while its group still gathers.
    assert!(poll(&mut second, &gathering).is_pending());

    // The first group settles and its waiter returns; the writer then holds the second
    // group before settling it.
    go_on.send(()).expect("let the first group settle");
    first.join().expect("first thread").expect("first append");
    group_synced.recv().expect("second group synced");
    let wakes = |w: &Arc<CountingWaker>| w.0.load(Ordering::SeqCst);
    assert_eq!(
        (wakes(&queued), wakes(&gathering)),
        (0, 0),
        "woken by the commit of a group it is not in"
    );
    // Polled again while its group is being committed.
    assert!(poll(&mut second, &committing).is_pending());

    // Its own commit wakes every waker it left, and then it is done.
    go_on.send(()).expect("let the second group settle");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for (what, waker) in [
        ("queued", &queued),
        ("gathering", &gathering),
        ("committing", &committing),
    ] {
        while wakes(waker) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the waker left while {what} was never woken"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert!(matches!(
        poll(&mut second, &committing),
        Poll::Ready(Ok(()))
    ));
}

#[test]
fn a_commit_delay_never_holds_a_lone_append_or_a_few_and_loses_nothing_under_concurrency() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A delay far longer than the test may take: if a lone append waited for it, the
    // timeout below would fire.
    let options = JournalOptions {
        commit_delay: Duration::from_secs(3600),
        ..JournalOptions::default()
    };
    let (journal, _) = Journal::open(dir.path(), options).expect("open");
    let timed = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    timed.block_on(async {
        for i in 0..3 {
            tokio::time::timeout(Duration::from_secs(30), journal.append(1, &[("lone", i)]))
                .await
                .expect("a lone append is not delayed")
                .expect("append");
        }
        // Rounds of fewer concurrent appends than COMMIT_SIBLINGS: never delayed either.
        assert_eq!(COMMIT_SIBLINGS, 5);
        for round in 0..3 {
            let entry = [("few", round)];
            let few = async {
                tokio::join!(
                    journal.append(1, &entry),
                    journal.append(1, &entry),
                    journal.append(1, &entry),
                    journal.append(1, &entry),
                )
            };
            let results = tokio::time::timeout(Duration::from_secs(30), few)
                .await
                .expect("a few concurrent appends are not delayed");
            for result in [results.0, results.1, results.2, results.3] {
                result.expect("append");
            }
        }
    });
    drop(journal);
    // Concurrent appends with a short delay: every record durable and replayed.
    let options = JournalOptions {
        commit_delay: Duration::from_millis(1),
        ..JournalOptions::default()
    };
    let (journal, replay) = Journal::open(dir.path(), options).expect("reopen");
    assert_eq!(replay.records(), 3 + 3 * 4);
    let journal = Arc::new(journal);
    rt().block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..100 {
            let journal = Arc::clone(&journal);
            set.spawn(async move { journal.append(2, &[("many", i)]).await });
        }
        while let Some(done) = set.join_next().await {
            done.expect("task").expect("append");
        }
    });
    drop(journal);
    let (_, replay) = Journal::open(dir.path(), opts(DEFAULT_SEGMENT_BYTES)).expect("reopen");
    let batch = &replay.batches[&2];
    assert_eq!(batch.sums["many"], (0..100).sum::<i128>());
}

/// Rounds of ten concurrent appends (queued together, so they tend to share one group) on a
/// two-worker runtime, until a round comes right after a group of at least
/// [`COMMIT_SIBLINGS`], which the commit delay applies to. In that round a task keeps one
/// worker busy until the writer is seen in its delay, so the wait certainly begins while a
/// worker runs, and only the workers' parking afterwards can end it early. Returns how long
/// that round took and the longest commit delay any group reported.
fn delayed_round(delay: Duration, follow: bool) -> (Duration, Duration) {
    let dir = tempfile::tempdir().expect("tempdir");
    let groups = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&groups);
    let options = JournalOptions {
        commit_delay: delay,
        on_sync: Some(Arc::new(move |stats: GroupStats| {
            seen.lock().expect("lock").push(stats);
        })),
        ..JournalOptions::default()
    };
    let journal = Arc::new(Journal::open(dir.path(), options).expect("open").0);
    let idle = crate::idle::IdleWorkers::new();
    let runtime = idle
        .build(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_time(),
        )
        .expect("runtime");
    if follow {
        journal.follow_workers(&idle);
    }
    runtime.block_on(async {
        for round in 0..50 {
            let after_big_group = groups
                .lock()
                .expect("lock")
                .last()
                .is_some_and(|g| g.records >= COMMIT_SIBLINGS);
            let started = std::time::Instant::now();
            let spinner = after_big_group.then(|| busy_until_delaying(&journal));
            let mut ten = tokio::task::JoinSet::new();
            for _ in 0..10 {
                let journal = Arc::clone(&journal);
                ten.spawn(async move { journal.append(1, &[("k", round)]).await });
            }
            let all = tokio::time::timeout(Duration::from_secs(30), ten.join_all())
                .await
                .expect("the round ends");
            for result in all {
                result.expect("append");
            }
            if let Some(spinner) = spinner {
                assert!(
                    spinner.await.expect("spinner"),
                    "the writer never began its delay"
                );
                let took = started.elapsed();
                let waited = groups.lock().expect("lock").iter().map(|g| g.waited).max();
                return (took, waited.unwrap_or_default());
            }
        }
        panic!("no group of {COMMIT_SIBLINGS} or more in 50 rounds: {groups:?}");
    })
}

/// Spawns a task that spins on a worker until the journal's writer is in its commit delay
/// (true) or 20 s have passed (false), and returns once it spins.
fn busy_until_delaying(journal: &Arc<Journal>) -> tokio::task::JoinHandle<bool> {
    let spinning = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (journal, flag) = (Arc::clone(journal), Arc::clone(&spinning));
    let spinner = tokio::spawn(async move {
        flag.store(true, Ordering::SeqCst);
        let until = std::time::Instant::now() + Duration::from_secs(20);
        while !journal.shared.delaying.load(Ordering::SeqCst) {
            if std::time::Instant::now() > until {
                return false;
            }
            std::hint::spin_loop();
        }
        true
    });
    while !spinning.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    spinner
}

#[test]
fn a_commit_delay_ends_as_soon_as_every_worker_is_parked() {
    // Once the spinning worker lets go, nothing else runs: the workers park, and the group
    // goes at once instead of after the (hour-long) delay.
    let (took, waited) = delayed_round(Duration::from_secs(3600), true);
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(
        waited < Duration::from_secs(10),
        "reported a wait of {waited:?}"
    );
    // The control: not following the workers, the same round waits out the delay, and the
    // group says so.
    let (took, waited) = delayed_round(Duration::from_millis(800), false);
    assert!(took >= Duration::from_millis(800), "took {took:?}");
    assert!(
        waited >= Duration::from_millis(800),
        "reported a wait of {waited:?}"
    );
}

#[tokio::test]
async fn torn_tail_is_cut_and_later_appends_stay_consistent() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (journal, _) = open(dir.path(), DEFAULT_SEGMENT_BYTES);
        append_seqs(&journal, 1..=10).await;
    }
    let seg = non_empty_segments(dir.path()).pop().expect("a segment");
    let full = fs::metadata(&seg).expect("stat").len();
    let file = fs::OpenOptions::new().write(true).open(&seg).expect("open");
    file.set_len(full - 3).expect("tear the last record");
    drop(file);

    let record_len = (full / 10) as usize; // all ten records have the same size
    {
        let (journal, replay) = open(dir.path(), DEFAULT_SEGMENT_BYTES);
        assert_eq!(seqs(&replay), (1..=9).collect::<Vec<_>>());
        assert_eq!(replay.max_seq, 9);
        assert_eq!(replay.cut_bytes, record_len as u64 - 3);
        assert_eq!(
            fs::metadata(&seg).expect("stat").len(),
            full - record_len as u64
        );
        append_seqs(&journal, 11..=12).await;
    }
    let (_journal, replay) = open(dir.path(), DEFAULT_SEGMENT_BYTES);
    let mut want: Vec<u64> = (1..=9).collect();
    want.extend([11, 12]);
    assert_eq!(seqs(&replay), want);
    assert_eq!(replay.cut_bytes, 0);
    assert_eq!(replay.records[9].entries, vec![("k11".to_owned(), 11)]);
}

#[tokio::test]
async fn the_active_segment_is_zero_filled_ahead_and_cut_back_when_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, _) = open(dir.path(), DEFAULT_SEGMENT_BYTES);
    append_seqs(&journal, 1..=3).await;
    let seg = segment_files(dir.path()).pop().expect("the active segment");
    // Written ahead: every group's fdatasync then overwrites blocks the file has.
    assert_eq!(fs::metadata(&seg).expect("stat").len(), 1 << 20);
    let bytes = fs::read(&seg).expect("read");
    let records = 3 * 36;
    assert!(bytes[..records].iter().any(|&b| b != 0));
    assert!(
        bytes[records..].iter().all(|&b| b == 0),
        "zeros after the records"
    );
    drop(journal);
    assert_eq!(
        fs::metadata(&seg).expect("stat").len(),
        records as u64,
        "the zeros are cut off when the writer stops"
    );
}

/// A journal directory whose one segment holds records of seqs 1..=5, written and closed;
/// returns the segment's path and bytes.
async fn five_records_written() -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (journal, _) = open(dir.path(), DEFAULT_SEGMENT_BYTES);
        append_seqs(&journal, 1..=5).await;
    }
    let seg = non_empty_segments(dir.path()).pop().expect("a segment");
    let good = fs::read(&seg).expect("read");
    (dir, seg, good)
}

#[tokio::test]
async fn a_zeroed_tail_left_by_a_crash_ends_replay_cleanly() {
    let (dir, seg, good) = five_records_written().await;
    // What kill -9 leaves: the records, then the zeros written ahead of them.
    let mut crashed = good.clone();
    crashed.resize(good.len() + 100_000, 0);
    fs::write(&seg, &crashed).expect("write");
    {
        let (journal, replay) = open(dir.path(), DEFAULT_SEGMENT_BYTES);
        assert_eq!(seqs(&replay), vec![1, 2, 3, 4, 5]);
        assert_eq!(replay.cut_bytes, 0, "zeros are not damage");
        assert_eq!(
            fs::read(&seg).expect("read"),
            good,
            "cut back to its records"
        );
        append_seqs(&journal, 6..=6).await;
    }
    // A record torn by the crash, then zeros: cut like any torn tail, zeros included.
    let mut torn = fs::read(&seg).expect("read");
    torn.extend_from_slice(&good[..20]);
    torn.resize(torn.len() + 4096, 0);
    fs::write(&seg, &torn).expect("write");
    let (_journal, replay) = open(dir.path(), DEFAULT_SEGMENT_BYTES);
    assert_eq!(seqs(&replay), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(replay.cut_bytes, 20 + 4096);
}

#[tokio::test]
async fn garbage_tail_is_cut() {
    let (dir, seg, good) = five_records_written().await;
    // A plausible header (small length) followed by bytes that fail the checksum.
    let mut garbage = 40u32.to_le_bytes().to_vec();
    garbage.extend([0xAB; 45]);
    let mut bytes = good.clone();
    bytes.extend(&garbage);
    fs::write(&seg, &bytes).expect("write garbage");

    {
        let (journal, replay) = open(dir.path(), DEFAULT_SEGMENT_BYTES);
        assert_eq!(seqs(&replay), vec![1, 2, 3, 4, 5]);
        assert_eq!(replay.cut_bytes, garbage.len() as u64);
        assert_eq!(fs::read(&seg).expect("read"), good, "garbage truncated off");
        append_seqs(&journal, 6..=6).await;
    }
    let (_journal, replay) = open(dir.path(), DEFAULT_SEGMENT_BYTES);
    assert_eq!(seqs(&replay), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(replay.cut_bytes, 0);
}

#[tokio::test]
async fn corrupt_record_inside_older_segment_skips_only_its_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Each record is 36 bytes; rotation at >= 100 bytes puts three records in a segment.
    {
        let (journal, _) = open(dir.path(), 100);
        append_seqs(&journal, 1..=12).await;
    }
    let segs = non_empty_segments(dir.path());
    assert_eq!(segs.len(), 4);
    let mut bytes = fs::read(&segs[1]).expect("read");
    assert_eq!(bytes.len(), 108);
    bytes[36 + 20] ^= 0x01; // inside record 5's body
    fs::write(&segs[1], &bytes).expect("corrupt");

    let (_journal, replay) = open(dir.path(), 100);
    assert_eq!(seqs(&replay), vec![1, 2, 3, 4, 7, 8, 9, 10, 11, 12]);
    assert_eq!(replay.cut_bytes, 72);
    assert_eq!(replay.max_seq, 12);
    assert_eq!(
        fs::read(&segs[1]).expect("read"),
        bytes,
        "older segment left as is"
    );
}

#[test]
fn empty_directory_and_empty_segments() {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("not/yet/there");
    let (journal, replay) = open(&dir, 100);
    assert_eq!(replay, Records::default());
    drop(journal);

    // Empty leftovers, old and newest, plus an unrelated file that must be ignored.
    fs::write(writer::path(&dir, 7), b"").expect("write");
    fs::write(writer::path(&dir, 9), b"").expect("write");
    fs::write(dir.join("README"), b"not a segment").expect("write");
    let (_journal, replay) = open(&dir, 100);
    assert_eq!(replay, Records::default());
    assert_eq!(segment_files(&dir), vec![writer::path(&dir, 10)]);
    assert!(dir.join("README").exists());
}

#[tokio::test]
async fn trim_and_close_remove_only_applied_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (journal, _) = open(dir.path(), 100);
        append_seqs(&journal, 1..=9).await; // segments {1,2,3} {4,5,6} and active {7,8,9}
        assert_eq!(segment_files(dir.path()).len(), 3);
        assert_eq!(journal.trim(0).expect("trim"), 0);
        assert_eq!(journal.trim(3).expect("trim"), 1, "max seq 3 <= 3");
        assert_eq!(segment_files(dir.path()).len(), 2);
        assert_eq!(journal.trim(5).expect("trim"), 0, "max seq 6 > 5");
        assert_eq!(
            journal.trim(u64::MAX).expect("trim"),
            1,
            "never the active one"
        );
        assert_eq!(segment_files(dir.path()), vec![writer::path(dir.path(), 3)]);
    }
    {
        let (journal, replay) = open(dir.path(), 100);
        assert_eq!(seqs(&replay), vec![7, 8, 9]);
        journal.close(8).await.expect("close");
        assert!(matches!(
            journal.append(10, &[("k", 1)]).await,
            Err(JournalError::Closed)
        ));
        assert!(
            !segment_files(dir.path()).is_empty(),
            "seq 9 is not applied"
        );
    }
    {
        let (journal, replay) = open(dir.path(), 100);
        assert_eq!(seqs(&replay), vec![7, 8, 9]);
        append_seqs(&journal, 10..=10).await;
        journal.close(10).await.expect("close");
        assert!(segment_files(dir.path()).is_empty());
        journal.close(10).await.expect("second close is harmless");
    }
    let (_journal, replay) = open(dir.path(), 100);
    assert_eq!(replay, Records::default());
}

#[tokio::test]
async fn trim_later_has_the_writer_thread_delete_applied_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, _) = open(dir.path(), 100);
    append_seqs(&journal, 1..=9).await; // segments {1,2,3} {4,5,6} and active {7,8,9}
    assert_eq!(journal.trim_later(0), 0);
    assert_eq!(journal.trim_later(3), 1, "max seq 3 <= 3");
    within_5s("the writer deletes it", || {
        segment_files(dir.path()).len() <= 2
    })
    .await;
    assert_eq!(journal.trim_later(5), 0, "max seq 6 > 5");
    journal.close(6).await.expect("close");
    assert_eq!(journal.trim_later(u64::MAX), 0, "nothing after close");
    assert_eq!(
        segment_files(dir.path()),
        vec![writer::path(dir.path(), 2), writer::path(dir.path(), 3)],
        "seq 7-9 are not applied: both segments stay for replay"
    );
}

/// A segment the store has every record of but that cannot be deleted stays on the list:
/// counted in `disk_bytes`, tried again at every trim (the synchronous one and the writer
/// thread's), and deleted at the first trim after it can be. The others go meanwhile.
#[tokio::test]
async fn a_segment_that_cannot_be_deleted_stays_counted_and_is_tried_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, _) = open(dir.path(), 100);
    append_seqs(&journal, 1..=12).await; // {1,2,3} {4,5,6} {7,8,9}, active {10,11,12}
    let before = journal.disk_bytes();
    // Stands for a file that cannot be deleted (immutable, or in a directory made
    // read-only, for a user without root): a directory in segment 1's place, which
    // `remove_file` refuses whoever runs the test.
    let first = writer::path(dir.path(), 1);
    let bytes = |n| {
        fs::metadata(writer::path(dir.path(), n))
            .expect("a segment")
            .len()
    };
    let (second, third) = (bytes(2), bytes(3));
    fs::remove_file(&first).expect("remove segment 1");
    fs::create_dir(&first).expect("a directory in its place");

    assert!(!journal.trim_failing());
    assert!(journal.trim(6).is_err(), "segment 1 cannot be deleted");
    assert_eq!(journal.trim_failures(), 1);
    assert!(journal.trim_failing(), "until a retry deletes it");
    assert!(
        !writer::path(dir.path(), 2).exists(),
        "segment 2 is deleted"
    );
    assert_eq!(
        journal.disk_bytes(),
        before - second,
        "segment 1 still counts"
    );

    assert_eq!(
        journal.trim_later(9),
        2,
        "segment 1 is handed over again, with 3"
    );
    within_5s("the writer thread fails to delete it", || {
        journal.trim_failures() == 2
    })
    .await;
    assert!(
        !writer::path(dir.path(), 3).exists(),
        "segment 3 is deleted"
    );
    assert!(first.exists(), "segment 1 is left");
    assert_eq!(journal.disk_bytes(), before - second - third);

    fs::remove_dir(&first).expect("it can be deleted now");
    assert_eq!(journal.trim(9).expect("trim"), 1, "tried again, and gone");
    assert_eq!(journal.disk_bytes(), files_bytes(dir.path()));
    assert_eq!(segment_files(dir.path()), vec![writer::path(dir.path(), 4)]);
    assert_eq!(journal.trim_failures(), 2, "only failures count");
    assert!(!journal.trim_failing(), "nothing is left behind");
}

/// A close that cannot delete the segments keeps counting them, once each with its size,
/// and a later close deletes them.
#[tokio::test]
async fn a_close_that_cannot_delete_keeps_counting_the_segment_and_can_be_retried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, _) = open(dir.path(), 100);
    append_seqs(&journal, 1..=2).await; // the active segment 1 holds {1,2}
    // As in the test above: a directory in its place, which `remove_file` refuses.
    let active = writer::path(dir.path(), 1);
    fs::remove_file(&active).expect("remove segment 1");
    fs::create_dir(&active).expect("a directory in its place");

    assert!(
        journal.close(2).await.is_err(),
        "segment 1 cannot be deleted"
    );
    let kept = journal.disk_bytes();
    assert!(kept > 0, "the segment still counts");
    assert!(journal.close(2).await.is_err(), "nor the second time");
    assert_eq!(journal.disk_bytes(), kept, "counted once, with its size");

    fs::remove_dir(&active).expect("it can be deleted now");
    journal.close(2).await.expect("a third close deletes it");
    assert_eq!(journal.disk_bytes(), 0);
    assert_eq!(journal.trim_failures(), 2);
}

/// What the segment files in `dir` take, read from the disk.
fn files_bytes(dir: &Path) -> u64 {
    segment_files(dir)
        .iter()
        .map(|p| fs::metadata(p).expect("stat a segment").len())
        .sum()
}

#[tokio::test]
async fn disk_bytes_is_what_the_segment_files_take() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (journal, _) = open(dir.path(), 100);
        assert_eq!(journal.disk_bytes(), 0, "an empty active segment");
        append_seqs(&journal, 1..=9).await; // segments {1,2,3} {4,5,6} and active {7,8,9}
        let written = journal.disk_bytes();
        assert!(written > 0, "three segments hold records");
        assert_eq!(
            written,
            files_bytes(dir.path()),
            "after appends and rotations"
        );
        journal.trim(3).expect("trim");
        assert!(
            journal.disk_bytes() < written,
            "a deleted segment no longer counts"
        );
        assert_eq!(journal.disk_bytes(), files_bytes(dir.path()), "after trim");
        assert_eq!(journal.trim_later(u64::MAX), 1);
        // Deleted, and then (after the directory's fsync) no longer counted.
        within_5s("the writer deletes it", || {
            segment_files(dir.path()).len() == 1 && journal.disk_bytes() == files_bytes(dir.path())
        })
        .await;
    }
    // A torn record after the last one: cut on open, and not counted.
    let last = segment_files(dir.path()).pop().expect("a segment is left");
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(&last)
        .expect("open");
    std::io::Write::write_all(&mut file, &[7; 40]).expect("tear");
    let (journal, replay) = open(dir.path(), 100);
    assert_eq!(seqs(&replay), vec![7, 8, 9]);
    assert_eq!(
        journal.disk_bytes(),
        files_bytes(dir.path()),
        "after replay"
    );
    append_seqs(&journal, 10..=11).await;
    assert_eq!(
        journal.disk_bytes(),
        files_bytes(dir.path()),
        "appended after replay"
    );
    journal.close(11).await.expect("close");
    assert_eq!(
        (journal.disk_bytes(), files_bytes(dir.path())),
        (0, 0),
        "closed, all applied"
    );
}

/// Waits up to 5 s for `done`, polling.
async fn within_5s(what: &str, mut done: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !done() {
        assert!(started.elapsed() < Duration::from_secs(5), "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn an_idle_journal_probes_its_disk_without_changing_what_replays() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = JournalOptions {
        stalled_after: Duration::from_millis(50),
        probe_idle: true,
        ..opts(DEFAULT_SEGMENT_BYTES)
    };
    let (journal, _) = Journal::open(dir.path(), options).expect("open");
    let active = segment_files(dir.path()).pop().expect("the active segment");
    // The byte is counted once its fsync is done.
    within_5s("the writer probes a disk it has not written to", || {
        journal.disk_bytes() == 1
    })
    .await;
    assert_eq!(fs::read(&active).expect("read"), vec![0], "one zero byte");
    append_seqs(&journal, 1..=2).await;
    assert_eq!(journal.disk_bytes(), files_bytes(dir.path()));
    // Idle again: the next probe writes over the zeros ahead of the records.
    let appended = journal.shared.last_write_ended.load(Ordering::Relaxed);
    within_5s("the writer probes again once idle", || {
        journal.shared.last_write_ended.load(Ordering::Relaxed) != appended
    })
    .await;
    assert_eq!(journal.disk_bytes(), files_bytes(dir.path()));
    drop(journal);
    let (_journal, replay) = open(dir.path(), DEFAULT_SEGMENT_BYTES);
    assert_eq!((seqs(&replay), replay.cut_bytes), (vec![1, 2], 0));
}

#[tokio::test]
async fn a_journal_that_does_not_probe_writes_nothing_while_idle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let options = JournalOptions {
        stalled_after: Duration::from_millis(10),
        ..opts(DEFAULT_SEGMENT_BYTES)
    };
    let (journal, _) = Journal::open(dir.path(), options).expect("open");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!((journal.disk_bytes(), files_bytes(dir.path())), (0, 0));
    assert_eq!(
        journal.shared.last_write_ended.load(Ordering::Relaxed),
        0,
        "no write at all"
    );
}

#[tokio::test]
async fn reopening_without_appends_replays_the_same() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (journal, _) = open(dir.path(), 100);
        append_seqs(&journal, [3, 1, 2, 5, 4]).await;
    }
    let first = open(dir.path(), 100).1;
    let second = open(dir.path(), 100).1;
    assert_eq!(seqs(&first), vec![3, 1, 2, 5, 4]);
    assert_eq!(first.max_seq, 5);
    assert_eq!(first, second);
}

#[test]
fn second_journal_on_same_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (first, _) = open(dir.path(), 100);
    let second = Journal::open(dir.path(), opts(100));
    assert!(matches!(second, Err(JournalError::Locked { .. })));
    drop(first);
    let _ = open(dir.path(), 100);
}

#[tokio::test]
async fn write_failure_fails_the_journal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, _) = open(dir.path(), 1); // rotate before every group
    journal.append(1, &[("a", 1)]).await.expect("first append");
    // Occupy the next segment's name so rotation cannot create it.
    fs::create_dir(writer::path(dir.path(), 2)).expect("mkdir");
    let err = journal
        .append(2, &[("b", 1)])
        .await
        .expect_err("rotation fails");
    assert!(matches!(err, JournalError::Io { .. }), "{err}");
    let err = journal.append(3, &[("c", 1)]).await.expect_err("failed");
    assert!(matches!(err, JournalError::Failed(_)), "{err}");
    assert!(journal.is_failed());
    assert!(journal.failure().is_some());
    // Recovery needs a fresh segment, which cannot be created either: still failed.
    assert!(journal.recover().await.is_err());
    assert!(journal.is_failed());
    journal.close(0).await.expect("close keeps the files");
    assert_eq!(
        writer::path(dir.path(), 1),
        non_empty_segments(dir.path())[0]
    );
}

#[tokio::test]
async fn a_failed_journal_recovers_into_a_fresh_segment_and_replays_all_it_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (journal, _) = open(dir.path(), 1); // rotate before every group
        journal.append(1, &[("a", 1)]).await.expect("first append");
        fs::create_dir(writer::path(dir.path(), 2)).expect("mkdir");
        journal
            .append(2, &[("b", 1)])
            .await
            .expect_err("rotation fails");
        assert!(journal.is_failed());
        journal
            .recover()
            .await
            .expect_err("segment 2 is still blocked");
        fs::remove_dir(writer::path(dir.path(), 2)).expect("rmdir");
        journal.recover().await.expect("recovers");
        assert!(!journal.is_failed());
        assert!(journal.failure().is_none());
        journal.append(3, &[("c", 1)]).await.expect("appends again");
        journal
            .recover()
            .await
            .expect("recovering a healthy journal is a no-op");
        journal.append(4, &[("d", 1)]).await.expect("appends again");
    }
    let (_, replay) = open(dir.path(), 1);
    let seqs: Vec<u64> = replay.records.iter().map(|r| r.seq).collect();
    assert_eq!(
        seqs,
        [1, 3, 4],
        "every acknowledged record, none of the failed one"
    );
}

#[tokio::test]
async fn invalid_records_are_refused_without_failing_the_journal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, _) = open(dir.path(), 100);
    assert!(matches!(
        journal.append::<(&str, i64)>(1, &[]).await,
        Err(JournalError::EmptyRecord)
    ));
    journal.append(1, &[("ok", 1)]).await.expect("append");
}

#[test]
fn journal_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync + 'static>() {}
    assert_send_sync::<Journal>();
    assert_send_sync::<JournalError>();
}

#[test]
fn the_writer_runs_as_a_batch_thread_so_its_wake_ups_do_not_preempt_the_workers() {
    use std::os::unix::thread::JoinHandleExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, _) = open(dir.path(), 1 << 20);
    // Once a group is settled, the writer is past its start.
    rt().block_on(append_seqs(&journal, [1]));
    let thread = journal
        .writer
        .as_ref()
        .expect("writer running")
        .as_pthread_t();
    let mut policy = -1;
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: the writer thread is alive (the journal is open); both outputs are ours.
    let rc = unsafe { libc::pthread_getschedparam(thread, &mut policy, &mut param) };
    assert_eq!(rc, 0, "pthread_getschedparam");
    assert_eq!(policy, libc::SCHED_BATCH);
}

#[test]
fn requests_on_a_relay_thread_leave_the_writer_one_waker_per_group_and_all_complete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, _) = open(dir.path(), DEFAULT_SEGMENT_BYTES);
    let journal = Arc::new(journal);
    const TASKS: u64 = 200;
    let timed = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    };
    timed().block_on(async {
        tokio::spawn(journal.relay());
        // The relay installs itself on its first poll.
        tokio::task::yield_now().await;
        let mut set = tokio::task::JoinSet::new();
        for seq in 1..=TASKS {
            let journal = Arc::clone(&journal);
            set.spawn(async move { journal.append(seq, &[("k", 1)]).await });
        }
        // Every task queues its record on its first poll; by now all have.
        tokio::task::yield_now().await;
        {
            let queue = journal.shared.queue();
            let left = queue.wakers.len() + queue.committing.len();
            // One per list at most (the gathering group and the one being committed), not
            // one per request.
            assert!(left <= 2, "{left} wakers left with the writer");
        }
        let done = tokio::time::timeout(Duration::from_secs(10), set.join_all())
            .await
            .expect("every request is woken once its record is durable");
        assert!(done.into_iter().all(|r| r.is_ok()));
    });
    // Relay and requests are gone with the runtime: a later append from this thread leaves
    // its own waker and completes.
    rt().block_on(async {
        journal
            .append(TASKS + 1, &[("k", 1)])
            .await
            .expect("appended without a relay");
    });
}

#[test]
fn a_request_polled_again_on_a_relay_thread_keeps_one_entry_with_the_relay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, group_synced, go_on) = held(dir.path());
    let journal = Arc::new(journal);
    // Bound after the journal (see `held`).
    let go_on = go_on;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        tokio::spawn(journal.relay());
        // The relay installs itself on its first poll.
        tokio::task::yield_now().await;
        let mut append = Box::pin(journal.append(1, &[("k", 1)]));
        // Queued, then polled twice more (spurious wake-ups) before its group settles.
        for _ in 0..3 {
            std::future::poll_fn(|cx| {
                assert!(append.as_mut().poll(cx).is_pending());
                Poll::Ready(())
            })
            .await;
        }
        group_synced
            .recv()
            .expect("the group is held before it settles");
        assert_eq!(
            crate::relay::waiting(&*journal.shared),
            Some(1),
            "one entry per request, however often it is polled"
        );
        go_on.send(()).expect("let the group settle");
        tokio::time::timeout(Duration::from_secs(10), append)
            .await
            .expect("woken through the relay once settled")
            .expect("durable");
    });
}

#[tokio::test]
async fn open_sums_each_batch_per_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (journal, _) = open(dir.path(), 100);
        for (seq, entries) in [
            (1, vec![("a", 2), ("b", -1)]),
            (2, vec![("a", 5)]),
            (1, vec![("a", i64::MAX)]),
            (1, vec![("a", i64::MAX), ("c", 0)]),
        ] {
            journal.append(seq, &entries).await.expect("append");
        }
    }
    // Garbage after the last record: cut, and counted.
    let seg = non_empty_segments(dir.path()).pop().expect("a segment");
    let mut bytes = fs::read(&seg).expect("read");
    bytes.extend_from_slice(b"garbage");
    fs::write(&seg, &bytes).expect("append garbage");
    let (_journal, replay) = Journal::open(dir.path(), opts(100)).expect("reopen");
    assert!(replay.cut_bytes >= 7, "{}", replay.cut_bytes);
    assert_eq!(replay.records(), 4);
    assert_eq!(replay.max_seq, 2);
    let one = &replay.batches[&1];
    assert_eq!(one.records, 3);
    let want_one = HashMap::from([
        ("a".to_owned(), 2 + 2 * i128::from(i64::MAX)),
        ("b".to_owned(), -1),
        ("c".to_owned(), 0),
    ]);
    assert_eq!(
        one.sums, want_one,
        "summed past 64 bits, keys of no sum kept"
    );
    let two = &replay.batches[&2];
    assert_eq!((two.records, two.sums["a"]), (1, 5));
    assert_eq!(replay.batches.len(), 2);
}

/// A segment listed and then deleted before it is read (a running tally's trim, while a
/// tool reads the journal) is skipped when reading, and an error when opening, where the
/// lock says nobody else deletes.
#[tokio::test]
async fn a_segment_gone_between_listing_and_reading_is_skipped_only_when_reading() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (journal, _) = open(dir.path(), DEFAULT_SEGMENT_BYTES);
        append_seqs(&journal, 1..=2).await;
    }
    let mut numbers = writer::list(dir.path()).expect("list");
    let gone = numbers.last().copied().unwrap_or(0) + 1;
    numbers.push(gone);
    let mut seqs = Vec::new();
    let (cut, _) = replay::replay(dir.path(), &numbers, Repair::No, &mut |r| seqs.push(r.seq))
        .expect("a vanished segment is skipped");
    assert_eq!((seqs, cut), (vec![1, 2], 0));
    let opening = replay::replay(dir.path(), &numbers, Repair::Yes, &mut |_| {});
    assert!(
        matches!(opening, Err(JournalError::Io { .. })),
        "{opening:?}"
    );
}

/// Serving threads as the service runs them: `threads` current-thread runtimes reporting
/// to one `IdleWorkers` that the journal follows, each with the journal's relay.
fn serving(journal: &Arc<Journal>, threads: usize) -> crate::http::threads::ServingThreads {
    let idle = crate::idle::IdleWorkers::new();
    let serving = crate::http::threads::ServingThreads::start(
        std::num::NonZeroUsize::new(threads).expect("nonzero"),
        &idle,
    )
    .expect("serving threads");
    journal.follow_workers(&idle);
    serving.spawn_on_each(|| journal.relay());
    serving
}

/// The groups a journal committed: the name of the thread that committed each, and how
/// many records it held.
type Committed = Arc<Mutex<Vec<(String, usize)>>>;

/// Opens a journal in `dir` whose groups are noted in the returned [`Committed`].
fn named_groups(
    dir: &Path,
    commit_delay: Duration,
    leader_wait: Duration,
) -> (Arc<Journal>, Committed) {
    let groups = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&groups);
    let options = JournalOptions {
        commit_delay,
        leader_wait,
        on_sync: Some(Arc::new(move |stats: GroupStats| {
            let thread = std::thread::current().name().unwrap_or("").to_owned();
            seen.lock().expect("lock").push((thread, stats.records));
        })),
        ..JournalOptions::default()
    };
    let journal = Journal::open(dir, options).expect("open").0;
    (Arc::new(journal), groups)
}

/// Long enough that the writer never takes a group from the serving threads in a test.
const NEVER: Duration = Duration::from_secs(3600);

#[test]
fn the_serving_thread_that_runs_dry_last_commits_the_group_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, groups) = named_groups(dir.path(), Duration::from_millis(1), NEVER);
    let threads = serving(&journal, 2);
    let (tx, rx) = std::sync::mpsc::channel();
    const ROUNDS: usize = 20;
    const PER_THREAD: usize = 10;
    for round in 0..ROUNDS {
        threads.spawn_on_each(|| {
            let (journal, tx) = (Arc::clone(&journal), tx.clone());
            async move {
                let appends: Vec<_> = (0..PER_THREAD)
                    .map(|_| {
                        let journal = Arc::clone(&journal);
                        tokio::spawn(async move { journal.append(1, &[("k", 1)]).await })
                    })
                    .collect();
                for append in appends {
                    let _ = tx.send(append.await.map_err(|e| e.to_string()));
                }
            }
        });
        for _ in 0..2 * PER_THREAD {
            rx.recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("round {round}: an append never completed"))
                .expect("the task ran")
                .expect("appended");
        }
    }
    let groups = groups.lock().expect("lock").clone();
    let records: usize = groups.iter().map(|(_, records)| records).sum();
    assert_eq!(records, ROUNDS * 2 * PER_THREAD, "{groups:?}");
    // The writer thread was never asked: each group was committed by a serving thread
    // as it ran dry.
    assert!(
        groups
            .iter()
            .all(|(thread, _)| thread.starts_with("tally-http-")),
        "{groups:?}"
    );
}

/// Keeps serving thread 0 from ever parking, as a stream of requests that append nothing
/// would, until the returned flag is cleared; returns once it spins.
fn keep_thread_zero_busy(
    threads: &crate::http::threads::ServingThreads,
) -> Arc<std::sync::atomic::AtomicBool> {
    let busy = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let spinning = Arc::new(std::sync::atomic::AtomicBool::new(false));
    threads.spawn_on_each(|| {
        let (busy, spinning) = (Arc::clone(&busy), Arc::clone(&spinning));
        async move {
            if std::thread::current().name() == Some("tally-http-0") {
                spinning.store(true, Ordering::SeqCst);
                while busy.load(Ordering::SeqCst) {
                    std::hint::spin_loop();
                }
            }
        }
    });
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while !spinning.load(Ordering::SeqCst) {
        assert!(std::time::Instant::now() < until, "thread 0 never spun");
        std::thread::sleep(Duration::from_millis(1));
    }
    busy
}

/// Runs `appends` on serving thread 1 while thread 0 is kept busy; returns its outcome,
/// how long it took, and the groups committed.
fn with_thread_zero_busy<F>(
    commit_delay: Duration,
    leader_wait: Duration,
    appends: impl Fn(Arc<Journal>) -> F,
) -> (Result<(), JournalError>, Duration, Vec<(String, usize)>)
where
    F: Future<Output = Result<(), JournalError>> + Send + 'static,
{
    let dir = tempfile::tempdir().expect("tempdir");
    let (journal, groups) = named_groups(dir.path(), commit_delay, leader_wait);
    let threads = serving(&journal, 2);
    let busy = keep_thread_zero_busy(&threads);
    let (tx, rx) = std::sync::mpsc::channel();
    threads.spawn_on_each(|| {
        let (tx, appends) = (tx.clone(), appends(Arc::clone(&journal)));
        async move {
            if std::thread::current().name() == Some("tally-http-1") {
                let started = std::time::Instant::now();
                let appended = appends.await;
                let _ = tx.send((appended, started.elapsed()));
            }
        }
    });
    let received = rx.recv_timeout(Duration::from_secs(10));
    busy.store(false, Ordering::SeqCst);
    let (appended, took) = received.expect("the appends complete while thread 0 stays busy");
    let groups = groups.lock().expect("lock").clone();
    (appended, took, groups)
}

#[test]
fn the_writer_commits_what_serving_threads_leave_while_one_of_them_never_runs_dry() {
    let leader_wait = Duration::from_millis(50);
    let (appended, took, groups) =
        with_thread_zero_busy(NEVER, leader_wait, |journal| async move {
            journal.append(1, &[("k", 1)]).await
        });
    appended.expect("appended");
    assert!(took >= leader_wait, "took {took:?}");
    assert_eq!(groups, [("journal-writer".to_owned(), 1)]);
}

#[test]
fn a_thread_that_parks_commits_a_group_older_than_the_commit_delay() {
    let (appended, _, groups) =
        with_thread_zero_busy(Duration::from_millis(1), NEVER, |journal| async move {
            let append = tokio::spawn(async move { journal.append(1, &[("k", 1)]).await });
            // Thread 1 parks, not last, then wakes for the timer and parks again, once the
            // group is overdue.
            tokio::time::sleep(Duration::from_millis(5)).await;
            append.await.expect("the task ran")
        });
    appended.expect("appended");
    assert_eq!(groups, [("tally-http-1".to_owned(), 1)]);
}

#[test]
fn an_append_that_finds_its_group_overdue_has_the_writer_commit_it() {
    let (appended, _, groups) =
        with_thread_zero_busy(Duration::from_millis(1), NEVER, |journal| async move {
            let append = |value| {
                let journal = Arc::clone(&journal);
                tokio::spawn(async move { journal.append(1, &[("k", value)]).await })
            };
            let first = append(1);
            tokio::task::yield_now().await;
            // Busy without parking past the commit delay, then another append, and busy
            // again: no thread parks, only the append can have the group committed.
            std::thread::sleep(Duration::from_millis(5));
            let second = append(2);
            tokio::task::yield_now().await;
            std::thread::sleep(Duration::from_millis(200));
            first.await.expect("the task ran")?;
            second.await.expect("the task ran")
        });
    appended.expect("appended");
    assert_eq!(groups, [("journal-writer".to_owned(), 2)]);
}
