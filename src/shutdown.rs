//! Shutdown: which signal starts it, and the order in which tally drains.
//!
//! The drain order, each step logged at info by [`crate::startup::App::run_until`]:
//! 1. SIGTERM or SIGINT arrives, or the flusher finds that the store has gone back in time
//!    and only a new start can go on (it then notes why in the data directory, for the next
//!    start to report; the drain below ends with exit 1, and a signal during it is heard as
//!    during any drain: the first is logged, a second exits at once). With
//!    `--shutdown-delay`, `/readyz` answers 503 "draining" for that long while everything
//!    is still served, so that a load balancer takes the instance out first. Then the
//!    listener closes: no new connection is accepted.
//! 2. Requests in flight finish (bounded by `--shutdown-timeout`). The flusher still runs
//!    meanwhile, so `ack=store` requests get their commit.
//! 3. The flusher is told to stop: it seals what is pending and writes batches until
//!    nothing is left (bounded by `--shutdown-timeout`).
//! 4. The journal is closed: every segment covered by the store is removed, so a clean
//!    restart replays nothing.
//! 5. The process exits 0 (1 if the final flush failed; the journal keeps what it has).
//!
//! A second signal during the drain exits at once with status 130; with `ack=journal` the
//! journal still holds every acknowledged delta.

use tokio::signal::unix::{Signal, SignalKind};

/// Installs the SIGINT and SIGTERM handlers now and returns a future that resolves at the
/// first of them, then arms the second-signal escape hatch.
///
/// Installing is eager on purpose: until a handler is installed, SIGTERM's default action
/// kills the process. A supervisor or test that signals right after `/healthz` answers must
/// get a drain, not a kill, so `main` calls this before it starts serving.
///
/// # Errors
///
/// If the signal handlers cannot be installed.
pub fn signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    let mut signals = Signals::install()?;
    Ok(async move {
        signals.recv().await;
        drop(signals);
        // Fresh streams, installed before the log line invites the second signal: they see
        // only signals sent from now on.
        let again = Signals::install();
        tracing::info!("Shutdown requested; draining. Send the signal again to exit at once.");
        tokio::spawn(async move {
            let Ok(mut again) = again else {
                return;
            };
            again.recv().await;
            tracing::warn!("Second signal: exiting without draining.");
            std::process::exit(130);
        });
    })
}

/// The two signals that stop tally.
struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: tokio::signal::unix::signal(SignalKind::terminate())?,
            int: tokio::signal::unix::signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves at the next SIGTERM or SIGINT.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
