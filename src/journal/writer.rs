//! Group commit to the active segment (the [`Committer`], run by the writer thread or a
//! serving thread), the writer thread, and the segment files they work on (naming,
//! listing, creating, cutting, deleting, directory fsync).

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{MutexGuard, PoisonError};
use std::task::Waker;
use std::time::{Duration, Instant};

use super::{COMMIT_SIBLINGS, Closed, GroupStats, JournalError, Queue, Shared, io_err};

const PREFIX: &str = "journal-";
const SUFFIX: &str = ".log";
const DIGITS: usize = 20;

/// Path of segment number `n` in `dir`.
pub(super) fn path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{PREFIX}{n:0DIGITS$}{SUFFIX}"))
}

/// The segment number in a file name, if it is a segment's name.
fn parse_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    if digits.len() != DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `options` that refuse to open a symbolic link (`O_NOFOLLOW`): every file tally opens in
/// its data directory is one it created, never a link planted there.
pub(crate) fn no_follow(options: &mut fs::OpenOptions) -> &mut fs::OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    options.custom_flags(libc::O_NOFOLLOW)
}

/// Segment numbers present in `dir`, ascending. Other files are ignored; a segment name
/// that is a symbolic link is refused.
pub(super) fn list(dir: &Path) -> Result<Vec<u64>, JournalError> {
    let mut numbers = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        if let Some(n) = entry.file_name().to_str().and_then(parse_name) {
            if entry.file_type().map_err(io_err("list", dir))?.is_symlink() {
                return Err(JournalError::Symlink { path: entry.path() });
            }
            numbers.push(n);
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

/// Creates segment `n` (it must not exist) and fsyncs the directory, so that records
/// acknowledged from it can be found after a crash.
pub(super) fn create(dir: &Path, n: u64) -> Result<File, JournalError> {
    let path = path(dir, n);
    let file = File::options()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io_err("create segment", &path))?;
    sync_dir(dir)?;
    Ok(file)
}

/// Reads the whole segment at `path`, never through a symbolic link.
pub(super) fn read(path: &Path) -> Result<Vec<u8>, JournalError> {
    use std::io::Read;
    let mut data = Vec::new();
    no_follow(File::options().read(true))
        .open(path)
        .and_then(|mut f| f.read_to_end(&mut data))
        .map_err(io_err("read segment", path))?;
    Ok(data)
}

/// Cuts the segment at `path` down to `len` bytes, durably.
pub(super) fn truncate(path: &Path, len: u64) -> Result<(), JournalError> {
    let file = no_follow(File::options().write(true))
        .open(path)
        .map_err(io_err("open segment to truncate", path))?;
    file.set_len(len)
        .map_err(io_err("truncate segment", path))?;
    file.sync_all()
        .map_err(io_err("sync truncated segment", path))
}

/// Deletes segment `n`; one already gone is fine. The caller fsyncs the directory.
pub(super) fn remove(dir: &Path, n: u64) -> Result<(), JournalError> {
    let path = path(dir, n);
    match fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("delete segment", &path)(e)),
        _ => Ok(()),
    }
}

/// Makes creations and deletions of entries in `dir` durable.
pub(super) fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// Makes `dir`'s own entry durable (it may have just been created).
pub(crate) fn sync_parent(dir: &Path) -> Result<(), JournalError> {
    match dir.parent() {
        Some(p) if p.as_os_str().is_empty() => sync_dir(Path::new(".")),
        Some(p) => sync_dir(p),
        None => Ok(()),
    }
}

/// Room a failed journal needs before it takes appends again.
pub(super) const PROBE_BYTES: usize = 1 << 20;

/// Writes and fsyncs [`PROBE_BYTES`] in a scratch file of `dir`, then deletes it.
fn probe(dir: &Path) -> Result<(), JournalError> {
    let path = dir.join("probe.tmp");
    // A leftover (or a planted link) goes first: the probe is created anew, exclusively.
    let _ = fs::remove_file(&path);
    let result = File::options()
        .write(true)
        .create_new(true)
        .open(&path)
        .and_then(|mut f| {
            f.write_all(&vec![0; PROBE_BYTES])?;
            f.sync_data()
        })
        .map_err(io_err("write a probe", &path));
    let _ = fs::remove_file(&path);
    result
}

