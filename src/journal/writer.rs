//! Group commit: the shared append buffer that callers encode their records into, and the
//! writer thread that makes each accumulated group durable with one write and one fsync.
//!
//! What it promises: a caller's [`Group::wait`] resolves `Ok` only after the bytes of its
//! record, and of every record appended before it, were written and `fdatasync`ed; `Err`
//! for every waiter of a group whose write or fsync failed and for every later append.
//!
//! Why this shape: an append takes one short `std::sync::Mutex`, encodes its record
//! straight into the buffer and clones the `Arc` of the group that buffer will become;
//! it crosses to the writer thread only when the writer is asleep (at most once per
//! group), and the writer wakes the whole group with one `Notify`. No per-request channel
//! message, oneshot or allocation. While the writer fsyncs one group the next one fills
//! the buffer, so groups grow with the load, and an append that finds the writer idle
//! waits for exactly one fsync, with no timer.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::{Notify, watch};

use super::{GroupStats, JournalError, Shared, io_err, record, segment};

/// Largest buffer capacity kept between groups; a larger one is freed after its group.
const KEEP_BUFFER: usize = 4 << 20;

/// One group commit's outcome, shared by every append in the group.
pub(super) struct Group {
    outcome: OnceLock<Result<(), JournalError>>,
    done: Notify,
}

impl Group {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            outcome: OnceLock::new(),
            done: Notify::new(),
        })
    }

    /// Publishes the outcome (the first one wins) and wakes every waiter.
    fn finish(&self, outcome: Result<(), JournalError>) {
        let _ = self.outcome.set(outcome);
        self.done.notify_waiters();
    }

    /// Resolves once the group is finished. Runtime-agnostic (`Notify` needs no reactor).
    pub(super) async fn wait(&self) -> Result<(), JournalError> {
        loop {
            // Register before looking, so a `finish` between the look and the await is
            // not missed (`notify_waiters` only wakes registered waiters).
            let mut notified = pin!(self.done.notified());
            notified.as_mut().enable();
            if let Some(outcome) = self.outcome.get() {
                return outcome.clone();
            }
            notified.await;
        }
    }
}

/// The append buffer and the writer's wake-up, shared by callers and the writer thread.
pub(super) struct Queue {
    state: Mutex<QueueState>,
    wake: Condvar,
}

struct QueueState {
    /// Records appended since the writer last took the buffer, back to back.
    buf: Vec<u8>,
    /// How many records `buf` holds, and their highest seq.
    records: usize,
    max_seq: u64,
    /// The group the records in `buf` belong to; each of their appends holds a clone.
    group: Arc<Group>,
    /// The writer is blocked on `wake`; the next append must wake it (and clears this,
    /// so a burst of appends signals once).
    writer_asleep: bool,
    /// `close` or drop asked the writer to finish what is queued and exit.
    stopping: bool,
    /// The first write/fsync error; set once, by the writer.
    failed: Option<JournalError>,
}

