//! The seq of the last batch the store holds for this instance, and the `ack=store` requests
//! waiting for theirs.
//!
//! A `tokio::sync::watch` channel did this before. A watch wakes every waiter on every
//! publish, and under load about half of the waiters wait for the *next* batch (they arrived
//! while the one in flight was being written): so every `ack=store` request was polled once
//! for nothing, a whole pass over its connection's task. Here each waiter is filed under the
//! seq it waits for, and publishing seq N wakes the waiters of N and below, no others. (The
//! journal files its waiters by group the same way, for the same reason.)
//!
//! On a serving thread with a relay ([`AppliedSeq::relay`], see `crate::relay`), a waiter
//! files its waker with the relay and files the relay's waker here instead, once per seq
//! per thread: a publish then wakes each serving thread once, not each request.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

/// The flusher has stopped (it was dropped at shutdown, or it was fenced: another process
/// claimed the instance id, or the store lost its claim or batches): a seq not yet applied will not be
/// applied by this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the flusher has stopped before the batch was applied")]
pub struct Closed;

/// The seq of the last batch the store applied, published by the flusher; `ack=store`
/// requests wait on it with [`AppliedSeq::wait_for`]. Share it in an `Arc`.
#[derive(Debug, Default)]
pub struct AppliedSeq {
    seq: AtomicU64,
    waiters: Mutex<Waiters>,
}

#[derive(Debug, Default)]
struct Waiters {
    /// Wakers by the seq their task waits for, each with the number of its wait.
    by_seq: BTreeMap<u64, Vec<(u64, Waker)>>,
    /// The number the next wait files its waker under.
    next_id: u64,
    /// Set by [`AppliedSeq::close`]: nothing more will be published.
    closed: bool,
}

impl AppliedSeq {
    /// Starts at `seq`, the last batch the store already holds.
    pub fn new(seq: u64) -> Self {
        Self {
            seq: AtomicU64::new(seq),
            waiters: Mutex::default(),
        }
    }

    fn waiters(&self) -> MutexGuard<'_, Waiters> {
        // Every update under the lock is a single map operation: the map is valid after a
        // panic anywhere.
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The seq of the last batch published as applied.
    pub fn get(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// Records that the store holds every batch up to `seq` and wakes those who wait for one
    /// of them.
    pub fn publish(&self, seq: u64) {
        self.seq.fetch_max(seq, Ordering::AcqRel);
        let mut waiters = self.waiters();
        let later = match seq.checked_add(1) {
            Some(next) => waiters.by_seq.split_off(&next),
            None => BTreeMap::new(),
        };
        let due = std::mem::replace(&mut waiters.by_seq, later);
        drop(waiters);
        due.into_values().flatten().for_each(|(_, w)| w.wake());
    }

    /// Nothing more will be published: every waiter whose seq is not applied gets
    /// [`Closed`], now and from now on.
    pub fn close(&self) {
        let mut waiters = self.waiters();
        waiters.closed = true;
        let all = std::mem::take(&mut waiters.by_seq);
        drop(waiters);
        all.into_values().flatten().for_each(|(_, w)| w.wake());
    }

    /// The relay task of the calling thread (see `crate::relay`): spawned on each thread
    /// that serves requests, it turns a publish's wake-ups of that thread's waiting requests
    /// into one. Never ends; drop it (with its runtime) to remove it.
    pub fn relay(self: &Arc<Self>) -> impl Future<Output = ()> + Send + 'static {
        crate::relay::run(Arc::clone(self) as _)
    }

    /// Resolves once batch `seq` is applied.
    ///
    /// # Errors
    ///
    /// [`Closed`] if the flusher stopped before it was.
    pub fn wait_for(&self, seq: u64) -> WaitFor<'_> {
        WaitFor {
            applied: self,
            seq,
            filed: None,
        }
    }
}

/// The future of [`AppliedSeq::wait_for`]. Dropped before it is ready (the request timed
/// out, or its client left), it takes its waker back out, from here or from its thread's
/// relay: while the database is down no seq is published, and wakers left behind would pile
/// up with every request that gave up. (Only a relay's own waker stays here: one per seq
/// per serving thread, and during an outage only two seqs are waited for, the batch being
/// retried and the next.)
#[must_use = "futures do nothing unless polled"]
pub struct WaitFor<'a> {
    applied: &'a AppliedSeq,
    seq: u64,
    /// Where this wait's waker is filed, until a publish or close takes it (here), or the
    /// relay wakes it.
    filed: Option<Filed>,
}

