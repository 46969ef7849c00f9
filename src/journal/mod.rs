//! The local write-ahead journal: every delta the service acknowledges with `ack=journal`
//! is in here, on stable storage, before the client hears "ok".
//!
//! # Files
//!
//! The journal is a directory of **segments** named `journal-<20-digit number>.log`,
//! numbered upwards, plus a `journal.lock` file that keeps a second [`Journal`] (in this or
//! another process) off the directory. Only the newest segment, the **active** one, is ever
//! appended to. A new segment is started once the active one has reached
//! [`JournalOptions::segment_bytes`]; every [`Journal::open`] also starts a new one, so
//! nothing is ever appended after bytes that a previous run left behind.
//!
//! # Records
//!
//! A segment is a plain concatenation of records, one per [`Journal::append`] (one HTTP
//! request, or one batch request):
//!
//! ```text
//! [len: u32 LE][crc32: u32 LE] [version: u8 = 1][seq: u64 LE][count: u32 LE]
//!                              count × [key_len: u32 LE][key: UTF-8][delta: i64 LE]
//!               \_______________________ len bytes, covered by crc32 _______________/
//! ```
//!
//! Each commit zero-fills the active segment up to 1 MiB ahead of its records and writes
//! each group over those zeros, so that a group's `fdatasync` commits data and not a new file
//! size; the zeros are cut off when the segment is closed. A crash leaves them: replay ends at
//! a record boundary followed by nothing but zeros as at the end of the file. The one zero
//! byte with which the writer thread probes an idle disk ([`JournalOptions::probe_idle`])
//! is written where the next record goes, so it is such a tail too.
//!
//! `seq` is the batch (generation) the aggregator put these deltas into. The exact layout,
//! and the rule that it never changes in place, live in [`record`].
//!
//! # When data is durable (group commit)
//!
//! [`Journal::append`] encodes the record on the caller's thread, straight into a shared
//! buffer (no allocation of its own), notes the journal position where its record ends, and
//! leaves its task's waker beside the record, under the same lock. Whoever **commits** the
//! queued group (one committer at a time, behind a lock that holds the active segment)
//! swaps the buffer for an empty one, writes the whole group with one `write_all`, makes it
//! durable with **one** `fdatasync` (`File::sync_data`), and only then advances the
//! *settled* position and wakes that group's wakers, no others. (A `tokio::sync::Notify`
//! woke every waiter, the next group's too, and its own lock and list cost more per request
//! than the fsync's share.) No message or allocation per record crosses the threads:
//! earlier versions sent each record through a channel with a oneshot back, and glibc's
//! cross-thread frees alone cost more than the fsync's share. While that fsync runs, new
//! appends queue up and form the next group, so under load one fsync serves many requests,
//! and at low load a lone request pays for one fsync and no timer. `Ok(())` from `append`
//! therefore means: this record survives `kill -9` and power loss (as far as the disk
//! honours fsync). A new segment file is created, and the directory fsynced, before any
//! record in it is acknowledged. [`JournalOptions::on_sync`] reports every group for
//! metrics.
//!
//! Who commits: in the service, the serving thread that runs out of work last, just before
//! it parks ([`Journal::follow_workers`]): every request it holds is waiting then, so it has
//! nothing else to do, and committing there spares the thread switches of handing the group
//! to another thread and being woken by it. A dedicated writer thread (a `SCHED_BATCH` one:
//! see `crate::sched`) sleeps on a condition variable and commits the rest: appends from
//! other threads (tests, tools), a group older than the commit delay while the serving
//! threads stay busy, and anything a serving thread left for
//! [`JournalOptions::leader_wait`]. It alone rotates a failed segment, probes an idle disk
//! ([`JournalOptions::probe_idle`]) and closes the journal.
//!
//! If a write or an fsync fails (a full disk, an I/O error), the waiters of that group get the
//! error and the journal turns **failed**: every later append fails with
//! [`JournalError::Failed`]. After a failed fsync the kernel's page cache says nothing
//! trustworthy about that file, so the segment is never appended to again.
//! [`Journal::recover`] (the app calls it periodically while failed) closes that segment and
//! starts a fresh one; appends work again once a new segment can be created, and the next
//! group's write and fsync are the test of the disk (if they fail, the journal is failed
//! again). The failed segment stays, like any closed one, until the store has every batch it
//! may hold; a restart replays whatever of it did reach the disk.
//!
//! # Trimming
//!
//! The journal tracks the highest `seq` in each segment. Once the store has applied every
//! batch up to `applied_seq`, [`Journal::trim`] deletes each *closed* segment whose highest
//! seq is `<= applied_seq` (the active segment is never deleted while the writer runs);
//! [`Journal::trim_later`] has the writer thread do it, so that the caller (the flusher)
//! never waits on a stalled disk.
//! [`Journal::close`] stops the writer after it has written everything queued and, if every
//! record in every segment has `seq <= applied_seq`, deletes all segments, so a clean
//! restart starts with an empty journal. Deletions are followed by a directory fsync.
//! Segments replayed on open are closed segments too: the first `trim` after the store has
//! caught up removes them.
//!
//! # Recovery
//!
//! [`Journal::open`] reads every segment in order, one at a time, and returns what the
//! records hold in a [`Replay`]: each batch seq's deltas summed per key as they are read, so
//! that memory grows with the keys, not with the requests (a journal that grew through a
//! long database outage repeats the same keys millions of times). The caller re-applies the
//! batches with `seq` above the store's last applied seq (replay is read-only from the
//! caller's view: opening twice gives the same batches). [`Journal::open_with`] hands over
//! each record instead.
//! What a crash or a bad disk can leave behind is handled like this:
//!
//! - **Torn or corrupt tail of the last segment** (a write cut short by `kill -9` or power
//!   loss, or garbage after it): everything from the first bad record on is logged with
//!   `warn!` and *truncated off* the file (`set_len` + fsync). Those bytes were never
//!   acknowledged (the fsync that would have acknowledged them did not finish), and cutting
//!   them means no later record can ever sit behind garbage. (If the damage is instead bit
//!   rot in the middle of the last segment, acknowledged records after it go too; the
//!   `warn!` says how many bytes.)
//! - **Corrupt record inside an older segment**: a crash does not leave one there (older
//!   segments were complete and fsynced before the next one was started), except the torn
//!   tail of a segment a failed write or fsync left behind ([`Journal::recover`] starts a
//!   new one after it; nothing in that tail was acknowledged). Anything else is bit rot or
//!   tampering. The rest of that segment is skipped and logged with `error!`, and replay
//!   goes on with the next segment. The file itself is not repaired; like any closed
//!   segment it is deleted once the store has every batch of its readable part, which can be
//!   at the first trim after start-up: copy it away first to inspect it.
//! - Empty segment files are deleted; an empty or missing directory is an empty journal.
//!
//! [`Replay::cut_bytes`] counts every byte dropped either way. Decoding validates every
//! length, the checksum, the version and UTF-8, and caps a record at
//! [`record::MAX_RECORD_LEN`], so no input can make it panic or allocate gigabytes.
//!
//! # Why hand-written
//!
//! No well-kept crate offers this small combination: a group-committed append that is
//! acknowledged asynchronously, records tagged with the caller's batch seq, trimming by that
//! seq, and torn-tail truncation on open. `okaywal` and `sled`-style storage bring their own
//! checkpoint or database model (and `sled`'s log is not a standalone API); the small
//! standalone WAL crates either leave fsync batching and async acknowledgement to the
//! caller or are young single-author projects. A few hundred lines that can be audited in
//! one sitting are the smaller risk. The record framing follows vector's `disk_v2` buffer (a
//! length- and checksum-framed record log). Its recovery differs: vector skips the rest of a
//! data file after a bad record and goes on with the next file; tally does that for older
//! segments only, and truncates the last one at its first bad record, because a crash can
//! only tear the tail of the segment being appended to.

