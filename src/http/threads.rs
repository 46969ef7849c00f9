//! The threads that run HTTP connections: one current-thread Tokio runtime each (thread per
//! core), fed by the accept loop of [`super::serve`].
//!
//! Why not the workers of one multi-thread runtime: under `ack=journal` every request is
//! woken when its journal group is durable, mostly by another thread (the one that committed
//! the group, once its fsync returns). On a multi-thread
//! runtime such a wake-up goes through the shared injection queue and resumes the
//! connection on whichever worker takes it, with its state out of that core's cache, and
//! that worker may have to be woken. Here a connection lives on one thread from accept to
//! close: its socket is registered with that thread's reactor, its timer sits in that
//! thread's wheel, and every wake-up, the journal's included, runs it there. Measured with
//! `tally-bench/bench/side-by-side.sh` (docs/benchmarks.md): on an Intel Xeon, a no-op whose
//! replies another thread releases went from 0.80× to 0.87× of a plain axum no-op, and a
//! prototype of tally's defaults from 0.76× to 0.81×; on a noisier AMD EPYC, this code gave
//! the journal 0.79 → 0.82× and 0.76 → 0.77×, `ack=memory` 0.88 → 0.96×.
//!
//! No work stealing: a thread with more busy connections than another stays busier. The
//! accept loop gives each new connection to the thread with the fewest open ones. (The
//! kernel's `SO_REUSEPORT` spreads connections by a hash, not by load, and would let a
//! second process bind the same port without an error.)
//!
//! The threads' park hooks report to [`IdleWorkers`], so that the serving thread that runs
//! out of work last commits the journal's group itself (`Journal::follow_workers`).

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use metrics::Gauge;
use tokio::runtime::Handle;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::Ack;
use crate::idle::IdleWorkers;

/// The serving threads. [`ServingThreads::shut_down`] stops them and waits until they have
/// ended; dropping this stops them without waiting. Either way their remaining connections
/// are dropped with their runtimes, so drain through [`super::serve`] first.
pub struct ServingThreads {
    threads: Vec<Thread>,
    /// The threads, joined by [`ServingThreads::shut_down`].
    joins: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
    stop: DropGuard,
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
    /// whose parking `idle` counts. Waits until each has built its runtime (a thread start,
    /// well under a millisecond).
    ///
    /// # Errors
    ///
    /// If a runtime or a thread cannot be created (out of memory, a thread or process
    /// limit); the threads already started are stopped.
    pub fn start(count: NonZeroUsize, idle: &Arc<IdleWorkers>) -> std::io::Result<Self> {
        let stop = CancellationToken::new();
        // Cancels the threads already started if a later one fails.
        let guard = stop.clone().drop_guard();
        let mut threads = Vec::with_capacity(count.get());
        let mut joins = Vec::with_capacity(count.get());
        for n in 0..count.get() {
            let idle = Arc::clone(idle);
            let (handle, join) =
                runtime_thread(format!("tally-http-{n}"), stop.clone(), move || {
                    idle.build(tokio::runtime::Builder::new_current_thread().enable_all())
                })?;
            joins.push(join);
            threads.push(Thread {
                handle,
                open: Arc::new(AtomicUsize::new(0)),
                gauge: crate::metrics::connections_open(n),
            });
        }
        Ok(Self {
            threads,
            joins: std::sync::Mutex::new(joins),
            stop: guard,
        })
    }