/// One group the writer took from the queue: the bytes of the journal positions
/// `start..end` (counted from the journal's open), holding `records` records.
pub(super) struct Group {
    pub(super) start: u64,
    pub(super) end: u64,
    pub(super) records: usize,
    pub(super) max_seq: u64,
    /// How long it gathered: from its first record until it was taken.
    pub(super) waited: Duration,
}

/// The writer zero-fills the active segment this far ahead of its records (less for tiny
/// `segment_bytes`). A group's `fdatasync` then overwrites blocks the file already has, and
/// commits data only: appending past the end made every one also commit the new file size
/// through the filesystem's journal. Measured on this project's disk (ext4 on a virtual
/// disk, 2 KiB per fsync): 200-240 µs → 125 µs of wall time and 85-100 → 40-55 µs of CPU per
/// `fdatasync` (docs/benchmarks.md). The size changes once per chunk instead.
pub(super) const PREALLOCATE_BYTES: u64 = 1 << 20;

/// What the zero-fill writes from.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Owns the active segment: the only code that writes records. It lives in a
/// [`Committer`], behind the lock of whoever commits a group.
pub(super) struct Writer {
    file: File,
    number: u64,
    /// Bytes of records in the active segment: where the next group goes.
    len: u64,
    /// Bytes of the active segment known to be written (records, then zeros).
    allocated: u64,
    max_seq: u64,
}

/// Tells the waiters when the writer thread ends, however it ends (a panic included), so
/// that none waits for a group commit that will never come.
struct ExitGuard<'a>(&'a Shared);

impl Drop for ExitGuard<'_> {
    fn drop(&mut self) {
        // Nobody commits from now on: the segment is closed with the committer.
        drop(self.0.committer().take());
        let mut queue = self.0.queue();
        self.0.writer_gone.store(true, Ordering::Release);
        // Dropping the senders answers whoever waits on them.
        drop(std::mem::take(&mut queue.close_acks));
        drop(std::mem::take(&mut queue.recover));
        // Handed over too late to delete: back on the list, for `close`.
        let doomed = std::mem::take(&mut queue.doomed);
        self.0.segments().put_back(doomed);
        let wakers = [
            std::mem::take(&mut queue.wakers),
            std::mem::take(&mut queue.committing),
        ];
        drop(queue);
        wakers.into_iter().flatten().for_each(Waker::wake);
    }
}

/// Waits up to the commit delay for more records to queue, unless every worker has run out
/// of work (see `Journal::follow_workers`), in which case it does not wait at all.
fn commit_delay<'a>(shared: &'a Shared, queue: MutexGuard<'a, Queue>) -> MutexGuard<'a, Queue> {
    // Published before the workers are asked: either this sees them all parked, or the last
    // one to park sees `delaying` and ends the wait.
    shared.delaying.store(true, Ordering::SeqCst);
    let queue = if shared.workers_idle() {
        queue
    } else {
        shared
            .wake_writer
            .wait_timeout_while(queue, shared.commit_delay, |queue| {
                !queue.closing && shared.delaying.load(Ordering::SeqCst)
            })
            .unwrap_or_else(PoisonError::into_inner)
            .0
    };
    shared.delaying.store(false, Ordering::SeqCst);
    queue
}

/// A buffer that grew past this (a huge batch) is not kept for reuse.
const KEEP_BUFFER_BYTES: usize = 1 << 20;

/// The writer thread. Commits the groups that no serving thread does (see
/// `Journal::follow_workers`): those with records appended elsewhere (tests, other
/// runtimes), which a commit delay may gather, overdue ones, and any left to it for
/// `leader_wait`; answers `recover` and `close`, deletes the segments `trim_later` hands
/// over, and probes an idle disk. Returns once the journal is closed or dropped, after
/// writing everything appended before that.
pub(super) fn run(shared: &Shared) {
    let _exit = ExitGuard(shared);
    loop {
        let queue = wait_for_work(shared, shared.queue());
        // With the commit delay, and only while many appends come concurrently, let the
        // group grow a little first.
        let mut queue = if !shared.commit_delay.is_zero()
            && queue.last_group >= COMMIT_SIBLINGS
            && queue.needs_writer
            && !shared.overdue()
        {
            commit_delay(shared, queue)
        } else {
            queue
        };
        let recover = std::mem::take(&mut queue.recover);
        let doomed = std::mem::take(&mut queue.doomed);
        let closing = queue.closing;
        let close_acks = std::mem::take(&mut queue.close_acks);
        drop(queue);
        // The committer first, then the queue: the order every committer takes them in.
        let mut guard = shared.committer();
        let Some(committer) = guard.as_mut() else {
            remove_doomed(shared, doomed);
            return;
        };
        committer.commit_queued(shared, shared.queue());
        // Checked again here: a serving thread may have written a group meanwhile.
        if !closing && shared.probe_in().is_some_and(|due| due.is_zero()) {
            committer.writer.probe_idle_disk(shared);
        }
        for done in recover {
            let _ = done.send(committer.writer.recover(shared));
        }
        if closing {
            remove_doomed(shared, doomed);
            committer.writer.trim_tail(shared);
            for ack in close_acks {
                let _ = ack.send(());
            }
            return;
        }
        // Without the committer's lock, and after any group left to it: serving threads go
        // on committing meanwhile, and no group waits for the deletions.
        drop(guard);
        shared.lead_if_wanted();
        remove_doomed(shared, doomed);
    }
}