pub mod record;
mod replay;
mod writer;

#[cfg(test)]
mod tests;

pub use record::{Corruption, Entry};
pub(crate) use writer::{no_follow, sync_parent};

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use std::task::{Context, Poll, Waker};

use tokio::sync::oneshot;

use crate::idle::IdleWorkers;
use crate::relay::Ticket;
use replay::Repair;

/// Fewest records in the previous group for [`JournalOptions::commit_delay`] to apply (as
/// PostgreSQL's `commit_siblings`): below it, appends are too few for a wait to gather more.
pub const COMMIT_SIBLINGS: usize = 5;

/// Default [`JournalOptions::segment_bytes`]: 64 MiB.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;

/// Smallest [`JournalOptions::segment_bytes`] the service allows: what a commit zero-fills
/// ahead of its records, so that a segment holds many groups and a new file (created,
/// directory fsynced) stays rare. (Tests go below it.)
pub const MIN_SEGMENT_BYTES: u64 = writer::PREALLOCATE_BYTES;

/// Tunables for [`Journal::open`].
#[derive(Clone)]
pub struct JournalOptions {
    /// A new segment is started before a group is written once the active segment holds
    /// at least this many bytes (a segment may exceed it by one group).
    pub segment_bytes: u64,
    /// Called by whoever committed a group (the writer thread, or a serving thread: see
    /// [`Journal::follow_workers`]) after it is durable and before its waiters are woken.
    /// Keep it cheap (bump counters, record a histogram).
    pub on_sync: Option<Arc<dyn Fn(GroupStats) + Send + Sync>>,
    /// Wait before a group is gathered, like PostgreSQL's `commit_delay`: when the previous
    /// group held at least [`COMMIT_SIBLINGS`] records (so many appends are arriving
    /// concurrently), the writer waits this long for more of them to queue, trading that
    /// much latency for fewer, larger fsyncs. Each fsync costs ~50 µs of kernel CPU whatever
    /// its size, so under load this is CPU given back to serving. Zero (this struct's
    /// default; the service's is 10 ms) never waits; a lone append, or a few concurrent
    /// ones, never wait. With [`Journal::follow_workers`], serving threads' appends form
    /// groups as those threads run dry instead, and this is how long such a group waits for
    /// the last of them before any thread that parks, or the next append, has it committed.
    pub commit_delay: Duration,
    /// With [`Journal::follow_workers`]: how long the writer thread leaves records appended
    /// by serving threads to those threads before it commits them itself: the bound on
    /// their wait (within two of these) when no serving thread parks and none appends (all
    /// busy with requests that append nothing). The writer wakes this often while such
    /// records are queued. Default 20 ms.
    pub leader_wait: Duration,
    /// A write and fsync (a group's, or a probe's) still running after this long means a
    /// stalled disk ([`Journal::stalled`]): the service then fails `/readyz` and logs it.
    /// Default 5 s.
    pub stalled_after: Duration,
    /// Whether the writer thread probes an idle disk: once nothing has been written for
    /// `stalled_after` (if that is not zero), it writes and fsyncs one zero byte where the
    /// next record goes, so that a disk that stopped answering while idle shows as stalled
    /// before an append waits on it, and one that fails turns the journal failed. For a
    /// journal that acknowledges requests; default off.
    pub probe_idle: bool,
}

impl Default for JournalOptions {
    fn default() -> Self {
        Self {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            on_sync: None,
            commit_delay: Duration::ZERO,
            leader_wait: Duration::from_millis(20),
            stalled_after: Duration::from_secs(5),
            probe_idle: false,
        }
    }
}

impl fmt::Debug for JournalOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JournalOptions")
            .field("segment_bytes", &self.segment_bytes)
            .field("on_sync", &self.on_sync.is_some())
            .field("commit_delay", &self.commit_delay)
            .field("leader_wait", &self.leader_wait)
            .field("stalled_after", &self.stalled_after)
            .field("probe_idle", &self.probe_idle)
            .finish()
    }
}

/// What one group commit did: `records` appends made durable by one fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupStats {
    /// Records (append calls) in the group.
    pub records: usize,
    /// Bytes written for the group.
    pub bytes: usize,
    /// How long the `sync_data` call took.
    pub fsync: Duration,
    /// How long the group gathered, from its first record until a committer took it: the
    /// wait for the serving threads to run dry or for the commit delay
    /// ([`JournalOptions::commit_delay`]), or, under load, the previous group's commit.
    pub waited: Duration,
}

/// One record read back on [`Journal::open_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayedRecord {
    /// The batch seq the record was appended with.
    pub seq: u64,
    /// The `(key, delta)` entries, in append order; never empty.
    pub entries: Vec<(String, i64)>,
}

/// Everything [`Journal::open`] recovered: each batch's acknowledged deltas, summed per key
/// as the records are read.
///
/// Summed, not kept record by record: replay then holds one entry per key and batch, where
/// the journal holds one per request. A journal that grew through a long database outage
/// (the flusher retrying one batch while the next fills up) is mostly the same keys again
/// and again, millions of records that a list would have held in memory all at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replay {
    /// The batches by seq.
    pub batches: BTreeMap<u64, ReplayedBatch>,
    /// Highest seq among the batches (as read, or as rebased by recovery); 0 if there are
    /// none.
    pub max_seq: u64,
    /// Bytes of torn or corrupt data dropped (truncated off or skipped).
    pub cut_bytes: u64,
}

/// The records of one batch seq, summed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayedBatch {
    /// How many records (acknowledged appends) it holds.
    pub records: usize,
    /// Each key's deltas, summed in 128 bits: the journal's order need not be the order the
    /// deltas were added in, so a running 64-bit sum could overflow where the batch's does
    /// not.
    pub sums: HashMap<String, i128>,
}

impl Replay {
    /// Adds `record` to its batch.
    pub fn add(&mut self, record: ReplayedRecord) {
        self.max_seq = self.max_seq.max(record.seq);
        self.batches
            .entry(record.seq)
            .or_default()
            .add(record.entries);
    }

    /// How many records it holds.
    pub fn records(&self) -> usize {
        self.batches.values().map(|b| b.records).sum()
    }