    /// Stops the threads and waits until each has dropped its runtime and ended, so that no
    /// request handler runs any more (on the shutdown-timeout path, the ones abandoned).
    pub async fn shut_down(&self) {
        self.stop.token().cancel();
        let joins = std::mem::take(
            &mut *self
                .joins
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        join(joins).await;
    }

    /// Spawns the task `task` makes on every serving thread.
    pub fn spawn_on_each<F>(&self, task: impl Fn() -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        for thread in &self.threads {
            drop(thread.handle.spawn(task()));
        }
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

/// Starts a thread named `name` that builds a current-thread runtime with `build` and runs
/// it until `stop` is cancelled; returns where to spawn onto it once the runtime is built
/// (a thread start, well under a millisecond), and the thread to join. The runtime is built
/// on its own thread: if the thread cannot start, nothing but the closure is dropped (a
/// runtime must not be dropped in async code).
///
/// # Errors
///
/// If the thread cannot be started or `build` fails.
pub(crate) fn runtime_thread(
    name: String,
    stop: CancellationToken,
    build: impl FnOnce() -> std::io::Result<tokio::runtime::Runtime> + Send + 'static,
) -> std::io::Result<(Handle, std::thread::JoinHandle<()>)> {
    let (started, handle) = std::sync::mpsc::sync_channel(1);
    let join = std::thread::Builder::new()
        .name(name)
        .spawn(move || match build() {
            Ok(runtime) => {
                let _ = started.send(Ok(runtime.handle().clone()));
                // A current-thread runtime runs its tasks only inside `block_on`.
                runtime.block_on(stop.cancelled());
            }
            Err(e) => {
                let _ = started.send(Err(e));
            }
        })?;
    let handle = handle
        .recv()
        .map_err(|_| std::io::Error::other("a thread ended before its runtime started"))??;
    Ok((handle, join))
}

/// Waits until each of `threads` has ended. Joining blocks: on the blocking pool. A thread
/// that panicked has ended too.
pub(crate) async fn join(threads: Vec<std::thread::JoinHandle<()>>) {
    let _ =
        tokio::task::spawn_blocking(move || threads.into_iter().for_each(|j| drop(j.join()))).await;
}

/// The default for `--http-threads`: one per CPU this process may use ([`per_cpu`]), and
/// under `--ack journal` one more. There the serving thread that runs out of work last
/// commits the journal's group itself and sleeps in its `fdatasync`
/// (`Journal::follow_workers`), and its CPU would idle meanwhile: no other thread runs its
/// connections. One thread more keeps every CPU busy then. Measured with
/// `tally-bench/bench/side-by-side.sh` on 2 cores (docs/benchmarks.md, session of
/// 2026-12-07 10:07 UTC): `ack=journal` on 1,000 keys 119–122k → 128–133k req/s (0.74–0.76×
/// → 0.78–0.82× of a plain axum no-op); `ack=memory` and `ack=store` gained nothing from
/// it, having no thread that sleeps on a disk.
pub fn default_count(ack: Ack) -> NonZeroUsize {
    match ack {
        Ack::Journal => per_cpu().saturating_add(1),
        Ack::Memory | Ack::Store => per_cpu(),
    }
}

/// One per CPU this process may use.
pub fn per_cpu() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::TryRecvError;

    use super::*;

    #[test]
    fn under_ack_journal_one_serving_thread_more_than_cpus_by_default() {
        assert_eq!(default_count(Ack::Journal).get(), per_cpu().get() + 1);
        assert_eq!(default_count(Ack::Memory), per_cpu());
        assert_eq!(default_count(Ack::Store), per_cpu());
        let config = |args: &[&str]| {
            <crate::config::Config as clap::Parser>::parse_from(args).http_threads()
        };
        assert_eq!(
            config(&["tally"]),
            default_count(Ack::Journal),
            "journal is the default"
        );
        assert_eq!(config(&["tally", "--ack", "memory"]), per_cpu());
        assert_eq!(
            config(&["tally", "--http-threads", "5"]).get(),
            5,
            "the flag wins"
        );
    }

    fn loads(threads: &ServingThreads) -> Vec<usize> {
        threads
            .threads
            .iter()
            .map(|t| t.open.load(Ordering::Relaxed))
            .collect()
    }

    #[test]
    fn connections_go_to_the_least_loaded_thread_and_shut_down_drops_what_runs_there() {
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

        // A task that never ends (a handler abandoned at the shutdown timeout) is dropped
        // by the time `shut_down` returns; a task spawned afterwards is dropped unrun.
        let (held, abandoned) = std::sync::mpsc::channel::<()>();
        threads.threads[0].handle.spawn(async move {
            let _held = held;
            std::future::pending::<()>().await;
        });
        let handle = threads.threads[0].handle.clone();
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
            .block_on(threads.shut_down());
        assert_eq!(abandoned.try_recv(), Err(TryRecvError::Disconnected));
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        drop(handle.spawn(async move {
            let _ = tx.send(());
        }));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
    }
}
