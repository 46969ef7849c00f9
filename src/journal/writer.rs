//! Group commit: appends encode into one shared buffer, and the first of them that finds no
//! commit in progress becomes the **leader**: it writes the whole buffer into the active
//! segment and makes it durable with one write and one `fdatasync`, on its own thread.
//!
//! What it promises: a caller's append resolves `Ok` only after the bytes of its record,
//! and of every record appended before it, were written and `fdatasync`ed; `Err` for every
//! append of a group whose write or fsync failed and for every later append.
//!
//! Why this shape (the Redis event-loop model, on the async runtime): a dedicated writer
//! thread costs a cross-thread wake-up per group in each direction; a wake from a thread
//! outside the runtime pushes every woken task into the runtime's injection queue and
//! unparks an idle worker (futex, IPI, context switch). Here the leader is an ordinary
//! append running on a runtime worker, so the group's waiters are woken from that worker
//! into its local run queue. The write and fsync are a blocking call of about half a
//! millisecond, made inside `tokio::task::block_in_place` on a multi-thread runtime so
//! that the worker's core keeps serving meanwhile (blocking the worker outright left one
//! of two cores idle per fsync and measured slower); new appends fill the buffer as the
//! next group.
//!
//! Leadership, step by step:
//! - An append takes one short `std::sync::Mutex`, encodes its record into the buffer and,
//!   if a commit is in progress, waits on the group the buffer will become (an `Arc`
//!   clone, no per-request channel, oneshot or allocation).
//! - If none is in progress, the append leads: it takes the buffer (its own record
//!   included), commits it, publishes the outcome and wakes the group. A lone request thus
//!   pays exactly one fsync and no timer, and never waits for anybody.
//! - If records arrived during the commit, the leader does **not** commit them too: it
//!   hands leadership to one waiter of the next group (`Notify::notify_one`, which keeps a
//!   permit if that waiter is not polled yet and passes it on if its future is dropped) and
//!   returns. Every request therefore leads at most one group, its own, so no request is
//!   held leading under sustained load; and the handed-off waiter costs no extra wake-up,
//!   since it needed one wake-up for its group anyway.
//! - Whoever finds records queued and no commit in progress may lead (a new append, a
//!   handed-off waiter, `close`, drop), so a group whose waiters were all dropped is
//!   written by the next append or at the latest by `close`/drop.
//!
//! Cancellation: the take/write/fsync/publish section contains no `.await`, so a leader's
//! future cannot be dropped half-way through it; if it panics (say in `on_sync`), a guard
//! fails its group and the journal instead of leaving it wedged.

use std::fs::File;
use std::future::poll_fn;
use std::os::unix::fs::FileExt;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::Poll;
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::Notify;

use super::{GroupStats, JournalError, Shared, io_err, record, segment};

/// Largest buffer capacity kept between groups; a larger one is freed after its group.
const KEEP_BUFFER: usize = 4 << 20;

/// One group commit's outcome, shared by every append in the group.
pub(super) struct Group {
    outcome: OnceLock<Result<(), JournalError>>,
    /// Woken (all waiters) once `outcome` is set.
    done: Notify,
    /// Woken (one waiter) when this group is queued and nobody is committing: that waiter
    /// becomes the leader.
    lead: Notify,
}

impl Group {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            outcome: OnceLock::new(),
            done: Notify::new(),
            lead: Notify::new(),
        })
    }

    /// Publishes the outcome (the first one wins) and wakes every waiter.
    fn finish(&self, outcome: Result<(), JournalError>) {
        let _ = self.outcome.set(outcome);
        self.done.notify_waiters();
    }

    /// Resolves once the group is finished, leading a commit itself when handed the lead.
    /// Runtime-agnostic (`Notify` needs no reactor).
    async fn wait(&self, shared: &Shared) -> Result<(), JournalError> {
        loop {
            // Register before looking, so a `finish` between the look and the await is
            // not missed (`notify_waiters` only wakes registered waiters).
            let mut done = pin!(self.done.notified());
            done.as_mut().enable();
            if let Some(outcome) = self.outcome.get() {
                return outcome.clone();
            }
            let mut lead = pin!(self.lead.notified());
            let handed_lead = poll_fn(|cx| {
                if done.as_mut().poll(cx).is_ready() {
                    Poll::Ready(false)
                } else if lead.as_mut().poll(cx).is_ready() {
                    Poll::Ready(true)
                } else {
                    Poll::Pending
                }
            })
            .await;
            if handed_lead {
                // No `.await` from here to the commit's end: see the module docs.
                try_lead(shared);
            }
        }
    }
}