    /// True if it holds no record.
    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }
}

impl ReplayedBatch {
    /// Adds one record's entries.
    fn add(&mut self, entries: Vec<(String, i64)>) {
        self.records += 1;
        for (key, delta) in entries {
            *self.sums.entry(key).or_default() += i128::from(delta);
        }
    }

    /// Adds every record of `other`.
    pub(crate) fn merge(&mut self, other: ReplayedBatch) {
        self.records += other.records;
        for (key, sum) in other.sums {
            *self.sums.entry(key).or_default() += sum;
        }
    }
}

/// Everything that can go wrong in the journal.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JournalError {
    /// A file-system operation failed; `op` says what was being done to `path`.
    #[error("journal: cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: Arc<io::Error>,
    },
    /// The journal was closed with [`Journal::close`] (or its writer thread is gone).
    #[error("journal is closed")]
    Closed,
    /// An earlier write or fsync failed (the wrapped error); the journal accepts no appends
    /// until [`Journal::recover`] has started a fresh segment.
    #[error("journal is failed after an earlier error: {0}")]
    Failed(Box<JournalError>),
    /// The encoded record would exceed [`record::MAX_RECORD_LEN`].
    #[error("journal record of {len} bytes exceeds the limit of {max} bytes")]
    RecordTooLarge { len: usize, max: usize },
    /// [`Journal::append`] was called with no entries.
    #[error("journal record has no entries")]
    EmptyRecord,
    /// A segment's name is a symbolic link: tally never follows links in its data
    /// directory (reading or cutting it would touch a file it did not create).
    #[error(
        "journal: {} is a symbolic link; tally never follows links in its data directory \
         (move the real file there, or remove the link)",
        path.display()
    )]
    Symlink { path: PathBuf },
    /// Another [`Journal`] holds the directory's lock file.
    #[error("journal directory {} is in use by another journal", path.display())]
    Locked { path: PathBuf },
}

/// Builds a [`JournalError::Io`] for `op` on `path` (for `map_err`).
fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> JournalError {
    let path = path.to_path_buf();
    move |source| JournalError::Io {
        op,
        path,
        source: Arc::new(source),
    }
}

/// The write-ahead journal. `Send + Sync`; share it in an `Arc`. Dropping it without
/// [`Journal::close`] keeps every segment for replay.
pub struct Journal {
    shared: Arc<Shared>,
    /// Joined on drop.
    writer: Option<std::thread::JoinHandle<()>>,
    /// Holds the advisory lock on `journal.lock` for as long as the journal lives.
    _lock: File,
}

/// A write and fsync in progress ([`Shared::busy`]). Ends when dropped, however they end (a
/// panic in them, on the writer thread or caught on a serving thread by [`Shared::lead`],
/// must not leave a stall reported forever): counts it in `stalls` if it ran at least
/// `stalled_after`, clears [`Shared::busy_since`] and stamps `last_write_ended`.
struct Busy<'a>(&'a Shared);

impl Busy<'_> {
    /// How long the write and fsync have been running.
    fn running(&self) -> Duration {
        self.0.busy_for().unwrap_or_default()
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if self.running() >= self.0.stalled_after {
            self.0.stalls.fetch_add(1, Ordering::Relaxed);
        }
        self.0.busy_since.store(0, Ordering::Release);
        self.0
            .last_write_ended
            .store(self.0.stamp(), Ordering::Relaxed);
    }
}

/// State shared by the API, the writer thread and the serving threads that commit.
struct Shared {
    dir: PathBuf,
    segment_bytes: u64,
    on_sync: Option<Arc<dyn Fn(GroupStats) + Send + Sync>>,
    commit_delay: Duration,
    leader_wait: Duration,
    stalled_after: Duration,
    /// The writer thread probes a disk idle for `stalled_after` ([`JournalOptions::probe_idle`]).
    probe_idle: bool,
    /// When the journal opened: the origin of `pending_since`, `busy_since` and
    /// `last_write_ended`.
    opened: Instant,
    /// When the first record of the group being gathered was queued ([`Shared::stamp`]);
    /// 0 while none is queued. Written under the `queue` lock, read without it by
    /// [`Shared::overdue`].
    pending_since: AtomicU64,
    /// When the committer began the write and fsync of the group it commits, or of a probe
    /// ([`Shared::stamp`]); 0 while it does neither. Read by [`Journal::stalled`], which
    /// must answer while that write or fsync hangs, so it takes no lock.
    busy_since: AtomicU64,
    /// When the last write and fsync ended, however it ended ([`Shared::stamp`]; 0: none
    /// yet). The writer thread probes a disk idle for `stalled_after` (see
    /// `writer::Writer::probe_idle_disk`).
    last_write_ended: AtomicU64,
    /// Writes and fsyncs (groups, and probes of an idle or a failed disk) that ran at least
    /// `stalled_after`, counted as each ends ([`Busy`]): [`Journal::stalls`].
    stalls: AtomicU64,
    /// Attempts to delete trimmed segments that failed ([`Journal::trim_failures`]), and
    /// whether the last one did (so a run of failures logs one warning).
    trim_failures: AtomicU64,
    trim_failing: AtomicBool,
    /// The write/fsync error that failed the journal, until [`Journal::recover`] clears it.
    failed: Mutex<Option<JournalError>>,
    /// `failed.is_some()`, readable without the lock on every append.
    is_failed: AtomicBool,
    segments: Mutex<Segments>,
    /// Records waiting for the writer, and requests for it.
    queue: Mutex<Queue>,
    /// Wakes the writer thread while it sleeps (see [`Queue::writer_sleep`]).
    wake_writer: Condvar,
    /// Every journal position below this has been through a group commit: durable, unless
    /// it lies in one of `failures`. Positions count the bytes appended since open.
    settled: AtomicU64,
    /// Positions `start..end` of the groups whose write or fsync failed (or that came while
    /// the journal was failed), in position order: a handful per disk failure, so never
    /// pruned.
    failures: Mutex<Vec<(std::ops::Range<u64>, JournalError)>>,
    /// The end of the last range in `failures` (0: none). A record ending above it is in
    /// none of them: the common path checks this and skips the lock, also once the disk
    /// has failed and recovered.
    failures_end: AtomicU64,
    /// The writer waits out its commit delay; [`Shared::hurry`] ends the wait.
    delaying: AtomicBool,
    /// The runtime whose workers append, once [`Journal::follow_workers`] names it.
    workers: OnceLock<Arc<IdleWorkers>>,
    /// The writer thread has ended; nothing more will be settled, and nobody answers a
    /// request queued now. Set while holding the `queue` lock, so a caller holding it can
    /// trust the value.
    writer_gone: AtomicBool,
    /// The active segment and the buffers of a group commit, for whoever commits the next
    /// group: the writer thread or a serving thread ([`Shared::lead`]). Taken before
    /// `queue` by everyone who takes both. `None` once the writer thread has ended.
    committer: Mutex<Option<writer::Committer>>,
    /// A serving thread ran dry last while another commit held `committer`: whoever
    /// releases it looks at the queue again ([`Shared::lead_if_wanted`]).
    lead_wanted: AtomicBool,
}

