//! The store: where counter values live. One small contract, two real backends.
//!
//! Every backend keeps the same promises, checked by `tests/store_contract.rs`:
//! - [`Store::apply`] writes a whole batch in ONE transaction: `value = value + delta` for
//!   every key, in the order given (sorted, so concurrent instances never deadlock), plus the
//!   record "instance I applied seq S". A batch whose seq is not above the recorded one is
//!   skipped and reported as [`Applied::AlreadyApplied`]: a retry after an unknown commit
//!   outcome never counts twice.
//! - A sum outside the 64-bit range is refused with [`StoreError::Rejected`], never wrapped
//!   or turned into a float, and nothing of that batch is applied.
//! - **Fencing.** [`Store::claim`] makes the caller the one process that writes as an
//!   instance id: it bumps the id's epoch, and [`Store::apply`] refuses, with
//!   [`StoreError::Fenced`], a batch whose epoch is no longer the current one (or
//!   [`StoreError::WentBack`], when the stored epoch is lower than the batch's: the database
//!   lost the claim, restored from a backup or failed over to a replica behind), and
//!   [`StoreError::LostBatches`], a batch whose writer saw the store commit a seq above the
//!   one it now holds. The claim
//!   waits for a batch of the previous holder that is still being committed (its row lock),
//!   so the seq it returns includes that batch: a restart after `kill -9` never numbers a
//!   batch with a seq its dead predecessor has just used.
//! - **Claimants.** A claim records which journal made it ([`Claimant`]). A journal that
//!   still holds records numbered under its own earlier claim asks for an exclusive claim,
//!   which fails with [`StoreError::ClaimedElsewhere`], claiming nothing, if another journal
//!   claimed the id in between. The claim records which journal held the id before the
//!   current one and the seq it had reached ([`Handover`]), so such a journal can tell which
//!   of its records are in the store (see `crate::recovery`).
//! - [`Store::read`] returns a key's value together with this instance's last applied seq,
//!   from one snapshot, so a reader can tell which of its pending deltas the value includes.

mod hosts;
mod migrate;
pub mod password;
pub mod postgres;
pub mod sqlite;
pub mod timed;
pub mod tls;

use std::error::Error as StdError;

use async_trait::async_trait;

use crate::causes::Causes;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;
pub use timed::Timed;

thread_local! {
    /// Set on a thread whose runtime runs nothing that a blocking store call could hold up.
    static MAY_BLOCK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the calling thread as one a store may block: its runtime runs one task, which
/// waits for each store call anyway (the flusher's thread when
/// [`Store::wants_own_thread`]). A synchronous store (SQLite) then runs its calls in place
/// instead of handing each to tokio's blocking pool and back.
pub(crate) fn allow_blocking_here() {
    MAY_BLOCK.with(|b| b.set(true));
}

/// Whether [`allow_blocking_here`] was called on this thread.
pub(crate) fn may_block_here() -> bool {
    MAY_BLOCK.with(std::cell::Cell::get)
}

/// A numbered batch of deltas from one instance.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub instance_id: &'a str,
    /// The epoch of the writer's [`Claim`]; 0 for a writer that never claimed (tools and
    /// tests: 0 is the epoch of an unclaimed id).
    pub epoch: u64,
    pub seq: u64,
    /// The last seq of this instance the writer has seen the store hold: its claim's, or a
    /// batch committed since (0 for tools and tests that never claimed). A store whose last
    /// seq is below it has lost batches it had committed.
    pub applied: u64,
    /// `(key, delta)`, sorted by key, each key once.
    pub entries: &'a [(&'a str, i64)],
    /// Deltas set aside because the store refused them, recorded in the same transaction.
    pub dead_letters: &'a [DeadLetter],
}

/// A delta the store refused, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub key: String,
    pub delta: i64,
    pub reason: String,
}

/// Who makes a [`Store::claim`]: the journal that numbers the claimer's batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claimant<'a> {
    /// The journal's id: random, made once per journal directory.
    pub journal: &'a str,
    /// Fail, claiming nothing, if another journal claimed the id last (a claim made before
    /// claimants were recorded counts as nobody's). Set while the journal holds records
    /// numbered under an earlier claim of its own.
    pub exclusive: bool,
}

/// What [`Store::claim`] returns: the claim's fencing epoch, the last seq the store holds
/// for the id (0 if none), and how the claim last passed between journals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub epoch: u64,
    pub last_seq: u64,
    pub handover: Handover,
}