/// Where a wait's waker is filed.
#[derive(Debug, Clone, Copy)]
enum Filed {
    /// Here, under this number.
    Here(u64),
    /// With the relay of the thread that polled it, under this ticket.
    Relay(crate::relay::Ticket),
}

impl Future for WaitFor<'_> {
    type Output = Result<(), Closed>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let outcome = self.as_mut().check_or_file(cx.waker());
        if outcome.is_ready() {
            // Whoever published `seq`, or closed, took the waker with it (a relay's entry
            // goes at the relay's next poll, which that publish or close brings).
            self.filed = None;
        }
        outcome
    }
}

impl WaitFor<'_> {
    /// Ready if `seq` is applied or nothing more will be; otherwise files `waker` (once).
    fn check_or_file(&mut self, waker: &Waker) -> Poll<Result<(), Closed>> {
        if self.applied.get() >= self.seq {
            return Poll::Ready(Ok(()));
        }
        let mut waiters = self.applied.waiters();
        // `publish` stores its seq before it takes the lock: either it is visible now, or the
        // publish takes the list after the waker below is in it.
        if self.applied.get() >= self.seq {
            return Poll::Ready(Ok(()));
        }
        if waiters.closed {
            return Poll::Ready(Err(Closed));
        }
        match self.filed {
            // A repeated poll (a wake-up from elsewhere) keeps the waker it filed current.
            Some(Filed::Relay(ticket)) if crate::relay::renew(self.applied, ticket, waker) => {}
            Some(Filed::Here(id)) => {
                let list = waiters.by_seq.entry(self.seq).or_default();
                match list.iter_mut().find(|(filed, _)| *filed == id) {
                    Some((_, filed)) => filed.clone_from(waker),
                    None => list.push((id, waker.clone())),
                }
            }
            _ => {
                let id = waiters.next_id;
                waiters.next_id += 1;
                let list = waiters.by_seq.entry(self.seq).or_default();
                match crate::relay::leave(self.applied, self.seq, waker) {
                    Some((ticket, relay)) => {
                        // Once per seq per thread.
                        if !list.iter().any(|(_, filed)| filed.will_wake(&relay)) {
                            list.push((id, relay));
                        }
                        self.filed = Some(Filed::Relay(ticket));
                    }
                    None => {
                        list.push((id, waker.clone()));
                        self.filed = Some(Filed::Here(id));
                    }
                }
            }
        }
        Poll::Pending
    }
}

impl Drop for WaitFor<'_> {
    fn drop(&mut self) {
        let id = match self.filed {
            None => return,
            Some(Filed::Relay(ticket)) => {
                // The relay's own waker stays filed here: one per seq per thread, not one
                // per request that gave up.
                crate::relay::take_back(self.applied, ticket);
                return;
            }
            Some(Filed::Here(id)) => id,
        };
        let mut waiters = self.applied.waiters();
        if let Some(list) = waiters.by_seq.get_mut(&self.seq) {
            list.retain(|(filed, _)| *filed != id);
            if list.is_empty() {
                waiters.by_seq.remove(&self.seq);
            }
        }
    }
}

/// Requests wait through a relay for the applied seq: their batch's seq is their key.
impl crate::relay::Progress for AppliedSeq {
    fn reached(&self) -> u64 {
        self.get()
    }

