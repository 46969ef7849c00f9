//! `--request-timeout` without a timer per request.
//!
//! The obvious shape, `tokio::time::timeout` around every request, inserts an entry into
//! tokio's timer wheel and removes it again for each of them (the request future is pending
//! at least once, waiting for its body), which showed up in the `POST /increment` profile
//! at 30 s timeouts that essentially never fire. Here each *connection* owns one timer
//! instead, re-armed lazily:
//!
//! - A request writes its deadline into its connection's [`ConnClock`] (two `Cell` writes).
//! - The connection's driver ([`drive`]) keeps one `Sleep`. It arms it at the deadline of
//!   the request in flight and leaves it there while later requests come and go: deadlines
//!   only grow, so an armed time is never later than the current request's deadline. When
//!   it fires, the driver compares with the deadline in force: passed, the request is marked
//!   expired; not yet, the timer is re-armed. A busy connection thus touches the wheel about
//!   once per timeout period, not once per request.
//! - The request's future ([`Deadline::poll_expired`]) sees the mark the next time hyper
//!   polls it, which is at once: the driver polls the connection right after setting it.
//!
//! This relies on two properties of hyper's HTTP/1 server: one request at a time per
//! connection (a pipelined request is read only after the previous response), and the
//! request's future is polled from the connection's own task, so a task-local reaches it
//! without a lock, an `Arc` or a request extension. Where no driver runs (the router served
//! some other way, e.g. in a test through `tower::ServiceExt::oneshot`), [`Deadline`] falls
//! back to a timer of its own, armed only once the request is actually pending.
//!
//! Waits inside a request (the body, a journal fsync, `ack=store` waiting for the flusher)
//! are all inside the request's future, so the deadline bounds them all, as before.

use std::cell::Cell;
use std::future::poll_fn;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

tokio::task_local! {
    /// The deadline of the request in flight on this task's connection.
    static CLOCK: ConnClock;
}

/// One connection's request deadline, shared by its driver and its request in flight.
#[derive(Default)]
struct ConnClock {
    /// When the request in flight must be answered; `None` between requests.
    deadline: Cell<Option<Instant>>,
    /// Set by the driver once `deadline` has passed.
    expired: Cell<bool>,
}

/// Runs `connection` (one hyper HTTP/1 connection) with one deadline timer for all of its
/// requests.
pub async fn drive<F: Future>(connection: F) -> F::Output {
    CLOCK
        .scope(ConnClock::default(), async move {
            let mut connection = pin!(connection);
            // A `Sleep` enters the timer wheel when first polled or reset, not when built.
            let mut timer = pin!(tokio::time::sleep_until(Instant::now()));
            let mut armed: Option<Instant> = None;
            poll_fn(|cx| {
                loop {
                    if let Poll::Ready(output) = connection.as_mut().poll(cx) {
                        return Poll::Ready(output);
                    }
                    let (deadline, expired) =
                        CLOCK.with(|clock| (clock.deadline.get(), clock.expired.get()));
                    let Some(deadline) = deadline else {
                        // Idle: a timer armed earlier may still fire; that only costs a
                        // spurious poll.
                        return Poll::Pending;
                    };
                    if expired {
                        // Marked; the request answers when hyper next polls it.
                        return Poll::Pending;
                    }
                    if armed.is_none_or(|at| at > deadline) {
                        timer.as_mut().reset(deadline);
                        armed = Some(deadline);
                    }
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    armed = None;
                    if Instant::now() >= deadline {
                        CLOCK.with(|clock| clock.expired.set(true));
                    }
                    // Poll the connection again: it answers the expired request, or the
                    // loop re-arms the timer at the later deadline.
                }
            })
            .await
        })
        .await
}

/// The deadline of one request.
pub struct Deadline {
    at: Instant,
    /// `None`: the connection's driver watches the deadline. `Some`: no driver; a timer of
    /// our own, created on the first pending poll.
    own: Option<Option<Pin<Box<Sleep>>>>,
    /// Still registered with the connection's clock.
    registered: bool,
}

impl Deadline {
    /// Starts the deadline of a request that must be answered by `at`.
    pub fn start(at: Instant) -> Self {
        let on_connection = CLOCK
            .try_with(|clock| {
                clock.deadline.set(Some(at));
                clock.expired.set(false);
            })
            .is_ok();
        Self {
            at,
            own: (!on_connection).then_some(None),
            registered: on_connection,
        }
    }

    /// Whether the deadline has passed; when not, the task is woken once it does.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        match &mut self.own {
            None => CLOCK.try_with(|clock| clock.expired.get()).unwrap_or(false),
            Some(timer) => {
                let at = self.at;
                timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)))
                    .as_mut()
                    .poll(cx)
                    .is_ready()
            }
        }
    }

    /// The request is answered: the connection no longer needs to watch it.
    pub fn finish(&mut self) {
        if std::mem::take(&mut self.registered) {
            // Outside the connection's task (dropped with it) there is nothing to clear.
            let _ = CLOCK.try_with(|clock| {
                clock.deadline.set(None);
                clock.expired.set(false);
            });
        }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        // A request dropped unanswered (the client went away) ends too.
        self.finish();
    }
}