/// Deletes the segments [`Journal::trim_later`](super::Journal::trim_later) handed over; a
/// failure is counted and logged there, and those segments are tried again at the next trim.
fn remove_doomed(shared: &Shared, doomed: Vec<(u64, Closed)>) {
    let _ = shared.remove_segments(doomed);
}

/// Sleeps (no spin) until the writer has something to do: records that need it, a request,
/// records that no serving thread committed within a `leader_wait`, or a probe of the idle
/// disk ([`super::JournalOptions::probe_idle`]).
fn wait_for_work<'a>(
    shared: &'a Shared,
    mut queue: MutexGuard<'a, Queue>,
) -> MutexGuard<'a, Queue> {
    loop {
        if queue.closing
            || !queue.recover.is_empty()
            || !queue.doomed.is_empty()
            || queue.needs_writer
        {
            return queue;
        }
        if queue.buf.is_empty() {
            // The next append wakes it.
            queue.writer_sleep = Sleep::Idle;
            // With probes, so does the time to probe the idle disk.
            queue = match shared.probe_in() {
                None => (shared.wake_writer.wait(queue)).unwrap_or_else(PoisonError::into_inner),
                Some(due) if due.is_zero() => {
                    queue.writer_sleep = Sleep::Awake;
                    return queue;
                }
                Some(due) => {
                    (shared.wake_writer.wait_timeout(queue, due))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
            continue;
        }
        // Records a serving thread appended: the last of them to run dry commits them.
        // Only appends that need the writer wake it from this nap.
        let generation = queue.generation;
        queue.writer_sleep = Sleep::Napping;
        let (woken, timeout) = shared
            .wake_writer
            .wait_timeout(queue, shared.leader_wait)
            .unwrap_or_else(PoisonError::into_inner);
        queue = woken;
        queue.writer_sleep = Sleep::Awake;
        if timeout.timed_out() && queue.generation == generation && !queue.buf.is_empty() {
            tracing::debug!(
                records = queue.records,
                "No serving thread ran dry to commit the journal's records; the writer does."
            );
            return queue;
        }
    }
}

/// Whether and how the writer thread sleeps on `wake_writer`, so that an append notifies it
/// only when it has to.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sleep {
    #[default]
    Awake,
    /// Nothing to do: the next append notifies it.
    Idle,
    /// Leaving records to the serving threads: only an append that needs the writer (or a
    /// request) notifies it.
    Napping,
}

/// The writer's state and its buffers, behind [`Shared::committer`]. Whoever holds that
/// lock commits the next group: the writer thread, or the serving thread that runs dry last
/// ([`Shared::lead`]). That thread has nothing else to do, every one of its requests is
/// waiting, and committing there spares the writer thread's wake-up and the serving
/// threads' wake-ups by it (see `Journal::follow_workers`).
pub(super) struct Committer {
    pub(super) writer: Writer,
    /// The group being written; swapped with the queue's buffer, so appends go on into the
    /// other one meanwhile and neither is reallocated.
    bytes: Vec<u8>,
    /// The previous group's wakers while they are woken; the list goes back for reuse.
    wakers: Vec<Waker>,
}

impl Committer {
    pub(super) fn new(writer: Writer) -> Self {
        Self {
            writer,
            bytes: Vec::new(),
            wakers: Vec::new(),
        }
    }