/// The append buffer and the leadership flag, shared by every append, plus the writer.
pub(super) struct Queue {
    state: Mutex<QueueState>,
    /// The active segment; locked only by the leader (always before `state`, never while
    /// holding it), so it is in practice uncontended.
    writer: Mutex<Writer>,
    /// Woken whenever a leader finishes, for `close` waiting for the queue to drain.
    idle: Notify,
}

struct QueueState {
    /// Records appended since the last leader took the buffer, back to back.
    buf: Vec<u8>,
    /// How many records `buf` holds, and their highest seq.
    records: usize,
    max_seq: u64,
    /// The group the records in `buf` belong to; each of their appends holds a clone.
    group: Arc<Group>,
    /// A leader is between taking the buffer and publishing its group's outcome.
    committing: bool,
    /// `close` or drop refuses further appends.
    stopping: bool,
    /// The first write/fsync error; set once, by a leader.
    failed: Option<JournalError>,
}

impl Queue {
    pub(super) fn new(writer: Writer) -> Self {
        Self {
            state: Mutex::new(QueueState {
                buf: Vec::new(),
                records: 0,
                max_seq: 0,
                group: Group::new(),
                committing: false,
                stopping: false,
                failed: None,
            }),
            writer: Mutex::new(writer),
            idle: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // Every update under this lock leaves the state consistent at each step that can
        // panic (encoding never leaves a partial record), so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn writer(&self) -> MutexGuard<'_, Writer> {
        // A leader that panicked is caught by `LeadGuard`, which fails the journal, so a
        // poisoned writer is never used for another commit; only `shut_down` runs on it.
        self.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The error that failed the journal, if any.
    pub(super) fn failed(&self) -> Option<JournalError> {
        self.lock().failed.clone()
    }
}

/// Appends one record and resolves once it is durable (see the module docs).
pub(super) async fn append(
    shared: &Shared,
    seq: u64,
    entries: &[(&str, i64)],
) -> Result<(), JournalError> {
    let group = {
        let mut st = shared.queue.lock();
        if let Some(err) = &st.failed {
            return Err(JournalError::Failed(Box::new(err.clone())));
        }
        if st.stopping {
            return Err(JournalError::Closed);
        }
        record::encode_into(&mut st.buf, seq, entries)?;
        st.records += 1;
        st.max_seq = st.max_seq.max(seq);
        let group = Arc::clone(&st.group);
        if !st.committing {
            // Nobody is committing: lead, our own record first in the buffer. Same poll
            // as the push, no `.await`: the group cannot be abandoned half-way.
            st.committing = true;
            drop(st);
            lead_one(shared);
        }
        group
    };
    group.wait(shared).await
}

/// Leads one group if records are queued and nobody is committing.
fn try_lead(shared: &Shared) {
    let mut st = shared.queue.lock();
    if st.committing || st.buf.is_empty() {
        return;
    }
    st.committing = true;
    drop(st);
    lead_one(shared);
}

/// Makes everything queued durable on the calling thread (for `close` and drop once no
/// append can lead any more), then stops the writer. Returns `false` without doing
/// anything if a leader is committing right now; the caller waits on `idle` and retries.
fn drain_now(shared: &Shared) -> bool {
    loop {
        let mut st = shared.queue.lock();
        st.stopping = true;
        if st.committing {
            return false;
        }
        if st.buf.is_empty() {
            drop(st);
            shared.queue.writer().shut_down(shared);
            return true;
        }
        st.committing = true;
        drop(st);
        lead_one(shared);
    }
}

/// `close`: drains the queue and stops the writer, waiting for a running leader.
pub(super) async fn drain(shared: &Shared) {
    loop {
        let mut idle = pin!(shared.queue.idle.notified());
        idle.as_mut().enable();
        if drain_now(shared) {
            return;
        }
        idle.await;
    }
}

/// Drop: as [`drain`], blocking. Nothing can be leading then (every append future borrows
/// the journal), so the loop runs once; it yields only to stay correct if that changes.
pub(super) fn drain_blocking(shared: &Shared) {
    while !drain_now(shared) {
        std::thread::yield_now();
    }
}

/// If a leader unwinds, nobody may wait forever: fail its group and the queued one, and
/// turn the journal failed and stopping.
struct LeadGuard<'a> {
    shared: &'a Shared,
    in_flight: Option<Arc<Group>>,
}

impl Drop for LeadGuard<'_> {
    fn drop(&mut self) {
        if let Some(group) = self.in_flight.take() {
            group.finish(Err(JournalError::Closed));
        }
        let mut st = self.shared.queue.lock();
        st.committing = false;
        st.stopping = true;
        st.failed.get_or_insert(JournalError::Closed);
        let queued = std::mem::replace(&mut st.group, Group::new());
        st.buf.clear();
        st.records = 0;
        drop(st);
        queued.finish(Err(JournalError::Closed));
        self.shared.queue.idle.notify_waiters();
    }
}

