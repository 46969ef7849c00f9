//! One wake-up per serving thread per group, instead of one per waiting request.
//!
//! Each request that waits for its group leaves a waker that the writer thread wakes once
//! the group is settled. A waker of a current-thread Tokio runtime (the serving threads,
//! `crate::http::threads`), woken from another thread, queues its task and then wakes that
//! runtime's I/O driver with a write to its eventfd: a system call per waiting request,
//! whether or not the thread sleeps (tokio 1.54, `current_thread::Handle::schedule`). With
//! 80 requests of a group on each thread, that was 80 syscalls where one would do.
//!
//! So on a serving thread a waiting request leaves its waker here, in a thread-local list,
//! and leaves the waker of this thread's relay task with the writer (once per group: the
//! writer's lists skip a waker already there). The writer wakes the relay, the relay runs
//! on its thread, and wakes the requests whose records are settled: wakes from the
//! runtime's own thread, which only queue the task. A thread with no relay (the writer's
//! users in tests, other runtimes) leaves its own waker as before.
//!
//! No lost wake-up: a request registers (its entry here, the relay's waker with the writer)
//! under the queue lock, after seeing its record unsettled, exactly as it registers its own
//! waker without a relay. The writer stores the settled position before it wakes the relay,
//! and the relay reads it after being woken; it wakes every entry at or below it, and all of
//! them once the writer is gone.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Poll, Waker};

use super::Shared;

thread_local! {
    static RELAY: RefCell<Option<Relay>> = const { RefCell::new(None) };
}

/// The relay of one thread, for one journal.
struct Relay {
    shared: Arc<Shared>,
    /// The relay task's waker: what the writer wakes.
    waker: Waker,
    /// The requests waiting on this thread: the end of each one's record, and its waker.
    waiting: Vec<(u64, Waker)>,
}

/// If this thread has a relay for `shared`, leaves `waker` with it for the record ending at
/// `end`, and returns the relay's waker, to be left with the writer instead.
pub(super) fn relay(shared: &Shared, end: u64, waker: &Waker) -> Option<Waker> {
    RELAY.with(|relay| {
        let mut relay = relay.borrow_mut();
        let relay = relay
            .as_mut()
            .filter(|r| std::ptr::eq(Arc::as_ptr(&r.shared), shared))?;
        relay.waiting.push((end, waker.clone()));
        Some(relay.waker.clone())
    })
}

/// The relay task for the calling thread: spawn one on each serving thread. It never
/// ends; dropped with its runtime, it removes the thread's relay.
pub(super) async fn run(shared: Arc<Shared>) {
    /// Removes the thread's relay when the task is dropped.
    struct Installed;
    impl Drop for Installed {
        fn drop(&mut self) {
            // `try_with`: the thread-local may already be gone if the thread is ending.
            let _ = RELAY.try_with(|relay| relay.borrow_mut().take());
        }
    }
    let _installed = Installed;
    let mut ready = Vec::new();
    std::future::poll_fn(|cx| {
        RELAY.with(|relay| {
            let mut relay = relay.borrow_mut();
            let relay = relay.get_or_insert_with(|| Relay {
                shared: Arc::clone(&shared),
                waker: cx.waker().clone(),
                waiting: Vec::new(),
            });
            let settled = shared.settled.load(Ordering::Acquire);
            let gone = shared.writer_gone.load(Ordering::Acquire);
            ready.extend(
                relay
                    .waiting
                    .extract_if(.., |(end, _)| gone || *end <= settled)
                    .map(|(_, waker)| waker),
            );
        });
        // Outside the borrow: a wake on this thread only queues its task, but a waker of
        // another runtime could run anything.
        ready.drain(..).for_each(Waker::wake);
        Poll::<()>::Pending
    })
    .await;
}