/// How an instance id's claim last passed from one journal to another.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Handover {
    /// The journal that claimed the id before the current claimant (`None`: none recorded).
    pub from: Option<String>,
    /// The id's last applied seq when the current claimant took the claim over: every batch
    /// `from` applied is at or below it (0 when none recorded).
    pub seq: u64,
}

/// The outcome of a successful [`Store::apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The batch was written by this call.
    Committed,
    /// The store had already applied this seq (or a later one) for this instance; nothing
    /// was written.
    AlreadyApplied,
}

/// A key's stored value and this instance's last applied seq, read in one snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub value: Option<i64>,
    pub applied_seq: u64,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached, or the transaction failed for a reason that may pass
    /// (connection lost, timeout, shutdown of the server). If it happened during COMMIT the
    /// outcome is unknown; retrying the same batch is safe.
    #[error("store unavailable: {}", Causes(.0.as_ref()))]
    Unavailable(#[source] Box<dyn StdError + Send + Sync>),
    /// TLS to the store, which its URL asks for, cannot be set up (a certificate file that
    /// cannot be read, no root certificate at all).
    #[error("cannot set up TLS to PostgreSQL: {0}")]
    Tls(#[from] tls::TlsError),
    /// The store refused the data itself; retrying the same batch fails again. `keys` names
    /// the offending keys when the backend can tell (empty when it cannot).
    #[error("store rejected the batch: {reason}")]
    Rejected { reason: String, keys: Vec<String> },
    /// The batch's epoch is not the instance id's current one: another process has claimed
    /// the id since. Nothing was written, and retrying cannot help.
    #[error(
        "instance id {instance_id:?} was claimed by another process (epoch {current}, this \
         process holds {epoch}); this process no longer writes as it"
    )]
    Fenced {
        instance_id: String,
        epoch: u64,
        current: u64,
    },
    /// The store holds an older claim of the instance id than the batch's: the database has
    /// gone back in time (restored from a backup, or failed over to a replica that missed
    /// its last commits), and batches written since that point may be gone with it. Nothing
    /// was written; a claim made again (a restart) starts from what the store holds now.
    #[error(
        "the store holds claim {current} of instance id {instance_id:?}, older than this \
         process's claim {epoch}: the database has gone back in time (restored from a backup, \
         or failed over to a replica that missed its last commits), and batches written since \
         may be gone with it; this process no longer writes as it"
    )]
    WentBack {
        instance_id: String,
        epoch: u64,
        current: u64,
    },
    /// The store's last seq of the instance id is below one it had committed for the batch's
    /// writer (`applied`): the database has gone back in time (restored from a backup, or
    /// failed over to a replica that missed its last commits) and lost batches
    /// `stored + 1 ..= applied`. Nothing was written: a claim made again (a restart) starts
    /// from what the store holds, so the writer's journal can write those batches again.
    #[error(
        "the store holds batches of instance id {instance_id:?} up to seq {stored}, below seq \
         {applied} which it had committed: the database has gone back in time (restored from a \
         backup, or failed over to a replica that missed its last commits) and lost batches {} \
         to {applied}",
        stored + 1
    )]
    LostBatches {
        instance_id: String,
        stored: u64,
        applied: u64,
    },
    /// Another live process holds the instance id (PostgreSQL: its session lock), still
    /// after waiting `waited` for it to go away.
    #[error(
        "instance id {instance_id:?} is in use by another running tally (still after {waited:?}); \
         give each instance its own --instance-id, or leave it unset so that each data directory \
         generates its own"
    )]
    InUse {
        instance_id: String,
        waited: std::time::Duration,
    },
    /// An exclusive claim ([`Claimant::exclusive`]) found that another journal claimed the
    /// id last. Nothing was claimed.
    #[error(
        "instance id {instance_id:?} was claimed by another tally ({}) since this one last \
         ran as it",
        claimant.as_ref().map_or_else(|| "one that does not record its journal: an older version, or by hand".to_owned(), |j| format!("journal {j}"))
    )]
    ClaimedElsewhere {
        instance_id: String,
        /// The journal that claimed it; `None` if that claim did not record one (an older
        /// tally's, or one made by hand).
        claimant: Option<String>,
        /// How the claim passed to `claimant` (meaningless when it is `None`).
        handover: Handover,
    },
    /// The database schema could not be created or migrated.
    #[error("schema migration failed: {0}")]
    Migration(String),
    /// The database cannot hold every key: its character encoding is not UTF-8 (nor
    /// PostgreSQL's byte-transparent `SQL_ASCII`).
    #[error(
        "the database's encoding is {encoding}, which cannot hold every key (keys are any \
         UTF-8 text: a key it cannot represent would be refused, and so would its dead \
         letter); use a UTF-8 database: CREATE DATABASE <name> ENCODING 'UTF8' TEMPLATE \
         template0 LC_COLLATE 'C' LC_CTYPE 'C' (docs/operations.md, Faults)"
    )]
    Encoding { encoding: String },
}