/// Commits one group. The caller has set `committing` (under the lock) and released the
/// lock. Takes the whole buffer, writes and fsyncs it, publishes the outcome, wakes the
/// group, and hands the lead to the next group if records are queued.
fn lead_one(shared: &Shared) {
    let mut guard = LeadGuard {
        shared,
        in_flight: None,
    };
    let mut writer = shared.queue.writer();
    // The opt-in commit delay: only while appends come concurrently, let the group grow a
    // little before taking it. A lone append never waits. It blocks this worker thread.
    let delay = shared.commit_delay;
    if !delay.is_zero() && writer.last_group > 1 {
        std::thread::sleep(delay);
    }
    let next_group = Group::new();
    let mut st = shared.queue.lock();
    writer.buf.clear();
    std::mem::swap(&mut st.buf, &mut writer.buf);
    let records = std::mem::take(&mut st.records);
    let max_seq = std::mem::take(&mut st.max_seq);
    let group = std::mem::replace(&mut st.group, next_group);
    drop(st);
    guard.in_flight = Some(Arc::clone(&group));

    let outcome = if records == 0 {
        Ok(())
    } else {
        let mut commit = || writer.commit(shared, records, max_seq);
        // On a multi-thread runtime the fsync runs in `block_in_place`: the worker's core
        // (its run queue) is handed to another thread for the ~0.5 ms, or taken back if
        // nobody has picked it up yet, so every core keeps serving while a group is
        // fsynced. Measured on 2 cores under 400 connections against blocking the worker
        // outright: ~30% more requests per second and half the context switches per
        // request (see the branch's report). A current-thread runtime cannot do that
        // (`block_in_place` panics there): it simply blocks.
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(commit)
            }
            _ => commit(),
        }
    };
    writer.after_group(shared, records);
    drop(writer);
    // Published before leadership is released, so a failure is visible to the next leader
    // (the writer refuses to commit after one) and this group's outcome is final.
    let _ = group.outcome.set(outcome);
    guard.in_flight = None;
    std::mem::forget(guard);

    let mut st = shared.queue.lock();
    st.committing = false;
    let next = (!st.buf.is_empty()).then(|| Arc::clone(&st.group));
    drop(st);
    // Woken from this thread: on a runtime worker they land in its local run queue. The
    // next leader is woken last, so it takes the worker's LIFO slot and the next fsync
    // starts as soon as this task yields.
    group.done.notify_waiters();
    shared.queue.idle.notify_waiters();
    if let Some(next) = next {
        next.lead.notify_one();
    }
}

/// The next segment being zero-filled on a helper thread.
struct Spare {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<Option<File>, JournalError>>,
}

/// Owns the active segment; only the current leader uses it.
pub(super) struct Writer {
    file: File,
    number: u64,
    /// Bytes of records in the active segment (where the next group goes).
    len: u64,
    /// Size of the active segment file: preallocated length, or `len` if a group went past.
    file_len: u64,
    max_seq: u64,
    /// The buffer swapped with the queue's each group, so neither side reallocates.
    buf: Vec<u8>,
    spare: Option<Spare>,
    /// A copy of the queue's `failed`, so a leader need not lock to check it.
    failed: Option<JournalError>,
    /// Records in the previous group (for the commit delay).
    last_group: usize,
    /// `shut_down` has run.
    shut: bool,
}

impl Writer {
    pub(super) fn new(file: File, number: u64, file_len: u64) -> Self {
        Self {
            file,
            number,
            len: 0,
            file_len,
            max_seq: 0,
            buf: Vec::new(),
            spare: None,
            failed: None,
            last_group: 0,
            shut: false,
        }
    }

    /// Bookkeeping after a group: frees an oversized buffer, starts the spare if due.
    fn after_group(&mut self, shared: &Shared, records: usize) {
        if self.buf.capacity() > KEEP_BUFFER {
            // A burst (or one huge batch record) must not pin its memory forever.
            self.buf = Vec::new();
        }
        self.last_group = records;
        self.prepare_spare_if_due(shared);
    }

    /// Makes the taken buffer durable, or fails it and turns the journal failed.
    fn commit(
        &mut self,
        shared: &Shared,
        records: usize,
        max_seq: u64,
    ) -> Result<(), JournalError> {
        if let Some(err) = &self.failed {
            return Err(JournalError::Failed(Box::new(err.clone())));
        }
        if self.shut {
            return Err(JournalError::Closed);
        }
        let result = self.write_and_sync(shared, records, max_seq);
        if let Err(err) = &result {
            tracing::error!(
                error = %err,
                records,
                "Journal write failed; refusing every further append."
            );
            self.failed = Some(err.clone());
            shared.queue.lock().failed = Some(err.clone());
        }
        result
    }

