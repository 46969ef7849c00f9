//! Scheduling policy for the threads that write to disk on behalf of waiting requests (the
//! journal writer thread, the SQLite store's writes), so that their wake-ups do not preempt the
//! Tokio workers serving requests.
//!
//! Under `SCHED_BATCH` the scheduler treats a thread as CPU-bound: when it becomes runnable
//! (its condition variable, its `fsync` or its blocking-pool job returns) it runs when a core
//! comes free or at the next tick, instead of pushing the running worker off its core at
//! once. With nothing else to run, it still gets an idle core at once. Under load those
//! preemptions were most of the context switches such a thread added: for the journal writer,
//! 0.15 → 0.10 switches per request at 400 clients, throughput and p99 level
//! (`side-by-side.sh`, docs/benchmarks.md).
//! Best effort: a sandbox that forbids the call leaves the thread as it was.

use std::io;

/// Sets the calling thread's policy; false (and a debug line) if the kernel refuses.
fn set_policy(policy: libc::c_int) -> bool {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `sched_setscheduler` reads `param` only; pid 0 is the calling thread.
    if unsafe { libc::sched_setscheduler(0, policy, &param) } != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), policy, "Cannot change the thread's scheduling policy; it keeps the one it has.");
        return false;
    }
    true
}

/// Puts the calling thread, for good, under `SCHED_BATCH` (a thread of its own, such as the
/// journal writer).
pub fn yield_to_requests() {
    set_policy(libc::SCHED_BATCH);
}

/// Puts the calling thread under `SCHED_BATCH` until dropped, then back under the default
/// policy: for a job on Tokio's blocking pool, whose threads run other jobs too (on a thread
/// already under it, such as the flusher's own, it changes nothing).
pub(crate) struct BatchScope {
    changed: bool,
}

impl BatchScope {
    /// Enters `SCHED_BATCH` if the thread is under the default policy (a thread a user or a
    /// sandbox put elsewhere is left as it is).
    pub(crate) fn enter() -> Self {
        // SAFETY: no arguments; pid 0 is the calling thread.
        let current = unsafe { libc::sched_getscheduler(0) };
        Self {
            changed: current == libc::SCHED_OTHER && set_policy(libc::SCHED_BATCH),
        }
    }
}

impl Drop for BatchScope {
    fn drop(&mut self) {
        if self.changed {
            set_policy(libc::SCHED_OTHER);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> libc::c_int {
        // SAFETY: no arguments; pid 0 is the calling thread.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[test]
    fn a_batch_scope_restores_the_default_policy() {
        std::thread::spawn(|| {
            // A thread inherits its creator's policy; start from the default whatever ran us.
            assert!(set_policy(libc::SCHED_OTHER));
            {
                let _scope = BatchScope::enter();
                assert_eq!(policy(), libc::SCHED_BATCH);
            }
            assert_eq!(policy(), libc::SCHED_OTHER);
        })
        .join()
        .expect("the test thread panicked");
    }

    #[test]
    fn a_batch_scope_leaves_a_policy_set_elsewhere() {
        std::thread::spawn(|| {
            yield_to_requests();
            {
                let _scope = BatchScope::enter();
            }
            assert_eq!(policy(), libc::SCHED_BATCH);
        })
        .join()
        .expect("the test thread panicked");
    }
}