/// What appends hand to whoever commits next. Every record is encoded straight into `buf`,
/// so an append allocates nothing and wakes the writer thread only if it has to.
#[derive(Default)]
struct Queue {
    /// Encoded records no committer has taken yet.
    buf: Vec<u8>,
    /// How many records `buf` holds, and the highest seq among them.
    records: usize,
    max_seq: u64,
    /// The journal position after the last byte in `buf`.
    end: u64,
    /// Number of the group `buf` is gathering; the committer counts it up as it takes `buf`.
    generation: u64,
    /// The wakers of the tasks whose records are in `buf`.
    wakers: Vec<Waker>,
    /// The wakers of the group being committed (`generation - 1`): taken with `buf`, woken
    /// once it is settled. A waiter of that group polled again meanwhile adds itself here.
    committing: Vec<Waker>,
    /// Set by close or drop: appends are refused, and the writer exits once it has written
    /// what `buf` holds.
    closing: bool,
    close_acks: Vec<oneshot::Sender<()>>,
    recover: Vec<oneshot::Sender<Result<(), JournalError>>>,
    /// Closed segments whose every record the store has (see [`Journal::trim_later`]): the
    /// writer thread deletes them.
    doomed: Vec<(u64, Closed)>,
    /// Whether the writer sleeps on `wake_writer`, and so who has to notify it.
    writer_sleep: writer::Sleep,
    /// `buf` holds a record that no serving thread will commit (it was appended elsewhere):
    /// the writer thread commits it.
    needs_writer: bool,
    /// Records in the last group taken (for the commit delay's `COMMIT_SIBLINGS`).
    last_group: usize,
}

/// Where an append's record and waker are, once queued.
struct Queued {
    /// The journal position after the record.
    end: u64,
    /// The group it was queued in.
    generation: u64,
    /// Its waker's entry with this thread's relay, if it left it with one.
    ticket: Option<Ticket>,
}

/// Which segments exist, the highest seq in each and their sizes.
struct Segments {
    closed: BTreeMap<u64, Closed>,
    /// Bytes of the segments taken off `closed` to be deleted, until they are.
    deleting: u64,
    active: u64,
    active_max_seq: u64,
    /// Bytes of the active segment's file: its records and the zeros written ahead of them.
    active_bytes: u64,
}

impl Segments {
    /// Takes the closed segments `doomed` picks off the list, to be deleted; their bytes
    /// count as `deleting` until they are.
    fn take_closed(&mut self, mut doomed: impl FnMut(&Closed) -> bool) -> Vec<(u64, Closed)> {
        let taken: Vec<_> = (self.closed)
            .extract_if(.., |_, closed| doomed(closed))
            .collect();
        self.deleting += total_bytes(&taken);
        taken
    }

    /// Takes every segment, the active one too, to be deleted (the journal is closed).
    fn take_all(&mut self) -> Vec<(u64, Closed)> {
        let active = Closed {
            max_seq: self.active_max_seq,
            bytes: std::mem::take(&mut self.active_bytes),
        };
        // The active segment is closed now. Only once: a close whose deletion failed put
        // it back on the closed list with its size (and left `active_bytes` at 0).
        self.closed.entry(self.active).or_insert(active);
        self.take_closed(|_| true)
    }

    /// Puts segments taken to be deleted back on the closed list (they were not deleted).
    fn put_back(&mut self, doomed: Vec<(u64, Closed)>) {
        self.deleting -= total_bytes(&doomed);
        self.closed.extend(doomed);
    }
}

/// The numbers of segments taken off the list (for the log).
fn numbers(segments: &[(u64, Closed)]) -> Vec<u64> {
    segments.iter().map(|&(n, _)| n).collect()
}

/// The bytes of segments taken off the list.
fn total_bytes(segments: &[(u64, Closed)]) -> u64 {
    segments.iter().map(|(_, c)| c.bytes).sum()
}

/// A closed segment, as trimming and [`Journal::disk_bytes`] need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Closed {
    /// The highest seq in it (0 if it has no readable record).
    pub(super) max_seq: u64,
    /// The file's size.
    pub(super) bytes: u64,
}

/// Requests wait through a relay for the settled position (see `crate::relay`); the end of
/// their record is their key.
impl crate::relay::Progress for Shared {
    fn reached(&self) -> u64 {
        self.settled.load(Ordering::Acquire)
    }

    fn ended(&self) -> bool {
        self.writer_gone.load(Ordering::Acquire)
    }
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        // Every update of the queue is complete before anything that can panic.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues one record and the waker of the task that waits for it; returns where the
    /// record and its waker are ([`Queued`]).
    fn enqueue<E: Entry>(
        &self,
        seq: u64,
        entries: &[E],
        waker: &Waker,
    ) -> Result<Queued, JournalError> {
        let mut queue = self.queue();
        // Nobody would write what is queued after the writer ended (a panic).
        if queue.closing || self.writer_gone.load(Ordering::Acquire) {
            return Err(JournalError::Closed);
        }
        let len = record::encode_into(&mut queue.buf, seq, entries)?;
        if queue.records == 0 {
            self.pending_since.store(self.stamp(), Ordering::Release);
        }
        queue.records += 1;
        queue.max_seq = queue.max_seq.max(seq);
        queue.end += len as u64;
        let end = queue.end;
        let ticket = self.leave_waker(&mut queue.wakers, end, waker);
        let queued = Queued {
            end,
            generation: queue.generation,
            ticket,
        };
        // A request waiting through a serving thread's relay is committed by the serving
        // thread that runs dry last (`lead`); the writer needs waking only if it is idle,
        // to keep a watch on the records (its nap). Any other append needs the writer, and
        // so does one that finds its group overdue: the serving threads stay busy.
        let led = queued.ticket.is_some() && self.workers.get().is_some() && !self.overdue();
        if led && queue.writer_sleep == writer::Sleep::Napping {
            return Ok(queued);
        }
        queue.needs_writer |= !led;
        self.wake_writer(queue);
        Ok(queued)
    }

    /// Leaves `waker`, whose task waits for the record ending at `end`, in its group's
    /// `wakers`: on a thread with a relay, with the relay (returning the ticket), and the
    /// relay's waker in `wakers` once per group per thread; elsewhere the waker itself.
    fn leave_waker(&self, wakers: &mut Vec<Waker>, end: u64, waker: &Waker) -> Option<Ticket> {
        let (ticket, waker) = match crate::relay::leave(self, end, waker) {
            Some((ticket, relay)) => (Some(ticket), Cow::Owned(relay)),
            None => (None, Cow::Borrowed(waker)),
        };
        if !wakers.iter().any(|w| w.will_wake(&waker)) {
            wakers.push(waker.into_owned());
        }
        ticket
    }