impl StoreError {
    pub(crate) fn unavailable(e: impl Into<Box<dyn StdError + Send + Sync>>) -> Self {
        Self::Unavailable(e.into())
    }

    /// Why an operation that may be retried failed, from the first cause that tells: the
    /// `reason` of `tally_flush_batches_total{result="failed"}`.
    pub fn failure(&self) -> Failure {
        let cause = match self {
            Self::Unavailable(e) => e.as_ref(),
            Self::Tls(_) => return Failure::NotConnected,
            _ => return Failure::Other,
        };
        let mut cause: Option<&(dyn StdError + 'static)> = Some(cause);
        while let Some(e) = cause {
            if e.is::<timed::TimedOut>() {
                return Failure::Timeout;
            }
            if e.is::<postgres::NotConnected>() {
                return Failure::NotConnected;
            }
            if let Some(e) = e.downcast_ref::<tokio_postgres::Error>() {
                let code = e.code().map(tokio_postgres::error::SqlState::code);
                match (code, code.and_then(|code| code.get(..2))) {
                    // The server's `statement_timeout`, or a cancel by an operator.
                    (Some("57014"), _) => return Failure::Timeout,
                    // Connection exception, operator intervention (the server shutting
                    // down, the session terminated), a session ended for idling in its
                    // transaction.
                    (Some("25P03"), _) | (_, Some("08" | "57")) => {
                        return Failure::ConnectionLost;
                    }
                    (Some(_), _) => return Failure::DatabaseError,
                    (None, _) if e.is_closed() => return Failure::ConnectionLost,
                    (None, _) => {}
                }
            }
            if e.is::<rusqlite::Error>() {
                return Failure::DatabaseError;
            }
            if e.is::<std::io::Error>() {
                return Failure::ConnectionLost;
            }
            cause = e.source();
        }
        Failure::Other
    }
}

/// Why a store operation failed: [`StoreError::failure`]. Declared in the order of
/// [`Failure::ALL`] (checked below).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No answer within `--store-timeout`: a hung connection or database.
    Timeout,
    /// No connection could be opened: refused, no route, a login or TLS refused, or no
    /// host that takes writes (`target_session_attrs=read-write` during a failover).
    NotConnected,
    /// The connection broke during the operation, or the server ended the session (also
    /// when it crashed, as a PostgreSQL out of disk may).
    ConnectionLost,
    /// The database answered with an error: read-only, permissions; a SQLite file locked
    /// by another process, or full.
    DatabaseError,
    /// Anything else (the log line has the error).
    Other,
}

impl Failure {
    /// Every reason, in declaration order: `reason as usize` is its index here.
    pub const ALL: [Self; 5] = [
        Self::Timeout,
        Self::NotConnected,
        Self::ConnectionLost,
        Self::DatabaseError,
        Self::Other,
    ];

    /// Its name in metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::NotConnected => "not_connected",
            Self::ConnectionLost => "connection_lost",
            Self::DatabaseError => "database_error",
            Self::Other => "other",
        }
    }
}

// `Failure::ALL[i] as usize == i`, so that a reason indexes what is kept per reason.
const _: () = {
    let mut i = 0;
    while i < Failure::ALL.len() {
        assert!(Failure::ALL[i] as usize == i);
        i += 1;
    }
};

