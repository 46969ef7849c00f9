//! File descriptors: every client connection, journal segment, SQLite file and PostgreSQL
//! connection takes one from the same per-process limit (`RLIMIT_NOFILE`).
//!
//! Many systems still start a service with a soft limit of 1,024 (a shell's `ulimit -n`;
//! systemd's default is `LimitNOFILE=1024:524288`), below the default `--max-connections`
//! of 4,096. Left so, a load balancer that opens more connections than that takes the last
//! descriptors: the journal then cannot create its next segment (every increment refused
//! with 503 until connections close) and the pool cannot reconnect to PostgreSQL, while
//! `accept` fails and new clients wait. So tally:
//!
//! - raises its soft limit to the hard one at start ([`raise_soft_limit`]), as Go's runtime
//!   does for every program and nginx with `worker_rlimit_nofile`: the hard limit is the
//!   operator's ceiling, the soft one a default for programs that keep few files open;
//! - caps connections below what the limit leaves after the descriptors it keeps for
//!   everything else ([`reserved`], [`connection_cap`]), logging it when that is below
//!   `--max-connections`, so that at the cap the longest-idle connection makes room for a
//!   new client (`crate::http::serve`) instead of `accept` failing.
//!
//! The `rlimit` crate reads and sets the limit; only the arithmetic is here.

use std::io;

/// Descriptors tally keeps for what is not a client connection, besides those of
/// [`reserved`]'s per-runtime and store terms: stdio, the data directory's and the journal's
/// locks, the journal's active segment, the next one and the directory it syncs, the
/// listeners, and the signal pipe. A default tally holds 30–38 descriptors in all (`ls
/// /proc/<pid>/fd` and `process_open_fds`: 3 serving threads, SQLite or an idle pool, a
/// scrape's connection).
pub const BASE_RESERVED: u64 = 32;

/// Descriptors per Tokio runtime: its epoll instances and wake-up eventfd (about 3 each,
/// counted in `/proc/<pid>/fd`), with room to spare.
pub const PER_RUNTIME: u64 = 4;

/// SQLite's files: the database, its WAL and shared memory, per connection (5 counted).
pub const SQLITE_FILES: u64 = 8;

/// Most connections on `--metrics-listen`'s listener (scrapes): a few at a time.
pub const METRICS_CONNECTIONS: usize = 16;

/// Descriptors to keep for everything but client connections: [`BASE_RESERVED`],
/// [`PER_RUNTIME`] for each of `runtimes`, `store` (the PostgreSQL pool and its lock
/// connection, or [`SQLITE_FILES`]), and `metrics_connections`.
pub fn reserved(runtimes: usize, store: u64, metrics_connections: usize) -> u64 {
    BASE_RESERVED
        .saturating_add(PER_RUNTIME.saturating_mul(runtimes as u64))
        .saturating_add(store)
        .saturating_add(metrics_connections as u64)
}

/// Fewest connections worth starting with: below this, the limit is a mistake to fix
/// rather than a cap to live with.
pub const MIN_CONNECTIONS: u64 = 16;

/// The open-file limit, as [`raise_soft_limit`] found and left it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    /// The soft limit before.
    pub was: u64,
    /// The soft limit now: what the process may open.
    pub soft: u64,
    /// The hard limit (only root raises it).
    pub hard: u64,
}

/// Raises the soft open-file limit to the hard one.
///
/// # Errors
///
/// If the limit cannot be read or set; the process then keeps the limit it had.
pub fn raise_soft_limit() -> io::Result<Limit> {
    let (was, hard) = rlimit::Resource::NOFILE.get()?;
    let soft = rlimit::increase_nofile_limit(hard)?;
    Ok(Limit { was, soft, hard })
}

/// The soft open-file limit now.
///
/// # Errors
///
/// If the limit cannot be read.
pub fn soft_limit() -> io::Result<u64> {
    Ok(rlimit::Resource::NOFILE.get()?.0)
}