    /// Releases `queue`, waking the writer if it sleeps.
    fn wake_writer(&self, mut queue: MutexGuard<'_, Queue>) {
        let sleeps = std::mem::take(&mut queue.writer_sleep) != writer::Sleep::Awake;
        drop(queue);
        if sleeps {
            self.wake_writer.notify_one();
        }
    }

    /// The committer's lock; `None` inside once the writer thread has ended, or once a
    /// holder panicked part-way through a group: then nobody commits again (its buffers and
    /// wakers cannot be trusted), the writer thread ends, and every waiter hears `Closed`,
    /// as when the writer thread itself dies.
    fn committer(&self) -> MutexGuard<'_, Option<writer::Committer>> {
        self.committer.lock().unwrap_or_else(|poisoned| {
            let mut committer = poisoned.into_inner();
            *committer = None;
            committer
        })
    }

    /// Now, as kept in `pending_since` and `busy_since`: nanoseconds after `opened`, plus
    /// one, so that 0 can mean "none".
    fn stamp(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }

    /// How long ago `stamp` (a [`Shared::stamp`]) was taken; `None` for 0.
    fn since(&self, stamp: u64) -> Option<Duration> {
        (stamp != 0).then(|| Duration::from_nanos(self.stamp().saturating_sub(stamp)))
    }

    /// How long the first record of the group being gathered has been queued (zero if none).
    fn pending_for(&self) -> Duration {
        self.since(self.pending_since.load(Ordering::Acquire))
            .unwrap_or_default()
    }

    /// How long the write and fsync in progress (a group's, or a probe's) have been running,
    /// if one is.
    fn busy_for(&self) -> Option<Duration> {
        self.since(self.busy_since.load(Ordering::Acquire))
    }

    /// How long until the writer thread probes the idle disk (zero: now): once nothing has
    /// been written for `stalled_after` (since the journal opened, if nothing yet). `None`
    /// without probes, and while the journal is failed (recovery probes it then).
    fn probe_in(&self) -> Option<Duration> {
        if !self.probe_idle || self.is_failed.load(Ordering::Acquire) {
            return None;
        }
        let idle_for = self
            .since(self.last_write_ended.load(Ordering::Relaxed))
            .unwrap_or_else(|| self.opened.elapsed());
        Some(self.stalled_after.saturating_sub(idle_for))
    }

    /// Marks a write and fsync (a group's, or a probe's) as begun, until the returned guard
    /// drops.
    fn busy(&self) -> Busy<'_> {
        self.busy_since.store(self.stamp(), Ordering::Release);
        Busy(self)
    }

    /// Whether the group being gathered has waited out the commit delay.
    fn overdue(&self) -> bool {
        self.since(self.pending_since.load(Ordering::Acquire))
            .is_some_and(|pending| pending >= self.commit_delay)
    }

    /// A serving thread is about to park, the last busy one if `last`
    /// ([`Journal::follow_workers`]).
    fn ran_dry(&self, last: bool) {
        if self.delaying.load(Ordering::SeqCst) {
            // The writer gathers a group for appends that need it, until the last parks.
            if last {
                self.hurry();
            }
        } else if last || self.overdue() {
            self.lead();
        }
    }

    /// Commits what is queued on this thread, a serving thread about to park, instead of
    /// waking the writer thread to do it and being woken by it again. Its own requests, all
    /// waiting, are woken locally when it is done (and the thread does not park); the
    /// other threads' through their relays. Only while every serving thread is parked (one
    /// that woke up will run dry again and commit then, a larger group) or the group is
    /// overdue. If another commit holds the committer, it leaves a note (`lead_wanted`)
    /// that the holder reads once it lets go ([`Shared::lead_if_wanted`]).
    fn lead(&self) {
        loop {
            self.lead_wanted.store(true, Ordering::SeqCst);
            // Pairs with the fence after every release below and in `lead_if_wanted`:
            // either this thread gets the lock, or its holder, having let it go, sees the
            // note.
            fence(Ordering::SeqCst);
            let mut guard = match self.committer.try_lock() {
                Ok(guard) => guard,
                Err(TryLockError::WouldBlock) => return,
                Err(TryLockError::Poisoned(_)) => {
                    drop(self.committer());
                    return self.writer_must_end();
                }
            };
            self.lead_wanted.store(false, Ordering::SeqCst);
            let panicked = guard.as_mut().is_some_and(|committer| {
                let queue = self.queue();
                let due = self.workers_idle() || self.overdue();
                // Caught here, on a serving thread: a panic would unwind out of Tokio's park
                // hook and take the thread with it, leaving the group's waiters to nobody.
                queue.records > 0
                    && !queue.closing
                    && due
                    && std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        committer.commit_queued(self, queue);
                    }))
                    .is_err()
            });
            if panicked {
                // Fail-stop, as when the writer thread dies.
                *guard = None;
                drop(guard);
                return self.writer_must_end();
            }
            drop(guard);
            fence(Ordering::SeqCst);
            if !self.lead_wanted.load(Ordering::SeqCst) {
                return;
            }
        }
    }

    /// Wakes the writer thread once the committer is gone: it finds it so, ends, and
    /// answers every waiter (`Closed`).
    fn writer_must_end(&self) {
        let mut queue = self.queue();
        queue.needs_writer = true;
        self.wake_writer(queue);
    }

    /// After releasing the committer: commits for a serving thread that parked meanwhile
    /// and left a note ([`Shared::lead`]). Without it, its records would wait for the
    /// writer's nap.
    fn lead_if_wanted(&self) {
        fence(Ordering::SeqCst);
        if self.lead_wanted.load(Ordering::SeqCst) {
            self.lead();
        }
    }

    /// Ends the writer's commit delay now, if it is in one.
    fn hurry(&self) {
        if self.delaying.swap(false, Ordering::SeqCst) {
            // Taken once the writer waits (it holds the lock from its check of `delaying`
            // until the wait begins), so the notification cannot be missed.
            drop(self.queue());
            self.wake_writer.notify_one();
        }
    }

    /// Whether every worker of the runtime that appends is parked (false if none is known).
    fn workers_idle(&self) -> bool {
        self.workers.get().is_some_and(|w| w.is_idle())
    }

    /// Publishes the outcome of `group` (called by the committer, in position order) and wakes
    /// its waiters.
    fn settle(&self, group: &writer::Group, result: Result<(), JournalError>) {
        if let Err(err) = result {
            self.failures
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((group.start..group.end, err));
            // Groups settle in position order; `fetch_max` keeps the fast path in
            // `outcome` right even if that ever changed.
            self.failures_end.fetch_max(group.end, Ordering::Release);
        }
        self.settled.store(group.end, Ordering::Release);
    }

    /// Whether the record ending at position `end`, queued in group `generation`, has been
    /// through a group commit (and if so, whether it is durable). Called when its task is
    /// polled again; until then its waker waits beside its record (see [`Journal::append`]).
    /// A poll before the commit (a spurious one) keeps its waker current: in its entry with
    /// this thread's relay, or as a fresh one where the writer will find it.
    fn poll_settled(
        &self,
        queued: &mut Queued,
        cx: &Context<'_>,
    ) -> Poll<Result<(), JournalError>> {
        let end = queued.end;
        if self.settled.load(Ordering::Acquire) >= end {
            return Poll::Ready(self.outcome(end));
        }
        let mut queue = self.queue();
        // Under the lock the committer stores `settled` before it takes `committing`: either
        // it is settled now, or the waker left below is woken.
        if self.settled.load(Ordering::Acquire) >= end {
            return Poll::Ready(self.outcome(end));
        }
        if self.writer_gone.load(Ordering::Acquire) {
            return Poll::Ready(Err(JournalError::Closed));
        }
        // With the relay that holds it, its entry is kept current; the relay's waker stays in
        // the group's list until the group is settled.
        if let Some(ticket) = queued.ticket
            && crate::relay::renew(self, ticket, cx.waker())
        {
            return Poll::Pending;
        }
        let wakers = if queue.generation == queued.generation {
            &mut queue.wakers
        } else {
            &mut queue.committing
        };
        queued.ticket = self.leave_waker(wakers, end, cx.waker());
        Poll::Pending
    }

    fn outcome(&self, end: u64) -> Result<(), JournalError> {
        // Stored before `settled` passed `end`, which the caller has seen.
        if end > self.failures_end.load(Ordering::Acquire) {
            return Ok(());
        }
        let failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        match failures
            .iter()
            .find(|(range, _)| range.start < end && end <= range.end)
        {
            Some((_, err)) => Err(err.clone()),
            None => Ok(()),
        }
    }

    fn segments(&self) -> MutexGuard<'_, Segments> {
        // The map stays consistent even if a holder panicked: every update is one assignment.
        self.segments.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check_failed(&self) -> Result<(), JournalError> {
        if !self.is_failed.load(Ordering::Acquire) {
            return Ok(());
        }
        match self.failure() {
            Some(err) => Err(JournalError::Failed(Box::new(err))),
            None => Ok(()),
        }
    }

    fn failure(&self) -> Option<JournalError> {
        self.failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records `err` as the journal's failure (or clears it); true if that changed the state.
    fn set_failed(&self, err: Option<JournalError>) -> bool {
        let mut failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
        let changed = failed.is_some() != err.is_some();
        self.is_failed.store(err.is_some(), Ordering::Release);
        *failed = err;
        changed
    }

    /// Takes the closed segments whose highest seq is `<= applied_seq` off the list, for
    /// the caller to delete with [`Shared::remove_segments`].
    fn applied_segments(&self, applied_seq: u64) -> Vec<(u64, Closed)> {
        self.segments()
            .take_closed(|closed| closed.max_seq <= applied_seq)
    }

    /// Deletes segments taken off the list (already gone is fine), then fsyncs the
    /// directory. A segment that cannot be deleted goes back on the list: it still takes
    /// disk ([`Journal::disk_bytes`]), and the next trim tries it again. Counts each failed
    /// call ([`Journal::trim_failures`]) and logs a warning on the first of a run of calls
    /// that leave segments behind only, so a deletion that fails after every batch does not
    /// flood the log; the end of the run is logged too.
    fn remove_segments(&self, doomed: Vec<(u64, Closed)>) -> Result<(), JournalError> {
        if doomed.is_empty() {
            return Ok(());
        }
        let (mut removed, mut left, mut error) = (Vec::new(), Vec::new(), None);
        for segment in doomed {
            match writer::remove(&self.dir, segment.0) {
                Ok(()) => removed.push(segment),
                Err(e) => {
                    error.get_or_insert(e);
                    left.push(segment);
                }
            }
        }
        let synced = if removed.is_empty() {
            Ok(())
        } else {
            writer::sync_dir(&self.dir)
        };
        let (deleted, kept) = (numbers(&removed), numbers(&left));
        {
            let mut segments = self.segments();
            segments.deleting -= total_bytes(&removed);
            segments.put_back(left);
        }
        if error.is_some() || synced.is_err() {
            self.trim_failures.fetch_add(1, Ordering::Relaxed);
        }
        let was_failing = self.trim_failing.swap(!kept.is_empty(), Ordering::Relaxed);
        if let Err(e) = &synced {
            // The files are gone; a crash may bring some back, to be replayed (their
            // records skipped by seq) and deleted again.
            tracing::warn!(error = %e, ?deleted, "Deleted journal segments, but could not fsync their directory.");
        }
        match &error {
            Some(e) if was_failing => {
                tracing::debug!(error = %e, ?deleted, ?kept, "Still cannot delete journal segments.");
            }
            Some(e) => tracing::warn!(
                error = %e,
                ?deleted,
                ?kept,
                "Cannot delete journal segments the store has every record of; they stay on \
                 disk (tally_journal_bytes) and are tried again after the next batch or flush tick. Until \
                 then the journal's disk use grows."
            ),
            None if was_failing => tracing::info!(
                ?deleted,
                "Deleted the journal segments that could not be deleted before."
            ),
            None => tracing::debug!(segments = ?deleted, "Trimmed the journal."),
        }
        error.map_or(synced, Err)
    }
}