impl Queue {
    pub(super) fn new() -> Self {
        Self {
            state: Mutex::new(QueueState {
                buf: Vec::new(),
                records: 0,
                max_seq: 0,
                group: Group::new(),
                writer_asleep: false,
                stopping: false,
                failed: None,
            }),
            wake: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // Every update under this lock leaves the state consistent at each step that can
        // panic (encoding never leaves a partial record), so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Encodes a record into the buffer and returns the group to wait on.
    pub(super) fn push(
        &self,
        seq: u64,
        entries: &[(&str, i64)],
    ) -> Result<Arc<Group>, JournalError> {
        let mut st = self.lock();
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
        let wake = std::mem::replace(&mut st.writer_asleep, false);
        drop(st);
        if wake {
            self.wake.notify_one();
        }
        Ok(group)
    }

    /// The error that failed the journal, if any.
    pub(super) fn failed(&self) -> Option<JournalError> {
        self.lock().failed.clone()
    }

    /// Refuses further appends and tells the writer to exit once the buffer is empty.
    pub(super) fn stop(&self) {
        self.lock().stopping = true;
        self.wake.notify_one();
    }
}

/// The next segment being zero-filled on a helper thread.
struct Spare {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<Option<File>, JournalError>>,
}

/// Owns the active segment. Runs on its own thread; the only code that writes records.
pub(super) struct Writer {
    shared: Arc<Shared>,
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
    /// A copy of the queue's `failed`, so the writer need not lock to check it.
    failed: Option<JournalError>,
    /// The group being written; failed with `Closed` if the thread unwinds.
    in_flight: Option<Arc<Group>>,
    /// Set to true when the writer has exited (after its last group and cleanup).
    stopped: watch::Sender<bool>,
}

impl Writer {
    pub(super) fn new(
        shared: Arc<Shared>,
        file: File,
        number: u64,
        file_len: u64,
        stopped: watch::Sender<bool>,
    ) -> Self {
        Self {
            shared,
            file,
            number,
            len: 0,
            file_len,
            max_seq: 0,
            buf: Vec::new(),
            spare: None,
            failed: None,
            in_flight: None,
            stopped,
        }
    }

    /// The writer loop. Returns once stopped (by `close` or drop) and the buffer is empty.
    pub(super) fn run(mut self) {
        let mut last_group = 0;
        // ======================== GROUP COMMIT ========================
        // Take whatever accumulated while the previous group was being fsynced: the
        // first record's fsync serves everyone behind it. Block (no timer, no spin) only
        // while there is nothing at all.
        while let Some((records, max_seq, group)) = self.take(last_group) {
            self.in_flight = Some(Arc::clone(&group));
            let outcome = self.commit(records, max_seq);
            group.finish(outcome);
            self.in_flight = None;
            if self.buf.capacity() > KEEP_BUFFER {
                // A burst (or one huge batch record) must not pin its memory forever.
                self.buf = Vec::new();
            }
            last_group = records;
            self.prepare_spare_if_due();
        }
        // ==============================================================
        self.shut_down();
    }

    /// Waits for records and takes the whole buffer with its group, or `None` to exit.
    fn take(&mut self, last_group: usize) -> Option<(usize, u64, Arc<Group>)> {
        let queue = &self.shared.queue;
        let next_group = Group::new();
        let mut st = queue.lock();
        while st.buf.is_empty() {
            if st.stopping {
                return None;
            }
            st.writer_asleep = true;
            st = queue.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        // The opt-in commit delay: only while appends come concurrently, let the group
        // grow a little before taking it. A lone append never waits.
        let delay = self.shared.commit_delay;
        if !delay.is_zero() && last_group > 1 {
            drop(st);
            std::thread::sleep(delay);
            st = queue.lock();
        }
        self.buf.clear();
        std::mem::swap(&mut st.buf, &mut self.buf);
        let records = std::mem::take(&mut st.records);
        let max_seq = std::mem::take(&mut st.max_seq);
        let group = std::mem::replace(&mut st.group, next_group);
        Some((records, max_seq, group))
    }

    /// Makes the taken buffer durable, or fails it and turns the journal failed.
    fn commit(&mut self, records: usize, max_seq: u64) -> Result<(), JournalError> {
        if let Some(err) = &self.failed {
            return Err(JournalError::Failed(Box::new(err.clone())));
        }
        let result = self.write_and_sync(records, max_seq);
        if let Err(err) = &result {
            tracing::error!(
                error = %err,
                records,
                "journal write failed; refusing all further appends"
            );
            self.failed = Some(err.clone());
            self.shared.queue.lock().failed = Some(err.clone());
        }
        result
    }

    fn write_and_sync(&mut self, records: usize, max_seq: u64) -> Result<(), JournalError> {
        if self.len > 0 && self.len >= self.shared.segment_bytes {
            self.rotate()?;
        }
        let seg = || segment::path(&self.shared.dir, self.number);
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
        self.shared.segments().active_max_seq = self.max_seq;
        if let Some(on_sync) = &self.shared.on_sync {
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
    fn prepare_spare_if_due(&mut self) {
        if self.spare.is_some() || self.failed.is_some() || self.len < self.shared.segment_bytes / 2
        {
            return;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (dir, len, flag) = (
            self.shared.dir.clone(),
            self.shared.segment_bytes,
            Arc::clone(&stop),
        );
        match std::thread::Builder::new()
            .name("journal-spare".into())
            .spawn(move || segment::prepare_spare(&dir, len, &flag))
        {
            Ok(thread) => self.spare = Some(Spare { stop, thread }),
            // Not fatal: rotation then creates the segment itself.
            Err(e) => tracing::warn!(error = %e, "journal: cannot spawn the spare preparer"),
        }
    }

    /// Closes the full active segment and makes the next one active: the prepared spare if
    /// there is one, else a segment created here (the directory is fsynced either way).
    fn rotate(&mut self) -> Result<(), JournalError> {
        let dir = &self.shared.dir;
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
            None => segment::create(dir, next, self.shared.segment_bytes)?,
        };
        {
            let mut segs = self.shared.segments();
            segs.closed.insert(self.number, self.max_seq);
            segs.active = next;
            segs.active_max_seq = 0;
        }
        tracing::debug!(
            closed = self.number,
            active = next,
            "journal segment rotated"
        );
        self.file = file;
        self.number = next;
        self.len = 0;
        self.file_len = self.shared.segment_bytes;
        self.max_seq = 0;
        Ok(())
    }

    /// Stops the spare preparer and removes its file, then cuts the unused zero fill off
    /// the active segment, so a cleanly stopped journal leaves compact files behind.
    fn shut_down(&mut self) {
        if let Some(spare) = self.spare.take() {
            spare.stop.store(true, Ordering::Relaxed);
            let _ = spare.thread.join();
            if let Err(e) = segment::remove_spare(&self.shared.dir) {
                tracing::warn!(error = %e, "journal: cannot delete the spare segment");
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
                Err(e) => tracing::warn!(error = %e, "journal: cannot shrink the active segment"),
            }
        }
        self.stopped.send_replace(true);
    }
}

impl Drop for Writer {
    /// If the thread unwinds, nobody may wait forever: fail the group being written and
    /// the one queued, and refuse further appends.
    fn drop(&mut self) {
        if let Some(group) = self.in_flight.take() {
            group.finish(Err(JournalError::Closed));
        }
        let mut st = self.shared.queue.lock();
        st.stopping = true;
        st.group.finish(Err(JournalError::Closed));
        drop(st);
        self.stopped.send_replace(true);
    }
}