/// Too few descriptors to serve: [`connection_cap`]'s error.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "the open-file limit is {limit}, and tally keeps {reserved} descriptors for its journal, \
     store and threads: that leaves {left} for client connections, too few to serve. \
     Raise the limit (`ulimit -n`, systemd's LimitNOFILE=) to {fits} to allow \
     --max-connections (at the very least to {needed})"
)]
pub struct TooFewDescriptors {
    /// The soft limit.
    pub limit: u64,
    /// What tally keeps for itself.
    pub reserved: u64,
    /// What that leaves.
    pub left: u64,
    /// The least limit that serves.
    pub needed: u64,
    /// The limit that allows every connection of `--max-connections`.
    pub fits: u64,
}

/// How many client connections fit: `requested` (`--max-connections`), or fewer if `limit`
/// leaves fewer after `reserved` descriptors.
///
/// # Errors
///
/// [`TooFewDescriptors`] if fewer than [`MIN_CONNECTIONS`] fit (or than `requested`, if
/// that is fewer).
pub fn connection_cap(
    requested: usize,
    limit: u64,
    reserved: u64,
) -> Result<usize, TooFewDescriptors> {
    let left = limit.saturating_sub(reserved);
    // Fewer than MIN_CONNECTIONS are fine when that is all the operator asked for.
    let least = MIN_CONNECTIONS.min(requested as u64);
    if left < least {
        return Err(TooFewDescriptors {
            limit,
            reserved,
            left,
            needed: reserved.saturating_add(least),
            fits: reserved.saturating_add(requested as u64),
        });
    }
    Ok(usize::try_from(left).map_or(requested, |left| requested.min(left)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_capped_at_what_the_limit_leaves() {
        assert_eq!(connection_cap(4096, 524_288, 72), Ok(4096));
        assert_eq!(connection_cap(4096, 1024, 72), Ok(952));
        assert_eq!(connection_cap(4096, 4096 + 72, 72), Ok(4096));
        assert_eq!(connection_cap(10, 1024, 72), Ok(10));
        assert_eq!(connection_cap(4096, 72 + 16, 72), Ok(16));
        assert_eq!(connection_cap(4096, u64::MAX, 72), Ok(4096));
        // Fewer than MIN_CONNECTIONS, when that is all that was asked for.
        assert_eq!(connection_cap(4, 80, 72), Ok(4));
        assert_eq!(connection_cap(8, 80, 72), Ok(8));
        assert!(connection_cap(9, 80, 72).is_err());
    }

    #[test]
    fn a_limit_that_leaves_too_few_connections_is_an_error_that_says_what_to_raise() {
        let err = connection_cap(4096, 80, 72).expect_err("8 connections are too few");
        assert_eq!(
            err,
            TooFewDescriptors {
                limit: 80,
                reserved: 72,
                left: 8,
                needed: 88,
                fits: 4168,
            }
        );
        let message = err.to_string();
        assert!(
            message.contains("ulimit -n")
                && message.contains("to 4168")
                && message.contains("to 88"),
            "{message}"
        );
        assert!(connection_cap(4096, 10, 72).is_err(), "no underflow");
    }

    #[test]
    fn the_reserve_grows_with_the_runtimes_the_store_and_the_metrics_listener() {
        // A default tally on 2 cores with SQLite: 3 serving threads, start-up, the flusher.
        assert_eq!(reserved(5, SQLITE_FILES, 0), 32 + 20 + 8);
        // 64 cores with PostgreSQL's default pool (8 + the lock connection) and scrapes apart.
        assert_eq!(reserved(67, 9, METRICS_CONNECTIONS), 32 + 268 + 9 + 16);
        assert_eq!(
            reserved(usize::MAX, u64::MAX, usize::MAX),
            u64::MAX,
            "saturates"
        );
    }

    /// On Linux the hard limit is the ceiling (macOS caps it lower). Raises the limit of
    /// the test process, harmlessly: only up to its own hard limit.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let limit = raise_soft_limit().expect("the limit can be read and raised");
        assert!(limit.soft >= limit.was);
        assert_eq!(limit.soft, limit.hard);
        assert_eq!(soft_limit().expect("readable"), limit.soft);
    }
}