    /// Takes everything `queue` holds as one group (one write and ONE fsync), makes it
    /// durable, settles it and wakes its waiters.
    pub(super) fn commit_queued(&mut self, shared: &Shared, mut queue: MutexGuard<'_, Queue>) {
        if queue.records == 0 {
            // Taken already (by a serving thread while the writer waited for the lock).
            return;
        }
        let waited = shared.pending_for();
        shared.pending_since.store(0, Ordering::Release);
        let bytes = &mut self.bytes;
        std::mem::swap(&mut queue.buf, bytes);
        let group = Group {
            start: queue.end - bytes.len() as u64,
            end: queue.end,
            records: std::mem::take(&mut queue.records),
            max_seq: std::mem::take(&mut queue.max_seq),
            waited,
        };
        queue.needs_writer = false;
        queue.last_group = group.records;
        // The group's wakers move to `committing`, whose emptied list (the previous
        // group's, woken) gathers the next group's.
        let queue_ref = &mut *queue;
        std::mem::swap(&mut queue_ref.wakers, &mut queue_ref.committing);
        queue.generation += 1;
        drop(queue);
        let result = self.writer.commit(shared, bytes, &group);
        shared.settle(&group, result);
        // Settled: its waiters can go.
        std::mem::swap(&mut shared.queue().committing, &mut self.wakers);
        self.wakers.drain(..).for_each(Waker::wake);
        bytes.clear();
        if bytes.capacity() > KEEP_BUFFER_BYTES {
            *bytes = Vec::new();
        }
    }
}

impl Writer {
    pub(super) fn new(file: File, number: u64) -> Self {
        Self {
            file,
            number,
            len: 0,
            allocated: 0,
            max_seq: 0,
        }
    }

    /// Makes `group` durable, or fails it and turns the journal failed.
    fn commit(&mut self, shared: &Shared, bytes: &[u8], group: &Group) -> Result<(), JournalError> {
        self.watched(shared, group.records, |writer| {
            writer.write_and_sync(shared, bytes, group)
        })
    }

    /// Writes one zero byte where the next record goes and fsyncs it: a disk that has
    /// written nothing for `stalled_after` is tried, so that one that stopped answering
    /// while idle is reported stalled ([`super::Journal::stalled`], `/readyz`) before an
    /// increment waits on it, and one that fails turns the journal failed. The byte lies
    /// over the zeros written ahead of the records, or past the last record: the next
    /// group overwrites it, and replay ends at a zeroed tail either way.
    fn probe_idle_disk(&mut self, shared: &Shared) {
        let _ = self.watched(shared, 0, |writer| {
            let seg = || path(&shared.dir, writer.number);
            writer
                .file
                .write_all_at(&[0], writer.len)
                .map_err(|e| io_err("write a probe to", &seg())(e))?;
            writer
                .file
                .sync_data()
                .map_err(|e| io_err("fsync", &seg())(e))?;
            writer.allocated = writer.allocated.max(writer.len + 1);
            shared.segments().active_bytes = writer.allocated;
            Ok(())
        });
    }

    /// Runs `write` (a write and fsync of `records` records) as watched for stalls: logs a
    /// stall's end, and on an error turns the journal failed. Refused while it is failed.
    fn watched(
        &mut self,
        shared: &Shared,
        records: usize,
        write: impl FnOnce(&mut Self) -> Result<(), JournalError>,
    ) -> Result<(), JournalError> {
        shared.check_failed()?;
        let busy = shared.busy();
        let result = write(self);
        let took = busy.running();
        drop(busy);
        if took >= shared.stalled_after && result.is_ok() {
            // The service logged the stall's start (`Journal::stalled`); its end is known here.
            tracing::info!(
                took_secs = took.as_secs_f64(),
                records,
                segment = self.number,
                "The journal's disk answered again: a write and fsync completed after {:.1}s.",
                took.as_secs_f64()
            );
        }
        if let Err(err) = &result
            && shared.set_failed(Some(err.clone()))
        {
            tracing::error!(
                error = %err,
                records,
                segment = self.number,
                "Journal write failed; refusing increments until a fresh segment can be written."
            );
        }
        result
    }

    /// Leaves the failed active segment for a fresh one; see [`super::Journal::recover`].
    /// Only once [`PROBE_BYTES`] can be written and fsynced in the directory: a fresh
    /// segment alone would always look writable on a full disk (creating a file needs no
    /// data blocks), and the journal would flap between failed and recovered.
    fn recover(&mut self, shared: &Shared) -> Result<(), JournalError> {
        if !shared.is_failed.load(Ordering::Acquire) {
            return Ok(());
        }
        let _busy = shared.busy();
        probe(&shared.dir)?;
        self.rotate(shared)?;
        if shared.set_failed(None) {
            tracing::info!(
                segment = self.number,
                "Journal can write again; continuing in a fresh segment."
            );
        }
        Ok(())
    }

