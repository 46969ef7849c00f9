//! Knows when every thread serving requests (the workers of the Tokio runtimes that run
//! connections, [`crate::http::threads`]) has run out of work and is about to park: a sign
//! that the requests that were in the process have been served, so few more appends to the
//! journal are coming.
//!
//! The journal uses it ([`crate::journal::Journal::follow_workers`]): the serving thread
//! that parks last commits the group of records waiting to be written itself, on its own
//! thread, before it parks (every request it holds is waiting, so it has nothing else to
//! do); any thread that parks commits a group that has waited out the commit delay. It is a
//! heuristic, not a proof: Tokio calls the park hook before the worker's last look at its
//! queues and sockets, so requests that arrived a moment earlier go to the next group.
//!
//! Tokio reports parking through [`tokio::runtime::Builder::on_thread_park`] and
//! [`tokio::runtime::Builder::on_thread_unpark`], called in pairs on worker threads only;
//! [`IdleWorkers::build`] sets both.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// Counts the parked workers of its runtimes and calls one callback as each parks, telling
/// it whether it is the last.
#[derive(Default)]
pub struct IdleWorkers {
    /// Workers of the runtimes built so far; 0 until [`IdleWorkers::add_workers`], so never
    /// idle before.
    workers: AtomicUsize,
    parked: AtomicUsize,
    on_park: OnceLock<Box<dyn Fn(bool) + Send + Sync>>,
}

impl IdleWorkers {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Builds the runtime `builder` describes, with the park hooks that keep count. Several
    /// runtimes may report to one `IdleWorkers` (one current-thread runtime per serving
    /// thread): it is idle once all their workers are parked.
    ///
    /// # Errors
    ///
    /// If the runtime cannot be built (its threads cannot be spawned).
    pub fn build(
        self: &Arc<Self>,
        builder: &mut tokio::runtime::Builder,
    ) -> std::io::Result<tokio::runtime::Runtime> {
        let parking = Arc::clone(self);
        let unparked = Arc::clone(self);
        let runtime = builder
            .on_thread_park(move || parking.parking())
            .on_thread_unpark(move || unparked.unparked())
            .build()?;
        self.add_workers(runtime.metrics().num_workers());
        Ok(runtime)
    }

    fn add_workers(&self, workers: usize) {
        self.workers.fetch_add(workers, Ordering::SeqCst);
    }

    /// Sets what to call each time a worker is about to park (once; later calls are
    /// ignored), with `true` when it is the last busy one. Called on that worker's thread,
    /// which has nothing else to run; the worker counts as parked meanwhile.
    pub fn on_park(&self, callback: impl Fn(bool) + Send + Sync + 'static) {
        let _ = self.on_park.set(Box::new(callback));
    }

    /// Every worker is parked. Sequentially consistent with the count the park hook
    /// updates, so a caller that publishes a flag (SeqCst) before asking, while the
    /// callback reads that flag, cannot miss both.
    pub fn is_idle(&self) -> bool {
        let workers = self.workers.load(Ordering::SeqCst);
        workers > 0 && self.parked.load(Ordering::SeqCst) >= workers
    }

    fn parking(&self) {
        let parked = self.parked.fetch_add(1, Ordering::SeqCst) + 1;
        if let Some(callback) = self.on_park.get() {
            callback(parked == self.workers.load(Ordering::SeqCst));
        }
    }

    fn unparked(&self) {
        self.parked.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    use super::*;

    #[test]
    fn idle_once_every_worker_of_a_real_runtime_parks_and_busy_while_one_works() {
        let (idle, called) = counting();
        let runtime = idle
            .build(tokio::runtime::Builder::new_multi_thread().worker_threads(2))
            .expect("a runtime");
        // Nothing to run: both workers park, and the last one calls back. (Both may have
        // parked before `build` knew the worker count; a no-op task makes one park again.)
        runtime.spawn(async {});
        wait_until(|| idle.is_idle() && called.load(Ordering::SeqCst) >= 1);

        // A task that spins keeps one worker busy: not idle while it runs.
        busy_while_a_task_spins(&idle, runtime.handle(), &called);
    }

    #[test]
    fn several_runtimes_are_idle_only_once_all_of_them_park() {
        let (idle, called) = counting();
        // Two current-thread runtimes, each run by a thread of its own, as the serving
        // threads are.
        let stop = tokio_util::sync::CancellationToken::new();
        let runtimes: Vec<_> = (0..2)
            .map(|_| {
                let runtime = idle
                    .build(tokio::runtime::Builder::new_current_thread().enable_all())
                    .expect("a runtime");
                let handle = runtime.handle().clone();
                let stopped = stop.clone();
                let thread = std::thread::spawn(move || runtime.block_on(stopped.cancelled()));
                (handle, thread)
            })
            .collect();
        wait_until(|| idle.is_idle());

        // One spins, the other stays parked: not idle.
        busy_while_a_task_spins(&idle, &runtimes[0].0, &called);
        stop.cancel();
        for (_, thread) in runtimes {
            thread.join().expect("the runtime's thread ends");
        }
    }

    #[test]
    fn never_idle_before_the_worker_count_is_known() {
        let idle = IdleWorkers::new();
        idle.parking();
        assert!(!idle.is_idle());
        idle.add_workers(1);
        assert!(idle.is_idle());
        idle.unparked();
        assert!(!idle.is_idle());
    }

    /// An `IdleWorkers` whose callback counts its calls, and the count.
    fn counting() -> (Arc<IdleWorkers>, Arc<AtomicUsize>) {
        let idle = IdleWorkers::new();
        let called = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&called);
        idle.on_park(move |last| {
            if last {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        });
        (idle, called)
    }

    /// Spawns a task that spins on `runtime`; checks that `idle` is busy while it spins,
    /// then idle again, with a callback, once it stops.
    fn busy_while_a_task_spins(
        idle: &IdleWorkers,
        runtime: &tokio::runtime::Handle,
        called: &AtomicUsize,
    ) {
        let stop = Arc::new(AtomicBool::new(false));
        let spinning = Arc::new(AtomicBool::new(false));
        let (stop2, spinning2) = (Arc::clone(&stop), Arc::clone(&spinning));
        runtime.spawn(async move {
            spinning2.store(true, Ordering::SeqCst);
            while !stop2.load(Ordering::SeqCst) {
                std::hint::spin_loop();
            }
        });
        wait_until(|| spinning.load(Ordering::SeqCst));
        for _ in 0..20 {
            assert!(!idle.is_idle(), "a worker is running a task");
            std::thread::sleep(Duration::from_millis(1));
        }
        let before = called.load(Ordering::SeqCst);
        stop.store(true, Ordering::SeqCst);
        wait_until(|| idle.is_idle() && called.load(Ordering::SeqCst) > before);
    }

    fn wait_until(mut done: impl FnMut() -> bool) {
        for _ in 0..2000 {
            if done() {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("condition not reached within 2 s");
    }
}