    fn ended(&self) -> bool {
        self.waiters().closed
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::{Pin, pin};
    use std::sync::atomic::AtomicUsize;
    use std::task::{Context, Wake};
    use std::time::Duration;

    use super::*;

    /// A waker that counts its wake-ups.
    #[derive(Default)]
    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A counting waker, and how to read its count.
    fn counting() -> (Waker, impl Fn() -> usize) {
        let counter = Arc::new(Counter::default());
        let waker = Waker::from(Arc::clone(&counter));
        (waker, move || counter.0.load(Ordering::SeqCst))
    }

    fn poll(
        wait: Pin<&mut impl Future<Output = Result<(), Closed>>>,
        waker: &Waker,
    ) -> Poll<Result<(), Closed>> {
        wait.poll(&mut Context::from_waker(waker))
    }

    #[test]
    fn publishing_a_batch_wakes_its_waiters_and_not_the_next_batchs() {
        let applied = AppliedSeq::new(4);
        let ((this, this_woken), (next, next_woken)) = (counting(), counting());
        let mut waits_5 = pin!(applied.wait_for(5));
        let mut waits_6 = pin!(applied.wait_for(6));
        assert!(poll(waits_5.as_mut(), &this).is_pending());
        assert!(poll(waits_6.as_mut(), &next).is_pending());
        // A spurious poll does not file the same waker twice (it would be woken twice).
        assert!(poll(waits_5.as_mut(), &this).is_pending());

        applied.publish(5);
        assert_eq!(
            (this_woken(), next_woken()),
            (1, 0),
            "only seq 5's waiter is woken"
        );
        assert_eq!(poll(waits_5.as_mut(), &this), Poll::Ready(Ok(())));
        assert!(poll(waits_6.as_mut(), &next).is_pending());

        applied.publish(7);
        assert_eq!(next_woken(), 1);
        assert_eq!(poll(waits_6.as_mut(), &next), Poll::Ready(Ok(())));
        assert_eq!(applied.get(), 7);
    }

    #[test]
    fn a_seq_already_applied_is_ready_at_once_and_publish_never_goes_back() {
        let applied = AppliedSeq::new(9);
        applied.publish(3);
        assert_eq!(applied.get(), 9);
        let (waker, woken) = counting();
        assert_eq!(poll(pin!(applied.wait_for(9)), &waker), Poll::Ready(Ok(())));
        assert_eq!(woken(), 0);
        applied.publish(u64::MAX);
        assert_eq!(applied.get(), u64::MAX);
    }

    #[test]
    fn closing_answers_the_waiters_of_unapplied_seqs_with_closed() {
        let applied = AppliedSeq::new(1);
        let (waker, woken) = counting();
        let mut waits = pin!(applied.wait_for(2));
        assert!(poll(waits.as_mut(), &waker).is_pending());
        applied.close();
        assert_eq!(woken(), 1);
        assert_eq!(poll(waits.as_mut(), &waker), Poll::Ready(Err(Closed)));
        // After the close, a new waiter hears at once; an applied seq is still fine.
        assert_eq!(
            poll(pin!(applied.wait_for(3)), &waker),
            Poll::Ready(Err(Closed))
        );
        assert_eq!(poll(pin!(applied.wait_for(1)), &waker), Poll::Ready(Ok(())));
    }

    #[test]
    fn a_wait_dropped_before_its_seq_takes_its_waker_back() {
        let applied = AppliedSeq::new(1);
        let (waker, woken) = counting();
        let filed = |applied: &AppliedSeq| {
            applied
                .waiters()
                .by_seq
                .values()
                .map(Vec::len)
                .sum::<usize>()
        };
        {
            // As requests that time out during an outage: no publish comes.
            let mut gives_up = pin!(applied.wait_for(2));
            assert!(poll(gives_up.as_mut(), &waker).is_pending());
            assert!(poll(gives_up.as_mut(), &waker).is_pending());
            let mut stays = Box::pin(applied.wait_for(2));
            assert!(poll(stays.as_mut(), &waker).is_pending());
            assert_eq!(
                filed(&applied),
                2,
                "one waker per wait, however often polled"
            );
            drop(stays);
            assert_eq!(filed(&applied), 1);
        }
        assert_eq!(filed(&applied), 0, "nothing left behind");
        assert!(applied.waiters().by_seq.is_empty());
        applied.publish(2);
        assert_eq!(woken(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiters_on_other_threads_are_woken_by_the_publish_of_their_seq() {
        let applied = Arc::new(AppliedSeq::new(0));
        let waiters: Vec<_> = (1..=50u64)
            .map(|i| {
                let applied = Arc::clone(&applied);
                tokio::spawn(async move { applied.wait_for(i % 5 + 1).await })
            })
            .collect();
        for seq in 1..=5 {
            tokio::task::yield_now().await;
            applied.publish(seq);
        }
        for waiter in waiters {
            let outcome = tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("every waiter is woken")
                .expect("the task does not panic");
            assert_eq!(outcome, Ok(()));
        }
    }

    /// A serving thread's runtime, with the relay of `applied` installed.
    fn relay_thread(applied: &Arc<AppliedSeq>) -> tokio::runtime::Runtime {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        runtime.spawn(applied.relay());
        // The relay installs itself on its first poll.
        runtime.block_on(tokio::task::yield_now());
        runtime
    }

    fn filed(applied: &AppliedSeq) -> usize {
        applied.waiters().by_seq.values().map(Vec::len).sum()
    }

    #[test]
    fn requests_on_a_relay_thread_file_one_waker_per_seq_and_all_complete() {
        let applied = Arc::new(AppliedSeq::new(1));
        let runtime = relay_thread(&applied);
        runtime.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for i in 0..200u64 {
                let applied = Arc::clone(&applied);
                set.spawn(async move { applied.wait_for(2 + i % 2).await });
            }
            // Every task files its waker on its first poll (the runtime polls 61 tasks
            // between two polls of this one).
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            assert_eq!(crate::relay::waiting(&*applied), Some(200));
            assert_eq!(filed(&applied), 2, "the relay's waker, once per seq");
            // Published from another thread, as the flusher does.
            let publisher = Arc::clone(&applied);
            std::thread::spawn(move || publisher.publish(3))
                .join()
                .expect("publish");
            let done = tokio::time::timeout(Duration::from_secs(5), set.join_all())
                .await
                .expect("every waiter is woken through the relay");
            assert!(done.into_iter().all(|outcome| outcome == Ok(())));
            assert_eq!(crate::relay::waiting(&*applied), Some(0));
        });
    }

    #[test]
    fn a_wait_dropped_on_a_relay_thread_takes_its_waker_back_and_close_reaches_the_rest() {
        let applied = Arc::new(AppliedSeq::new(1));
        let runtime = relay_thread(&applied);
        runtime.block_on(async {
            // As requests that time out during an outage: no publish comes.
            for _ in 0..50 {
                let gave_up = tokio::time::timeout(Duration::ZERO, applied.wait_for(2)).await;
                assert!(gave_up.is_err(), "seq 2 is not applied");
            }
            assert_eq!(
                crate::relay::waiting(&*applied),
                Some(0),
                "nothing left behind"
            );
            assert_eq!(filed(&applied), 1, "only the relay's own waker");

            let stays = tokio::spawn({
                let applied = Arc::clone(&applied);
                async move { applied.wait_for(2).await }
            });
            tokio::task::yield_now().await;
            assert_eq!(crate::relay::waiting(&*applied), Some(1));
            let closer = Arc::clone(&applied);
            std::thread::spawn(move || closer.close())
                .join()
                .expect("close");
            let outcome = tokio::time::timeout(Duration::from_secs(5), stays)
                .await
                .expect("the close reaches a waiter through the relay")
                .expect("the task does not panic");
            assert_eq!(outcome, Err(Closed));
        });
        // The relay is gone with its runtime: a wait on this thread files its own waker.
        drop(runtime);
        assert_eq!(crate::relay::waiting(&*applied), None);
    }

    #[test]
    fn a_wait_polled_on_one_relay_thread_and_dropped_on_another_leaves_the_others_waiters_alone() {
        let applied = Arc::new(AppliedSeq::new(1));
        let runtime = relay_thread(&applied);
        // Filed with this thread's relay under its first ticket...
        let mut moved = Box::pin(applied.wait_for(2));
        runtime.block_on(std::future::poll_fn(|cx| {
            assert!(moved.as_mut().poll(cx).is_pending());
            Poll::Ready(())
        }));
        assert_eq!(crate::relay::waiting(&*applied), Some(1));
        let applied = &applied;
        std::thread::scope(|scope| {
            scope.spawn(move || {
                let runtime = relay_thread(applied);
                runtime.block_on(async {
                    // ... and a waiter on another relay thread, under that relay's first.
                    let other = tokio::spawn({
                        let applied = Arc::clone(applied);
                        async move { applied.wait_for(3).await }
                    });
                    tokio::task::yield_now().await;
                    assert_eq!(crate::relay::waiting(&**applied), Some(1));
                    // A future moved between threads (a multi-thread runtime) and dropped.
                    drop(moved);
                    assert_eq!(
                        crate::relay::waiting(&**applied),
                        Some(1),
                        "the other thread's waiter is still filed"
                    );
                    applied.publish(3);
                    let outcome = tokio::time::timeout(Duration::from_secs(5), other)
                        .await
                        .expect("the other waiter is woken")
                        .expect("the task does not panic");
                    assert_eq!(outcome, Ok(()));
                });
            });
        });
    }
}