    fn write_and_sync(
        &mut self,
        shared: &Shared,
        buf: &[u8],
        group: &Group,
    ) -> Result<(), JournalError> {
        if self.len > 0 && self.len >= shared.segment_bytes {
            self.rotate(shared)?;
        }
        let end = self.len + buf.len() as u64;
        if end > self.allocated {
            self.preallocate(shared, end);
        }
        let seg = || path(&shared.dir, self.number);
        self.file
            .write_all_at(buf, self.len)
            .map_err(|e| io_err("write to", &seg())(e))?;
        let started = Instant::now();
        self.file
            .sync_data()
            .map_err(|e| io_err("fsync", &seg())(e))?;
        let fsync = started.elapsed();

        self.len = end;
        self.allocated = self.allocated.max(end);
        self.max_seq = self.max_seq.max(group.max_seq);
        {
            let mut segs = shared.segments();
            segs.active_max_seq = self.max_seq;
            segs.active_bytes = self.allocated;
        }
        if let Some(on_sync) = &shared.on_sync {
            on_sync(GroupStats {
                records: group.records,
                bytes: buf.len(),
                fsync,
                waited: group.waited,
            });
        }
        Ok(())
    }

    /// Zero-fills the active segment past `end`, up to a multiple of the chunk
    /// ([`PREALLOCATE_BYTES`]). The group's own `fdatasync` makes the zeros and the new size
    /// durable. Best effort: if the disk refuses (full, or a file-size limit), the group is
    /// written past the zeros as before, and its own write reports the failure.
    fn preallocate(&mut self, shared: &Shared, end: u64) {
        let chunk = shared
            .segment_bytes
            .clamp(4096, PREALLOCATE_BYTES)
            .next_multiple_of(4096);
        let target = end.next_multiple_of(chunk);
        while self.allocated < target {
            let n = (target - self.allocated).min(ZEROS.len() as u64) as usize;
            if let Err(e) = self.file.write_all_at(&ZEROS[..n], self.allocated) {
                tracing::debug!(error = %e, segment = self.number, "Cannot zero-fill the journal segment ahead; appending without.");
                return;
            }
            self.allocated += n as u64;
        }
    }

    /// Cuts the zeros after the last record off the active segment, before it is closed. Not
    /// fsynced and not needed for correctness (replay ends cleanly at a zeroed tail, which a
    /// crash leaves); it keeps closed segments exactly their records long. A failed
    /// segment keeps whatever its failed write left, for replay.
    fn trim_tail(&mut self, shared: &Shared) {
        if self.allocated > self.len && !shared.is_failed.load(Ordering::Acquire) {
            match self.file.set_len(self.len) {
                Ok(()) => {
                    self.allocated = self.len;
                    shared.segments().active_bytes = self.allocated;
                }
                Err(e) => {
                    tracing::debug!(error = %e, segment = self.number, "Cannot cut the zeroed tail off the journal segment; replay skips it.")
                }
            }
        }
    }

    /// Closes the full active segment and starts the next one (directory fsynced first).
    fn rotate(&mut self, shared: &Shared) -> Result<(), JournalError> {
        let next = self.number.checked_add(1).ok_or_else(|| {
            io_err("number a new segment in", &shared.dir)(io::Error::other(
                "segment numbers exhausted",
            ))
        })?;
        // A failed recovery may have left `next` behind, empty: nothing was ever written to
        // it, so it is taken over.
        let _ = remove(&shared.dir, next);
        let file = create(&shared.dir, next)?;
        self.trim_tail(shared);
        // What a failed write left is in the file's size, not in `allocated`.
        let bytes = self.file.metadata().map_or(self.allocated, |m| m.len());
        self.file = file;
        {
            let mut segs = shared.segments();
            let closed = Closed {
                max_seq: self.max_seq,
                bytes,
            };
            segs.closed.insert(self.number, closed);
            segs.active = next;
            segs.active_max_seq = 0;
            segs.active_bytes = 0;
        }
        tracing::debug!(
            closed = self.number,
            active = next,
            "Rotated the journal segment."
        );
        self.number = next;
        self.len = 0;
        self.allocated = 0;
        self.max_seq = 0;
        Ok(())
    }
}