/// The contract every backend keeps; see the module docs.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Short name for logs and metrics: `sqlite` or `postgres`.
    fn name(&self) -> &'static str;

    /// Whether the flusher should run on a thread of its own, where this store's calls may
    /// block ([`allow_blocking_here`]): true for a synchronous store (SQLite), whose calls
    /// would otherwise each go to tokio's blocking pool and back. An async store's
    /// connections stay on the runtime that opened them.
    fn wants_own_thread(&self) -> bool {
        false
    }

    /// Claims `instance_id` for the calling process (see the module docs on fencing): from
    /// now on only batches carrying the returned epoch are written. Waits for a batch of an
    /// earlier holder still being committed; the returned `last_seq` includes it.
    ///
    /// # Errors
    ///
    /// [`StoreError::InUse`] if another live process holds the id;
    /// [`StoreError::ClaimedElsewhere`] if the claim is exclusive and another journal claimed
    /// the id last; [`StoreError::Unavailable`] if the store cannot be written.
    async fn claim(&self, instance_id: &str, by: Claimant<'_>) -> Result<Claim, StoreError>;

    /// Applies `batch` in one transaction unless its seq is already applied.
    ///
    /// # Errors
    ///
    /// [`StoreError::Fenced`] if another claim of the id is the current one, or
    /// [`StoreError::WentBack`] if the store holds an older one than the batch's, or
    /// [`StoreError::LostBatches`] if its last seq is below the batch's `applied` (nothing
    /// applied in any of these); [`StoreError::Rejected`] if a sum leaves the 64-bit range
    /// (nothing
    /// applied); [`StoreError::Unavailable`] if the transaction failed or its outcome is
    /// unknown.
    async fn apply(&self, batch: Batch<'_>) -> Result<Applied, StoreError>;

    /// Checks, without writing anything, whether `entries` could be applied: used to find
    /// the offending keys of a rejected batch.
    ///
    /// # Errors
    ///
    /// As [`Store::apply`].
    async fn probe(&self, entries: &[(&str, i64)]) -> Result<(), StoreError>;

    /// Reads `key` and `instance_id`'s last applied seq from one snapshot.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] if the store cannot be read.
    async fn read(&self, key: &str, instance_id: &str) -> Result<Stored, StoreError>;

    /// Checks that the store answers.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] if it does not.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Converts a seq for a signed 64-bit column. Seqs start at 1 and grow by one per flush, so
/// they stay far below `i64::MAX`; a larger one means a corrupt journal or id reuse.
pub(crate) fn seq_to_sql(seq: u64) -> Result<i64, StoreError> {
    i64::try_from(seq).map_err(|_| StoreError::Rejected {
        reason: format!("batch seq {seq} is beyond the 64-bit signed range"),
        keys: Vec::new(),
    })
}

/// The fencing check of [`Store::apply`], the same on every backend: a batch of
/// `instance_id` carrying `epoch` may be written when the id's stored epoch is `current`
/// (0 when the id has no row yet). Claims only ever raise the stored epoch, so a lower one
/// means the store lost the claim: [`StoreError::WentBack`], not another claimant.
pub(crate) fn check_epoch(instance_id: &str, epoch: u64, current: u64) -> Result<(), StoreError> {
    let owned = || instance_id.to_owned();
    match current.cmp(&epoch) {
        std::cmp::Ordering::Equal => Ok(()),
        std::cmp::Ordering::Greater => Err(StoreError::Fenced {
            instance_id: owned(),
            epoch,
            current,
        }),
        std::cmp::Ordering::Less => Err(StoreError::WentBack {
            instance_id: owned(),
            epoch,
            current,
        }),
    }
}

/// The check of [`Store::apply`] that the store still holds what the batch's writer saw it
/// commit: its last seq `stored` is not below the batch's `applied`.
pub(crate) fn check_applied(
    instance_id: &str,
    applied: u64,
    stored: u64,
) -> Result<(), StoreError> {
    if stored < applied {
        Err(StoreError::LostBatches {
            instance_id: instance_id.to_owned(),
            stored,
            applied,
        })
    } else {
        Ok(())
    }
}

/// Reads a seq back from a signed 64-bit column (never negative: only `seq_to_sql` writes it).
pub(crate) fn seq_from_sql(seq: i64) -> u64 {
    u64::try_from(seq).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Failure, StoreError, timed::Timed};

    /// The causes the integration tests cannot bring about on demand (a connection reset
    /// mid-batch) and the ones that must not be taken for another.
    #[tokio::test]
    async fn each_failure_is_told_by_the_first_cause_that_tells() {
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(
            StoreError::unavailable(reset).failure(),
            Failure::ConnectionLost
        );
        let busy = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        );
        assert_eq!(StoreError::from(busy).failure(), Failure::DatabaseError);
        let timed_out: Result<(), _> =
            Timed::within_for("a test", Duration::ZERO, std::future::pending()).await;
        let timed_out = timed_out.expect_err("given up on at once");
        assert_eq!(timed_out.failure(), Failure::Timeout);
        assert_eq!(
            StoreError::unavailable("a SQLite call panicked").failure(),
            Failure::Other
        );
        let rejected = StoreError::Rejected {
            reason: "out of range".to_owned(),
            keys: Vec::new(),
        };
        assert_eq!(rejected.failure(), Failure::Other);
    }
}
