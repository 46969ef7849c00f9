//! The `tally` binary: parse and check the configuration, start logging, run until a
//! signal.
//!
//! Exit codes follow clap's: 2 for a configuration the operator must fix (clap's own parse
//! errors and [`Config::validate`]'s, each one `error: …` line on stderr naming the flag), 1
//! for a failure while starting or running (one log record with the whole context chain).

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tally::causes::Causes;
use tally::config::Config;
use tally::startup::App;
use tally::{fds, shutdown, telemetry};
use tokio::signal::unix::SignalKind;

/// mimalloc instead of glibc's malloc: under the journal's load, where every request's
/// buffers outlive other requests' allocations while it waits for its fsync, glibc spent
/// ~10% of the workers' time in its slow paths (`malloc_consolidate`, `unlink_chunk`), and it
/// keeps freed memory after a burst of large bodies. Figures in docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The exit code of a usage error, the same as clap's.
const USAGE_ERROR: u8 = 2;

fn main() -> ExitCode {
    let config = Config::parse();
    // Checked before logging starts: a bad flag is a usage error, printed like clap's own
    // (one line, no timestamp or level), not a log record an operator has to decode.
    if let Err(e) = config.validate() {
        eprintln!("error: {e}");
        return ExitCode::from(USAGE_ERROR);
    }
    telemetry::init(config.log.format);
    // One thread: start-up, the accept loop, store calls and, on PostgreSQL, the flusher
    // with its connections' tasks. Connections run on serving threads of their own
    // (`tally::http::threads`), and on SQLite the flusher has a thread of its own. On one
    // thread, the flusher and the connection task it talks to wake each other without a
    // second worker to wake or steal from: under `ack=store` on PostgreSQL, 0.097-0.112 ->
    // 0.074-0.092 context switches per request against two workers, throughput level, and on
    // 100,000 keys p99 60-131 -> 15-23 ms (docs/benchmarks.md).
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the Tokio runtime")
        .and_then(|runtime| runtime.block_on(run(config)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The context chain on one line ("cannot …: because …"), each cause once.
            tracing::error!(error = %Causes(e.as_ref()), "Tally stopped with an error.");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    // Before anything can answer /healthz: a SIGTERM from then on drains instead of killing.
    let stop = shutdown::signal().context("cannot install the SIGTERM/SIGINT handlers")?;
    // Everything tally creates (data directory, journal, SQLite files, lock, instance id) is
    // its own: 0700 directories and 0600 files, whatever umask it was started with.
    // SAFETY: umask only swaps the process's file-creation mask; it cannot fail.
    unsafe { libc::umask(0o077) };
    // A file-size limit (`ulimit -f`, systemd's LimitFSIZE=) must show as a failed write,
    // which the journal handles like a full disk, not kill the process (SIGXFSZ's default
    // action). A handler installed through tokio stays for the life of the process.
    drop(
        tokio::signal::unix::signal(SignalKind::from_raw(libc::SIGXFSZ))
            .context("cannot install the SIGXFSZ handler")?,
    );
    // Before the store, the journal and the listener open theirs: connections, segments and
    // the store's files all count against this one limit.
    match fds::raise_soft_limit() {
        Ok(limit) if limit.soft > limit.was => tracing::info!(
            was = limit.was,
            now = limit.soft,
            "Raised the open-file limit (soft) to the hard limit."
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "Cannot raise the open-file limit; keeping it."),
    }
    App::build(config).await?.run_until(stop).await
}