impl fmt::Debug for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Journal")
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

impl Journal {
    /// Opens (creating if needed) the journal in `dir`, replays every segment, cuts a torn
    /// tail off the last one, starts a fresh active segment and the writer thread.
    ///
    /// # Errors
    ///
    /// [`JournalError::Locked`] if another journal has `dir` open, and
    /// [`JournalError::Io`] if the directory or a segment cannot be created, read,
    /// truncated or synced, or the writer thread cannot be spawned. Corrupt data is not an
    /// error: it is logged, dropped, and counted in [`Replay::cut_bytes`].
    pub fn open(dir: &Path, opts: JournalOptions) -> Result<(Journal, Replay), JournalError> {
        let mut replay = Replay::default();
        let (journal, cut_bytes) = Self::open_with(dir, opts, &mut |record| replay.add(record))?;
        replay.cut_bytes = cut_bytes;
        Ok((journal, replay))
    }

    /// Reads the journal in `dir` without changing anything (no lock, no repair, no new
    /// segment; it may be open in a running tally, and a segment its trim deletes meanwhile
    /// is skipped), handing each record to `on_record` as [`Journal::open_with`] does.
    /// Returns the bytes of torn or corrupt data skipped.
    ///
    /// # Errors
    ///
    /// [`JournalError::Io`] if the directory cannot be listed (it does not exist, say) or a
    /// segment read.
    pub fn read(
        dir: &Path,
        on_record: &mut dyn FnMut(ReplayedRecord),
    ) -> Result<u64, JournalError> {
        let numbers = writer::list(dir)?;
        let (cut_bytes, _) = replay::replay(dir, &numbers, Repair::No, on_record)?;
        Ok(cut_bytes)
    }

