//! The threads that run HTTP connections: one current-thread Tokio runtime each (thread per
//! core), fed by the accept loop of [`super::serve`].
//!
//! Why not the workers of one multi-thread runtime: under `ack=journal` every request is
//! woken by another thread (the journal writer, once its fsync returns). On a multi-thread
//! runtime such a wake-up goes through the shared injection queue and resumes the
//! connection on whichever worker takes it, with its state out of that core's cache, and
//! that worker may have to be woken. Here a connection lives on one thread from accept to
//! close: its socket is registered with that thread's reactor, its timer sits in that
//! thread's wheel, and every wake-up, the journal's included, runs it there. Measured with
//! `tally-bench` (docs/benchmarks.md): a no-op whose replies another thread releases went
//! from 0.80× to 0.87× of a plain axum no-op, tally's defaults from 0.76× to 0.81×.
//!
//! No work stealing: a thread with more busy connections than another stays busier. The
//! accept loop gives each new connection to the thread with the fewest open ones, which is
//! as even as keep-alive clients allow (the kernel's `SO_REUSEPORT` balancing would be no
//! better, and would let a second process bind the same port without an error).
//!
//! The threads' park hooks report to [`IdleWorkers`], so that the journal's commit delay
//! ends once every serving thread has run out of work.

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use metrics::Gauge;
use tokio::runtime::Handle;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::idle::IdleWorkers;

/// The serving threads; they stop when this is dropped (their connections are dropped
/// with their runtimes, so drain through [`super::serve`] first).
pub struct ServingThreads {
    threads: Vec<Thread>,
    _stop: DropGuard,
}

impl std::fmt::Debug for ServingThreads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingThreads")
            .field("threads", &self.threads.len())
            .finish_non_exhaustive()
    }
}

/// One serving thread: where to spawn onto it, and how many connections it runs (also
/// exported as `tally_http_connections_open{thread}`).
struct Thread {
    handle: Handle,
    open: Arc<AtomicUsize>,
    gauge: Gauge,
}

/// A connection counted on its thread until dropped (held by the connection's task).
pub(super) struct Open(Arc<AtomicUsize>, Gauge);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        self.1.decrement(1.0);
    }
}

impl ServingThreads {
    /// Starts `count` threads named `tally-http-N`, each running a current-thread runtime
    /// whose parking `idle` counts.
    ///
    /// # Errors
    ///
    /// If a runtime or a thread cannot be created (out of memory, a thread limit).
    pub fn start(count: NonZeroUsize, idle: &Arc<IdleWorkers>) -> std::io::Result<Self> {
        let stop = CancellationToken::new();
        let mut threads = Vec::with_capacity(count.get());
        for n in 0..count.get() {
            let runtime = idle.build(tokio::runtime::Builder::new_current_thread().enable_all())?;
            let handle = runtime.handle().clone();
            let stopped = stop.clone();
            std::thread::Builder::new()
                .name(format!("tally-http-{n}"))
                // A current-thread runtime runs its tasks only inside `block_on`.
                .spawn(move || runtime.block_on(stopped.cancelled()))?;
            threads.push(Thread {
                handle,
                open: Arc::new(AtomicUsize::new(0)),
                gauge: crate::metrics::connections_open(n),
            });
        }
        Ok(Self {
            threads,
            _stop: stop.drop_guard(),
        })
    }

    /// The thread with the fewest open connections, and the count to hold while one runs
    /// there.
    pub(super) fn pick(&self) -> (&Handle, Open) {
        let thread = self
            .threads
            .iter()
            .min_by_key(|t| t.open.load(Ordering::Relaxed))
            .expect("at least one serving thread");
        thread.open.fetch_add(1, Ordering::Relaxed);
        thread.gauge.increment(1.0);
        (
            &thread.handle,
            Open(Arc::clone(&thread.open), thread.gauge.clone()),
        )
    }
}

/// The default for `--http-threads`: one per CPU this process may use.
pub fn default_count() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(threads: &ServingThreads) -> Vec<usize> {
        threads
            .threads
            .iter()
            .map(|t| t.open.load(Ordering::Relaxed))
            .collect()
    }

    #[test]
    fn connections_go_to_the_least_loaded_thread_and_threads_stop_on_drop() {
        let idle = IdleWorkers::new();
        let threads =
            ServingThreads::start(NonZeroUsize::new(3).expect("nonzero"), &idle).expect("started");
        // Equal loads: the first thread wins, so six picks go 0, 1, 2, 0, 1, 2.
        let mut held: Vec<Open> = (0..6).map(|_| threads.pick().1).collect();
        assert_eq!(loads(&threads), [2, 2, 2]);
        // Both connections of thread 0 close: the next two go there.
        drop(held.remove(3));
        drop(held.remove(0));
        assert_eq!(loads(&threads), [0, 2, 2]);
        let first = threads.threads[0].handle.id();
        for _ in 0..2 {
            let (handle, open) = threads.pick();
            assert_eq!(handle.id(), first);
            held.push(open);
        }
        assert_eq!(loads(&threads), [2, 2, 2]);
        drop(held);
        assert_eq!(loads(&threads), [0, 0, 0]);

        // A task spawned on a thread runs there, on a thread of that name.
        let (tx, rx) = std::sync::mpsc::channel();
        threads.threads[1].handle.spawn(async move {
            let _ = tx.send(std::thread::current().name().map(str::to_owned));
        });
        let name = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("the task ran");
        assert_eq!(name.as_deref(), Some("tally-http-1"));

        // Dropped: the runtimes shut down, and a task spawned now never runs.
        let handle = threads.threads[0].handle.clone();
        drop(threads);
        std::thread::sleep(std::time::Duration::from_millis(100));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        drop(handle.spawn(async move {
            let _ = tx.send(());
        }));
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(200))
                .is_err()
        );
    }
}
