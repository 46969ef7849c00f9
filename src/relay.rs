//! One wake-up per serving thread per event, instead of one per waiting request.
//!
//! Requests wait for something another thread does: the journal's committer to settle their
//! group (`ack=journal`), the flusher to apply their batch (`ack=store`). Each leaves a
//! waker that the other thread wakes. A waker of a current-thread Tokio runtime (the
//! serving threads, `crate::http::threads`), woken from another thread, queues its task and
//! then wakes that runtime's I/O driver with a write to its eventfd: a system call per
//! waiting request, whether or not the thread sleeps (tokio 1.54,
//! `current_thread::Handle::schedule`). With 80 requests of a group on each thread, that was
//! 80 syscalls where one would do.
//!
//! So on a serving thread a waiting request leaves its waker here, in a thread-local list,
//! and leaves the waker of this thread's relay task with the other thread instead (once per
//! event: the other side skips a waker already there). The other thread wakes the relay,
//! the relay runs on its own thread and wakes the requests whose key is reached: wakes from
//! the runtime's own thread, which only queue the task. A thread with no relay (tests,
//! other runtimes) leaves the request's own waker as before.
//!
//! No lost wake-up: a request registers both wakers (its own here, the relay's with the
//! source) under the source's lock, after seeing its key not reached, exactly as it would
//! register its own waker without a relay. The source stores its new position before it
//! wakes the relay, and the relay reads it after being woken; it wakes every entry at or
//! below it, and all of them once the source has ended. The source's side of this: the
//! relay's waker, once left under a key, stays there until that key is reached or the
//! source ends, so a later request with the same key may skip leaving it again.
//!
//! Written by hand: what it saves is specific to how Tokio's current-thread runtime wakes
//! itself, and no crate offers a thread-local fan-out of wakers.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Poll, Waker};

/// What requests wait on through a relay: a position that only grows, and an end after
/// which it grows no more.
pub(crate) trait Progress: Send + Sync + 'static {
    /// Every key at or below this has been reached.
    fn reached(&self) -> u64;
    /// Nothing more will be reached: every waiter is woken, to find that out.
    fn ended(&self) -> bool;
}

thread_local! {
    static RELAYS: RefCell<Vec<Relay>> = const { RefCell::new(Vec::new()) };
}

/// Numbers the relays of the process, so that a ticket names the relay that issued it.
static RELAY_IDS: AtomicU64 = AtomicU64::new(0);

/// What a waiter holds to [`renew`] or [`take_back`] the waker it left with a relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket {
    /// The relay that issued it: a future polled on one thread and then on another (a
    /// multi-thread runtime) must not touch the second thread's entries.
    relay: u64,
    number: u64,
}

/// The relay of one thread, for one source.
struct Relay {
    id: u64,
    source: Arc<dyn Progress>,
    /// The relay task's waker: what the source wakes.
    waker: Waker,
    /// The requests waiting on this thread: the key each waits for, its ticket's number,
    /// its waker.
    waiting: Vec<(u64, u64, Waker)>,
    next_number: u64,
}

/// Runs `f` on this thread's relay for `source`, if there is one (and it is not in use: a
/// waker's clone or drop is foreign code, which could in principle come back here).
fn with_relay<T>(source: &dyn Progress, f: impl FnOnce(&mut Relay) -> T) -> Option<T> {
    RELAYS
        .try_with(|relays| {
            let mut relays = relays.try_borrow_mut().ok()?;
            let relay = relays
                .iter_mut()
                .find(|r| std::ptr::addr_eq(Arc::as_ptr(&r.source), source))?;
            Some(f(relay))
        })
        .ok()
        .flatten()
}

/// If this thread has a relay for `source`, leaves `waker` with it, to be woken once `key`
/// is reached. Returns the ticket to [`renew`] or [`take_back`] it with, and the relay's
/// waker, to be left with `source` instead.
pub(crate) fn leave(source: &dyn Progress, key: u64, waker: &Waker) -> Option<(Ticket, Waker)> {
    with_relay(source, |relay| {
        let number = relay.next_number;
        relay.next_number += 1;
        relay.waiting.push((key, number, waker.clone()));
        let ticket = Ticket {
            relay: relay.id,
            number,
        };
        (ticket, relay.waker.clone())
    })
}

/// Keeps the waker left under `ticket` current (a repeated poll). False if this thread's
/// relay does not hold it: it was woken, or it was left with another thread's relay.
pub(crate) fn renew(source: &dyn Progress, ticket: Ticket, waker: &Waker) -> bool {
    with_relay(source, |relay| {
        if relay.id != ticket.relay {
            return false;
        }
        let entry = relay
            .waiting
            .iter_mut()
            .find(|(_, n, _)| *n == ticket.number);
        entry.map(|(_, _, left)| left.clone_from(waker)).is_some()
    })
    .unwrap_or(false)
}

/// Takes back the waker left under `ticket` (its wait was dropped before its key was
/// reached), if this thread's relay still holds it.
pub(crate) fn take_back(source: &dyn Progress, ticket: Ticket) {
    // Taken out of the relay, dropped outside its borrow.
    let taken = with_relay(source, |relay| {
        if relay.id != ticket.relay {
            return None;
        }
        let at = relay
            .waiting
            .iter()
            .position(|(_, n, _)| *n == ticket.number)?;
        Some(relay.waiting.swap_remove(at))
    });
    drop(taken);
}

/// How many requests wait with this thread's relay for `source` (`None`: it has none).
#[cfg(test)]
pub(crate) fn waiting(source: &dyn Progress) -> Option<usize> {
    with_relay(source, |relay| relay.waiting.len())
}

/// The relay task for the calling thread: spawn one per source on each serving thread. It
/// never ends; dropped with its runtime, it removes the thread's relay.
pub(crate) async fn run(source: Arc<dyn Progress>) {
    /// Removes the thread's relay for `source` when the task is dropped.
    struct Installed(Arc<dyn Progress>);
    impl Drop for Installed {
        fn drop(&mut self) {
            // `try_with`: the thread-local may already be gone if the thread is ending.
            let removed = RELAYS.try_with(|relays| {
                let mut relays = relays.try_borrow_mut().ok()?;
                let at = relays
                    .iter()
                    .position(|r| Arc::ptr_eq(&r.source, &self.0))?;
                Some(relays.swap_remove(at))
            });
            drop(removed);
        }
    }
    let _installed = Installed(Arc::clone(&source));
    let mut ready = Vec::new();
    let mut installed = false;
    std::future::poll_fn(|cx| {
        if !installed {
            // The first poll: nothing can be waiting on a relay not yet installed.
            // Should the thread-local be unusable, the relay stays out: requests on this
            // thread then leave their own wakers.
            let _ = RELAYS.try_with(|relays| {
                if let Ok(mut relays) = relays.try_borrow_mut() {
                    relays.push(Relay {
                        id: RELAY_IDS.fetch_add(1, Ordering::Relaxed),
                        source: Arc::clone(&source),
                        waker: cx.waker().clone(),
                        waiting: Vec::new(),
                        next_number: 0,
                    });
                }
            });
            installed = true;
            return Poll::Pending;
        }
        with_relay(&*source, |relay| {
            let reached = source.reached();
            let ended = source.ended();
            ready.extend(
                relay
                    .waiting
                    .extract_if(.., |(key, _, _)| ended || *key <= reached)
                    .map(|(_, _, waker)| waker),
            );
        });
        // Outside the borrow: a wake on this thread only queues its task, but a waker of
        // another runtime could run anything.
        ready.drain(..).for_each(Waker::wake);
        Poll::<()>::Pending
    })
    .await;
}
