//! Shutdown: which signal starts it, and the order in which tally drains.
//!
//! The drain order, each step logged at info by [`crate::startup::App::run_until`]:
//! 1. SIGTERM or SIGINT arrives: the listener closes, no new connection is accepted.
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

/// Resolves at the first SIGINT or SIGTERM, and arms the second-signal escape hatch.
pub async fn signal() {
    wait_for_signal().await;
    tracing::info!("Shutdown requested; draining. Send the signal again to exit at once.");
    tokio::spawn(async {
        wait_for_signal().await;
        tracing::warn!("Second signal: exiting without draining.");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "Cannot listen for SIGINT.");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "Cannot listen for SIGTERM.");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