    /// [`Journal::open`], handing each record read back to `on_record` as it is read, in
    /// append order (segment by segment, in file order). Returns the journal and the bytes
    /// of torn or corrupt data dropped.
    ///
    /// # Errors
    ///
    /// As [`Journal::open`].
    pub fn open_with(
        dir: &Path,
        opts: JournalOptions,
        on_record: &mut dyn FnMut(ReplayedRecord),
    ) -> Result<(Journal, u64), JournalError> {
        std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        writer::sync_parent(dir)?;
        let lock = lock_dir(dir)?;

        let numbers = writer::list(dir)?;
        let (mut records, mut max_seq) = (0usize, 0);
        let (cut_bytes, closed) = replay::replay(dir, &numbers, Repair::Yes, &mut |record| {
            records += 1;
            max_seq = max_seq.max(record.seq);
            on_record(record);
        })?;
        let active = match numbers.last() {
            None => 1,
            Some(&last) => last.checked_add(1).ok_or_else(|| {
                io_err("number a new segment in", dir)(io::Error::other(
                    "segment numbers exhausted",
                ))
            })?,
        };
        let file = writer::create(dir, active)?;

        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            segment_bytes: opts.segment_bytes,
            on_sync: opts.on_sync,
            commit_delay: opts.commit_delay,
            leader_wait: opts.leader_wait,
            stalled_after: opts.stalled_after,
            probe_idle: opts.probe_idle && !opts.stalled_after.is_zero(),
            opened: Instant::now(),
            pending_since: AtomicU64::new(0),
            busy_since: AtomicU64::new(0),
            last_write_ended: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
            trim_failures: AtomicU64::new(0),
            trim_failing: AtomicBool::new(false),
            failed: Mutex::new(None),
            is_failed: AtomicBool::new(false),
            segments: Mutex::new(Segments {
                closed,
                deleting: 0,
                active,
                active_max_seq: 0,
                active_bytes: 0,
            }),
            queue: Mutex::default(),
            wake_writer: Condvar::new(),
            settled: AtomicU64::new(0),
            failures: Mutex::default(),
            failures_end: AtomicU64::new(0),
            delaying: AtomicBool::new(false),
            workers: OnceLock::new(),
            writer_gone: AtomicBool::new(false),
            committer: Mutex::new(Some(writer::Committer::new(writer::Writer::new(
                file, active,
            )))),
            lead_wanted: AtomicBool::new(false),
        });
        let writing = Arc::clone(&shared);
        let writer = std::thread::Builder::new()
            .name("journal-writer".into())
            .spawn(move || {
                crate::sched::yield_to_requests();
                writer::run(&writing)
            })
            .map_err(io_err("spawn the writer thread for", dir))?;
        tracing::info!(
            dir = %dir.display(),
            records,
            max_seq,
            cut_bytes,
            active_segment = active,
            "Opened the journal."
        );
        let journal = Journal {
            shared,
            writer: Some(writer),
            _lock: lock,
        };
        Ok((journal, cut_bytes))
    }

    /// Appends one record of `entries` tagged with batch `seq`, and resolves once it is
    /// durable (written and fsynced, see the module docs on group commit).
    ///
    /// Dropping the future after it was first polled does not withdraw the record: it is
    /// written anyway, only the acknowledgement is lost. Needs no particular runtime: the
    /// writer is a plain thread and the wake-up the task's own `Waker`. The queue is
    /// unbounded; callers bound it by awaiting their appends.
    ///
    /// # Errors
    ///
    /// [`JournalError::EmptyRecord`] / [`JournalError::RecordTooLarge`] for a record that
    /// cannot be encoded, [`JournalError::Closed`] after [`Journal::close`],
    /// [`JournalError::Io`] if this record's write or fsync failed, and
    /// [`JournalError::Failed`] if an earlier one did. On any error the record must be
    /// treated as not durable.
    pub async fn append<E: Entry + Sync>(
        &self,
        seq: u64,
        entries: &[E],
    ) -> Result<(), JournalError> {
        self.shared.check_failed()?;
        // Queued on the first poll, with that poll's waker, which the committer wakes once the
        // group is settled; so the next poll is the one that finds it settled.
        let mut queued = None;
        std::future::poll_fn(|cx| match &mut queued {
            None => {
                queued = Some(self.shared.enqueue(seq, entries, cx.waker())?);
                Poll::Pending
            }
            Some(queued) => self.shared.poll_settled(queued, cx),
        })
        .await
    }

    /// The relay task of the calling thread (see `crate::relay`): spawned on each thread
    /// that serves requests, it turns the committer's wake-ups of that thread's waiting
    /// requests into one per group. Never ends; drop it (with its runtime) to remove it.
    pub fn relay(&self) -> impl Future<Output = ()> + Send + 'static {
        crate::relay::run(Arc::clone(&self.shared) as _)
    }

    /// Lets the serving threads behind `idle` (the workers of their runtimes) commit the
    /// groups of their own requests: when the last of them runs out of work, the requests
    /// in the process have been served and are waiting, and that thread writes and fsyncs
    /// their group itself before it parks (a heuristic, see [`crate::idle`]), as PostgreSQL
    /// lets a committing backend flush the WAL for its siblings. That spares the writer
    /// thread's wake-up and the serving threads' wake-ups by it: a quarter to a third of
    /// the journal's switches under load (docs/benchmarks.md, 2026-12-06 22:03). A thread
    /// that parks commits a group older than the commit delay too, and so does the writer
    /// after [`JournalOptions::leader_wait`]. Appends through a thread's [`Journal::relay`]
    /// are committed so; other appends still wake the writer, and `idle` ends its commit
    /// delay early. The price: a disk that stalls an fsync holds that serving thread's
    /// other connections as long ([`Journal::stalled`] tells). The first call wins; later
    /// ones are ignored.
    pub fn follow_workers(&self, idle: &Arc<IdleWorkers>) {
        if self.shared.workers.set(Arc::clone(idle)).is_err() {
            return;
        }
        let shared = Arc::downgrade(&self.shared);
        idle.on_park(move |last| {
            if let Some(shared) = shared.upgrade() {
                shared.ran_dry(last);
            }
        });
    }

    /// Whether a write or fsync failed and [`Journal::recover`] has not yet started a fresh
    /// segment. One atomic load.
    pub fn is_failed(&self) -> bool {
        self.shared.is_failed.load(Ordering::Acquire)
    }

    /// How long the write and fsync in progress (a group's, or a probe's) have been
    /// running, once that is at least [`JournalOptions::stalled_after`]: the disk has
    /// stalled (a frozen or disconnected volume, a storage controller retrying). Appends
    /// queue meanwhile and their requests wait; so do the other connections of a serving
    /// thread that commits (see [`Journal::follow_workers`]). Lock-free, so it answers
    /// during the stall.
    pub fn stalled(&self) -> Option<Duration> {
        self.shared
            .busy_for()
            .filter(|running| *running >= self.shared.stalled_after)
    }

    /// How many stalls ([`Journal::stalled`]) have ended since the journal opened, however
    /// they ended: also those too short for anyone to see one in progress.
    pub fn stalls(&self) -> u64 {
        self.shared.stalls.load(Ordering::Relaxed)
    }

    /// How many attempts to delete segments whose every record the store has failed (a
    /// directory made read-only, an immutable file, an I/O error). Such segments stay on
    /// disk, counted in [`Journal::disk_bytes`], and are tried again at the next trim.
    pub fn trim_failures(&self) -> u64 {
        self.shared.trim_failures.load(Ordering::Relaxed)
    }

    /// Whether the last attempt to delete segments left some behind: true from a failed
    /// deletion until a later attempt deletes them (after a batch, or at a flush tick with
    /// nothing to flush).
    pub fn trim_failing(&self) -> bool {
        self.shared.trim_failing.load(Ordering::Relaxed)
    }

    /// Bytes the journal's segment files take: every segment not yet deleted (those handed
    /// to the writer thread to delete included) and the active one with the zeros written
    /// ahead of its records. Kept in memory as segments are written, rotated, replayed and
    /// deleted, so it answers without touching the disk, also while the disk stalls. A
    /// segment whose deletion failed still counts: it stays on the list, to be tried again
    /// ([`Journal::trim_failures`]).
    pub fn disk_bytes(&self) -> u64 {
        let segs = self.shared.segments();
        segs.closed.values().map(|c| c.bytes).sum::<u64>() + segs.deleting + segs.active_bytes
    }

    /// The error that failed the journal, while it is failed.
    pub fn failure(&self) -> Option<JournalError> {
        self.shared.failure()
    }

    /// After a failed write or fsync: closes the segment it happened in and starts a fresh
    /// one, so appends are accepted again. Does nothing if the journal is not failed.
    ///
    /// # Errors
    ///
    /// [`JournalError::Io`] if the new segment cannot be created (the journal stays failed),
    /// [`JournalError::Closed`] after [`Journal::close`].
    pub async fn recover(&self) -> Result<(), JournalError> {
        if !self.is_failed() {
            return Ok(());
        }
        let (done, recovered) = oneshot::channel();
        {
            let mut queue = self.shared.queue();
            if queue.closing || self.shared.writer_gone.load(Ordering::Acquire) {
                return Err(JournalError::Closed);
            }
            queue.recover.push(done);
            self.shared.wake_writer(queue);
        }
        // A dropped sender means the writer thread is gone without answering.
        recovered.await.unwrap_or(Err(JournalError::Closed))
    }

    /// Deletes every closed segment whose highest seq is `<= applied_seq`, i.e. whose every
    /// record the store has applied. Returns how many segments were deleted.
    ///
    /// # Errors
    ///
    /// [`JournalError::Io`] if a deletion or the directory fsync fails. A segment not
    /// deleted stays on the list, to be tried again at the next trim; a file left behind
    /// at exit is replayed (and its records skipped by seq) on the next open, then trimmed.
    pub fn trim(&self, applied_seq: u64) -> Result<usize, JournalError> {
        let doomed = self.shared.applied_segments(applied_seq);
        let count = doomed.len();
        self.shared.remove_segments(doomed)?;
        Ok(count)
    }

    /// Like [`Journal::trim`], but the segments are deleted by the writer thread, so the
    /// caller never waits on the disk: the flusher calls this after every batch (and, while
    /// [`Journal::trim_failing`], at ticks with nothing to flush), from a
    /// runtime that also runs the accept loop and the store's connections, and a stalled
    /// disk must hold none of them. Returns how many segments were handed over; a deletion
    /// that fails is counted and logged there, and the segment is handed over again by the
    /// next call. After [`Journal::close`], or once the writer thread is gone, does nothing.
    pub fn trim_later(&self, applied_seq: u64) -> usize {
        let mut queue = self.shared.queue();
        if queue.closing || self.shared.writer_gone.load(Ordering::Acquire) {
            return 0;
        }
        let doomed = self.shared.applied_segments(applied_seq);
        let handed = doomed.len();
        if handed > 0 {
            queue.doomed.extend(doomed);
            self.shared.wake_writer(queue);
        }
        handed
    }

    /// Stops the writer after it has made everything already queued durable, then, if every
    /// record in every segment (the active one included) has `seq <= applied_seq`, deletes
    /// all segments so the next open starts empty. Otherwise the files stay for replay.
    /// Appends after this fail with [`JournalError::Closed`]. Calling it again is harmless.
    ///
    /// # Errors
    ///
    /// [`JournalError::Io`] if deleting segments or the directory fsync fails. A journal that
    /// failed is closed like any other: the caller has drained every batch to the store.
    pub async fn close(&self, applied_seq: u64) -> Result<(), JournalError> {
        let (ack, stopped) = oneshot::channel();
        {
            let mut queue = self.shared.queue();
            queue.closing = true;
            if self.shared.writer_gone.load(Ordering::Acquire) {
                drop(ack); // nobody will answer: the wait below ends at once
            } else {
                queue.close_acks.push(ack);
            }
            self.shared.wake_writer(queue);
        }
        // Nothing more comes to wait for.
        self.shared.hurry();
        // Err if the writer has already stopped (an earlier close, or it died): then there
        // is nothing left to wait for.
        let _ = stopped.await;
        // A failed group's records may be on disk without being in the bookkeeping below.
        // They were never acknowledged, and their seqs are no newer than the batches the
        // caller has drained to the store, so they need no keeping either.
        if let Some(e) = self.shared.failure() {
            tracing::warn!(error = %e, "Closing a failed journal.");
        }

        let doomed = {
            let mut segs = self.shared.segments();
            let max_seq = segs
                .closed
                .values()
                .map(|closed| closed.max_seq)
                .fold(segs.active_max_seq, u64::max);
            if max_seq > applied_seq {
                tracing::info!(
                    max_seq,
                    applied_seq,
                    "Closed the journal; kept segments with records the store lacks."
                );
                return Ok(());
            }
            segs.take_all()
        };
        self.shared.remove_segments(doomed)?;
        tracing::info!(
            applied_seq,
            "Closed the journal; every record is in the store, segments removed."
        );
        Ok(())
    }
}

impl Drop for Journal {
    /// Lets the writer finish what is still queued (appends whose futures were dropped) and
    /// joins it, so the directory lock is released only once nothing writes any more. Blocks
    /// for at most two writes (a group a serving thread began, and the writer's group or
    /// probe) and the deletions [`Journal::trim_later`] handed it; after [`Journal::close`]
    /// it returns at once.
    fn drop(&mut self) {
        let mut queue = self.shared.queue();
        queue.closing = true;
        self.shared.wake_writer(queue);
        self.shared.hurry();
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!("The journal writer thread panicked.");
        }
    }
}

/// Takes the advisory lock on `dir/journal.lock`, so two journals never share a directory.
fn lock_dir(dir: &Path) -> Result<File, JournalError> {
    let path = dir.join("journal.lock");
    let file = writer::no_follow(File::options().create(true).truncate(false).write(true))
        .open(&path)
        .map_err(io_err("open lock file", &path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(JournalError::Locked { path }),
        Err(std::fs::TryLockError::Error(e)) => Err(io_err("lock", &path)(e)),
    }
}