    fn write_and_sync(
        &mut self,
        shared: &Shared,
        records: usize,
        max_seq: u64,
    ) -> Result<(), JournalError> {
        if self.len > 0 && self.len >= shared.segment_bytes {
            self.rotate(shared)?;
        }
        let seg = || segment::path(&shared.dir, self.number);
        // Positional write into the zero fill: the file size does not change (unless a
        // group runs past the preallocated end), so fdatasync has only data to flush.
        self.file
            .write_all_at(&self.buf, self.len)
            .map_err(|e| io_err("write to", &seg())(e))?;
        let started = Instant::now();
        self.file
            .sync_data()
            .map_err(|e| io_err("fsync", &seg())(e))?;
        let fsync = started.elapsed();

        self.len += self.buf.len() as u64;
        self.file_len = self.file_len.max(self.len);
        self.max_seq = self.max_seq.max(max_seq);
        shared.segments().active_max_seq = self.max_seq;
        if let Some(on_sync) = &shared.on_sync {
            on_sync(GroupStats {
                records,
                bytes: self.buf.len(),
                fsync,
            });
        }
        Ok(())
    }

    /// Once the active segment is half full, starts zero-filling the next one on a helper
    /// thread, so that rotation only renames a ready file.
    fn prepare_spare_if_due(&mut self, shared: &Shared) {
        if self.spare.is_some()
            || self.failed.is_some()
            || self.shut
            || self.len < shared.segment_bytes / 2
        {
            return;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (dir, len, flag) = (shared.dir.clone(), shared.segment_bytes, Arc::clone(&stop));
        match std::thread::Builder::new()
            .name("journal-spare".into())
            .spawn(move || segment::prepare_spare(&dir, len, &flag))
        {
            Ok(thread) => self.spare = Some(Spare { stop, thread }),
            // Not fatal: rotation then creates the segment itself.
            Err(e) => {
                tracing::warn!(error = %e, "Cannot start preparing the next journal segment; it will be made at rotation.")
            }
        }
    }

    /// Closes the full active segment and makes the next one active: the prepared spare if
    /// there is one, else a segment created here (the directory is fsynced either way).
    fn rotate(&mut self, shared: &Shared) -> Result<(), JournalError> {
        let dir = &shared.dir;
        let next = self.number.checked_add(1).ok_or_else(|| {
            io_err("number a new segment in", dir)(std::io::Error::other(
                "segment numbers exhausted",
            ))
        })?;
        let spare = match self.spare.take() {
            Some(spare) => spare.thread.join().unwrap_or_else(|_| {
                Err(io_err("prepare the spare segment in", dir)(
                    std::io::Error::other("the preparer thread panicked"),
                ))
            })?,
            None => None,
        };
        let file = match spare {
            Some(file) => {
                segment::install_spare(dir, next)?;
                file
            }
            None => segment::create(dir, next, shared.segment_bytes)?,
        };
        {
            let mut segs = shared.segments();
            segs.closed.insert(self.number, self.max_seq);
            segs.active = next;
            segs.active_max_seq = 0;
        }
        tracing::debug!(
            closed = self.number,
            active = next,
            "Rotated the journal segment."
        );
        self.file = file;
        self.number = next;
        self.len = 0;
        self.file_len = shared.segment_bytes;
        self.max_seq = 0;
        Ok(())
    }

    /// Stops the spare preparer and removes its file, then cuts the unused zero fill off
    /// the active segment, so a cleanly stopped journal leaves compact files behind. Runs
    /// once; later calls do nothing.
    fn shut_down(&mut self, shared: &Shared) {
        if std::mem::replace(&mut self.shut, true) {
            return;
        }
        if let Some(spare) = self.spare.take() {
            spare.stop.store(true, Ordering::Relaxed);
            let _ = spare.thread.join();
            if let Err(e) = segment::remove_spare(&shared.dir) {
                tracing::warn!(error = %e, "Cannot delete the spare journal segment.");
            }
        }
        // After a failure the file's state is unknown; replay sorts it out on open.
        if self.failed.is_none() && self.file_len > self.len {
            let shrunk = self
                .file
                .set_len(self.len)
                .and_then(|()| self.file.sync_all());
            match shrunk {
                Ok(()) => self.file_len = self.len,
                // Harmless: replay recognises the zero fill.
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot cut the unused zero fill off the journal segment.")
                }
            }
        }
    }
}
