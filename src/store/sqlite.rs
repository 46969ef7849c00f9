//! The embedded SQLite store: zero set-up, one instance.
//!
//! rusqlite is synchronous, so a call runs on tokio's blocking pool, except on the flusher's
//! own thread ([`Store::wants_own_thread`]), where it runs in place. Writes go through one
//! connection (SQLite allows one writer at a time anyway); reads use a second one, which WAL
//! mode lets proceed while a batch is being written.
//!
//! In place, `--store-timeout` cannot abandon a call midway. A lock that another process
//! holds still fails a write within it (SQLite's lock wait is set to at most the store
//! timeout, [`SqliteStore::open_waiting`]), so the batch is logged, counted failed and
//! retried. A disk that never returns from an `fdatasync` holds the flusher with no error:
//! `tally_flush_lag_seconds` grows and its alert fires. (Before, the timeout logged the stuck
//! write as failed, but each retry then waited for the connection it held.)
//!
//! SQLite turns an integer sum that overflows into a float, so a batch's sums are added in
//! SQL only behind a bounds check that cannot overflow itself ([`ADD_CHECKED`]); the keys of a
//! refused batch are named with checked arithmetic in Rust.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{
    Applied, Batch, Claim, Claimant, Handover, Store, StoreError, Stored, check_applied,
    check_epoch, migrate, seq_from_sql, seq_to_sql,
};

/// How long a statement waits at most for a lock held by another connection before failing
/// ([`SqliteStore::open_waiting`] may shorten it).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// SQLite's page cache of the writing connection, in KiB: 64 MiB instead of SQLite's default
/// 2 MB.
/// With the default, a table of 100,000 keys (~7 MB with its key index) does not fit, and a
/// batch of random keys reads most of its pages back from the OS with a `pread` each
/// (measured under the full workload, `ack=store`: the OS page-cache lookups of those reads
/// and their copies beyond what TCP's own take were ~4-5 % of tally's CPU samples, SQLite's
/// cache lookups ~1 % more). Pages are allocated as they are read, so a small
/// database costs only its own size.
const CACHE_KIB: i64 = 64 * 1024;

/// WAL bytes after which a commit copies the WAL back into the database (SQLite's
/// `wal_autocheckpoint`, set in pages of the database's own size): 40 MiB instead of SQLite's
/// 1,000 pages. A batch of random keys dirties a page per key, so with 1,000 pages the small
/// batches of `ack=store` ran a checkpoint every few commits and wrote each page back again and
/// again; with 40 MiB a checkpoint writes each page once for many batches. Measured under the
/// full workload (100,000 keys, `ack=store`): 13.1k -> 17.5k requests/s, p99 level or lower
/// (docs/benchmarks.md). The WAL file keeps its largest size: about 40 MiB, more after a batch
/// larger than that or while a long read holds a checkpoint back.
const WAL_CHECKPOINT_BYTES: i64 = 40 << 20;

/// Page size of a new database: 2 KiB instead of SQLite's 4 KiB. A commit writes every page
/// it dirtied to the WAL, checksummed, and a batch of random keys dirties about a page per
/// key, so the bytes written per key (and their checksums, and the page-cache copies) shrink
/// with the page. Not 1 KiB: a row of `counters` lives in its key's B-tree leaf, and on 1 KiB
/// pages a row with a key over ~200 bytes (the default limit is 256) spills into an overflow
/// page. Measured under `ack=store`, 100,000 keys, with the checkpoint kept at 40 MiB, 4 KiB /
/// 2 KiB / 1 KiB: 29.5k / 34.8k / 32.2k requests/s on short keys, 23.8k / 26.8k / 18.8k on
/// 207-byte keys (docs/benchmarks.md). A database created with another page size keeps it
/// (WAL mode cannot change it).
const NEW_PAGE_SIZE: i64 = 2048;

/// The SQLite backend.
#[derive(Clone)]
pub struct SqliteStore {
    /// The one connection that writes. Held for the whole of a batch's transaction.
    write: Arc<Mutex<Connection>>,
    /// A connection for reads, so reads need not wait for a batch to commit.
    read: Arc<Mutex<Connection>>,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::unavailable(e)
    }
}

fn open_connection(path: &Path, lock_wait: Duration) -> Result<Connection, rusqlite::Error> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(lock_wait)?;
    // WAL: readers do not block the writer. synchronous=FULL: a commit is on disk when it
    // returns, which ack=store and journal trimming rely on. The sync is an `fdatasync`
    // (`.cargo/config.toml` builds the bundled SQLite with HAVE_FDATASYNC, as distributions
    // do): the WAL keeps its size once grown, so a commit syncs data and not the file's
    // modification time. Measured under ack=store, full workload: +1-9 % in 4 of 4 rounds,
    // p99 lower in each (docs/benchmarks.md).
    conn.pragma_update(None, "page_size", NEW_PAGE_SIZE)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    let page_size: i64 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
    conn.pragma_update(
        None,
        "wal_autocheckpoint",
        WAL_CHECKPOINT_BYTES / page_size.max(512),
    )?;
    Ok(conn)
}

fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and applies pending migrations.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] if the file cannot be opened; [`StoreError::Migration`]
    /// if the schema cannot be brought up to date.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_waiting(path, BUSY_TIMEOUT).await
    }

    /// As [`SqliteStore::open`], with statements waiting at most `lock_wait` (and at most
    /// [`BUSY_TIMEOUT`]) for a lock another process holds (an operator's `sqlite3` shell in a
    /// write transaction) before they fail, so that the failure is logged, counted and
    /// retried. tally passes `--store-timeout`: the flusher's writes run in place
    /// ([`Store::wants_own_thread`]), where the store timeout cannot abandon them.
    ///
    /// # Errors
    ///
    /// As [`SqliteStore::open`].
    pub async fn open_waiting(path: &Path, lock_wait: Duration) -> Result<Self, StoreError> {
        let (path, lock_wait) = (path.to_owned(), lock_wait.min(BUSY_TIMEOUT));
        tokio::task::spawn_blocking(move || {
            let mut write = open_connection(&path, lock_wait)?;
            // The writer's only: in WAL mode a reader's cache is dropped whenever the writer
            // has committed since its last read. A negative cache_size is in KiB.
            write.pragma_update(None, "cache_size", -CACHE_KIB)?;
            migrate(&mut write).map_err(|e| StoreError::Migration(e.to_string()))?;
            let read = open_connection(&path, lock_wait)?;
            Ok(Self {
                write: Arc::new(Mutex::new(write)),
                read: Arc::new(Mutex::new(read)),
            })
        })
        .await
        .map_err(StoreError::unavailable)?
    }

    async fn with<T: Send + 'static>(
        conn: &Arc<Mutex<Connection>>,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let run = move |conn: &Mutex<Connection>| {
            let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut conn)
        };
        if super::may_block_here() {
            // A panic inside rusqlite fails the call, as a blocking-pool job's would (its
            // `JoinError`), instead of unwinding through the flusher.
            return std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(conn)))
                .unwrap_or_else(|_| Err(StoreError::unavailable("a SQLite call panicked")));
        }
        let conn = Arc::clone(conn);
        tokio::task::spawn_blocking(move || run(&conn))
            .await
            .map_err(StoreError::unavailable)?
    }
}

fn migrate(conn: &mut Connection) -> Result<(), rusqlite::Error> {
    conn.execute_batch(migrate::CREATE_TABLE)?;
    for m in migrate::SQLITE {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let done: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM tally_migrations WHERE version = ?1)",
            [m.version],
            |r| r.get(0),
        )?;
        if !done {
            tx.execute_batch(m.sql)?;
            tx.execute(
                "INSERT INTO tally_migrations (version, applied_at) VALUES (?1, ?2)",
                params![m.version, now()],
            )?;
            tracing::info!(version = m.version, "Applied SQLite migration.");
        }
        tx.commit()?;
    }
    Ok(())
}

/// Adds `?2` to key `?1`'s counter in one statement (one lookup of the key, where reading the
/// sum first and writing it back took two). SQLite turns an integer sum that overflows into
/// a float, and a float at -2^63 would even be stored back as the integer -2^63, so the
/// bounds are checked before adding, in integers that cannot overflow themselves: a sum that
/// would leave the i64 range becomes NULL, which the column's NOT NULL refuses. Measured under
/// ack=store, full workload: CPU per request lower in 4 of 4 rounds, +8 % throughput on
/// average (docs/benchmarks.md).
const ADD_CHECKED: &str = "INSERT INTO counters (key, value, updated_at) VALUES (?1, ?2, ?3) \
     ON CONFLICT (key) DO UPDATE SET value = CASE \
         WHEN excluded.value > 0 AND value > 9223372036854775807 - excluded.value THEN NULL \
         WHEN excluded.value < 0 AND value < (-9223372036854775807 - 1) - excluded.value THEN NULL \
         ELSE value + excluded.value END, \
     updated_at = excluded.updated_at";

/// Whether `e` is a NOT NULL constraint failing: how [`ADD_CHECKED`] refuses a sum.
fn is_not_null_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_NOTNULL)
}

/// New sums for `entries` on top of what `conn` holds, refusing any outside the i64 range.
fn new_sums(
    conn: &Connection,
    entries: &[(String, i64)],
) -> Result<Result<Vec<i64>, Vec<String>>, rusqlite::Error> {
    let mut get = conn.prepare_cached("SELECT value FROM counters WHERE key = ?1")?;
    let mut sums = Vec::with_capacity(entries.len());
    let mut overflowed = Vec::new();
    for (key, delta) in entries {
        let current: i64 = get.query_row([key], |r| r.get(0)).optional()?.unwrap_or(0);
        match current.checked_add(*delta) {
            Some(sum) => sums.push(sum),
            None => overflowed.push(key.clone()),
        }
    }
    Ok(if overflowed.is_empty() {
        Ok(sums)
    } else {
        Err(overflowed)
    })
}

fn rejected(keys: Vec<String>) -> StoreError {
    StoreError::Rejected {
        reason: "sum out of the 64-bit integer range".to_owned(),
        keys,
    }
}

/// Claims instance `?1` for journal `?3` at time `?2`: epoch + 1, or 1 for a new id; when
/// the claim passes to another journal, notes the one it passes from and the seq reached
/// (the right-hand sides read the row as it was). With `?4` (exclusive) it updates nothing,
/// and returns no row, if another journal claimed the id last, or a claim that recorded no
/// claimant (an older tally's) came after this journal's.
const CLAIM: &str = "INSERT INTO tally_instances \
     (instance_id, last_seq, epoch, updated_at, claimed_by, handover_seq, claimed_epoch) \
     VALUES (?1, 0, 1, ?2, ?3, 0, 1) \
     ON CONFLICT (instance_id) DO UPDATE SET epoch = epoch + 1, updated_at = excluded.updated_at, \
     previous_claimant = CASE WHEN claimed_by IS excluded.claimed_by THEN previous_claimant \
     ELSE claimed_by END, \
     handover_seq = CASE WHEN claimed_by IS excluded.claimed_by THEN handover_seq \
     ELSE last_seq END, \
     claimed_by = excluded.claimed_by, claimed_epoch = epoch + 1 \
     WHERE NOT ?4 OR claimed_by IS NULL \
     OR (claimed_by = excluded.claimed_by AND claimed_epoch = epoch) \
     RETURNING last_seq, epoch, previous_claimant, handover_seq";

/// The claim of instance `?1` as it stands; the claimant only if the last claim recorded it.
const CLAIMANT: &str = "SELECT CASE WHEN claimed_epoch = epoch THEN claimed_by END, \
     previous_claimant, handover_seq FROM tally_instances WHERE instance_id = ?1";

#[async_trait]
impl Store for SqliteStore {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn wants_own_thread(&self) -> bool {
        true
    }

    async fn claim(&self, instance_id: &str, by: Claimant<'_>) -> Result<Claim, StoreError> {
        let (id, journal, exclusive) =
            (instance_id.to_owned(), by.journal.to_owned(), by.exclusive);
        Self::with(&self.write, move |conn| {
            // One statement: the check and the claim cannot be told apart by another writer.
            let claimed = conn
                .query_row(CLAIM, params![id, now(), journal, exclusive], |r| {
                    Ok(Claim {
                        last_seq: seq_from_sql(r.get(0)?),
                        epoch: seq_from_sql(r.get(1)?),
                        handover: Handover {
                            from: r.get(2)?,
                            seq: seq_from_sql(r.get(3)?),
                        },
                    })
                })
                .optional()?;
            match claimed {
                Some(claim) => Ok(claim),
                None => {
                    let (claimant, from, seq): (Option<String>, Option<String>, i64) = conn
                        .query_row(CLAIMANT, params![id], |r| {
                            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                        })?;
                    Err(StoreError::ClaimedElsewhere {
                        instance_id: id,
                        claimant,
                        handover: Handover {
                            from,
                            seq: seq_from_sql(seq),
                        },
                    })
                }
            }
        })
        .await
    }

    async fn apply(&self, batch: Batch<'_>) -> Result<Applied, StoreError> {
        // A call handed to the blocking pool needs owned data: one copy of the batch, cheap
        // next to the I/O.
        let id = batch.instance_id.to_owned();
        let seq = seq_to_sql(batch.seq)?;
        let epoch = seq_to_sql(batch.epoch)?;
        let entries: Vec<(String, i64)> = batch
            .entries
            .iter()
            .map(|(k, d)| ((*k).to_owned(), *d))
            .collect();
        let dead = batch.dead_letters.to_vec();
        let (batch_epoch, batch_applied) = (batch.epoch, batch.applied);
        Self::with(&self.write, move |conn| {
            // ack=store requests wait for this; the workers serving the rest should not be
            // preempted by it (see `crate::sched`).
            let _batch = crate::sched::BatchScope::enter();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let (last, current): (i64, i64) = tx
                .query_row(
                    "SELECT last_seq, epoch FROM tally_instances WHERE instance_id = ?1",
                    [&id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?
                .unwrap_or((0, 0));
            check_epoch(&id, batch_epoch, seq_from_sql(current))?;
            check_applied(&id, batch_applied, seq_from_sql(last))?;
            if last >= seq {
                return Ok(Applied::AlreadyApplied);
            }
            let now = now();
            {
                let mut put = tx.prepare_cached(ADD_CHECKED)?;
                for (key, delta) in &entries {
                    match put.execute(params![key, delta, now]) {
                        Ok(_) => {}
                        Err(e) if is_not_null_violation(&e) => {
                            // A sum would leave the i64 range: nothing of the batch goes in,
                            // and the keys are named the checked way.
                            drop(put);
                            tx.rollback()?;
                            let keys = new_sums(conn, &entries)?.err().unwrap_or_default();
                            return Err(rejected(keys));
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                let mut dl = tx.prepare_cached(
                    "INSERT INTO tally_dead_letters (instance_id, seq, key, delta, reason, created_at) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?;
                for d in &dead {
                    dl.execute(params![id, seq, d.key, d.delta, d.reason, now])?;
                }
            }
            tx.execute(
                "INSERT INTO tally_instances (instance_id, last_seq, epoch, updated_at) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (instance_id) DO UPDATE SET last_seq = excluded.last_seq, updated_at = excluded.updated_at",
                params![id, seq, epoch, now],
            )?;
            tx.commit()?;
            Ok(Applied::Committed)
        })
        .await
    }

    async fn probe(&self, entries: &[(&str, i64)]) -> Result<(), StoreError> {
        let entries: Vec<(String, i64)> =
            entries.iter().map(|(k, d)| ((*k).to_owned(), *d)).collect();
        Self::with(&self.read, move |conn| {
            new_sums(conn, &entries)?.map(drop).map_err(rejected)
        })
        .await
    }

    async fn read(&self, key: &str, instance_id: &str) -> Result<Stored, StoreError> {
        let (key, id) = (key.to_owned(), instance_id.to_owned());
        Self::with(&self.read, move |conn| {
            let (value, seq): (Option<i64>, Option<i64>) = conn.query_row(
                "SELECT (SELECT value FROM counters WHERE key = ?1), \
                        (SELECT last_seq FROM tally_instances WHERE instance_id = ?2)",
                [key, id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            Ok(Stored {
                value,
                applied_seq: seq.map_or(0, seq_from_sql),
            })
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Self::with(&self.read, |conn| {
            Ok(conn.query_row("SELECT 1", [], |_| Ok(()))?)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema_of_counters(conn: &Connection) -> String {
        conn.query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'counters'",
            [],
            |r| r.get(0),
        )
        .expect("counters table")
    }

    fn page_size(conn: &Connection) -> i64 {
        conn.pragma_query_value(None, "page_size", |r| r.get(0))
            .expect("page_size")
    }

    /// A call runs on the blocking pool, except on a thread that allows blocking (the
    /// flusher's own), where it runs in place.
    #[tokio::test]
    async fn calls_run_in_place_only_on_a_thread_that_allows_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("tally.db"))
            .await
            .expect("open");
        let ran_on = || SqliteStore::with(&store.write, |_| Ok(std::thread::current().id()));
        let here = std::thread::current().id();
        assert_ne!(ran_on().await.expect("call"), here);
        crate::store::allow_blocking_here();
        assert_eq!(ran_on().await.expect("call"), here);
    }

    /// A new database gets small pages and counters keyed without a rowid, and the
    /// checkpoint threshold in pages of that size.
    #[tokio::test]
    async fn a_new_database_has_small_pages_and_counters_without_rowid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tally.db");
        let store = SqliteStore::open(&path).await.expect("open");
        drop(store);
        let conn = open_connection(&path, BUSY_TIMEOUT).expect("reopen");
        assert_eq!(page_size(&conn), NEW_PAGE_SIZE);
        assert!(schema_of_counters(&conn).contains("WITHOUT ROWID"));
        let pages: i64 = conn
            .pragma_query_value(None, "wal_autocheckpoint", |r| r.get(0))
            .expect("wal_autocheckpoint");
        assert_eq!(pages * NEW_PAGE_SIZE, WAL_CHECKPOINT_BYTES);
    }

    /// A database made before migration 3 (4 KiB pages, counters with a rowid) keeps every
    /// sum through it, and its page size, with the checkpoint threshold in its pages.
    #[tokio::test]
    async fn an_older_database_keeps_its_sums_through_the_move_to_without_rowid() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tally.db");
        {
            let mut conn = Connection::open(&path).expect("create");
            conn.pragma_update(None, "page_size", 4096)
                .expect("page_size");
            conn.pragma_update(None, "journal_mode", "WAL")
                .expect("WAL");
            conn.execute_batch(migrate::CREATE_TABLE)
                .expect("bookkeeping");
            let tx = conn.transaction().expect("tx");
            for m in migrate::SQLITE.iter().filter(|m| m.version < 3) {
                tx.execute_batch(m.sql).expect("old migration");
                tx.execute(
                    "INSERT INTO tally_migrations (version, applied_at) VALUES (?1, 'then')",
                    [m.version],
                )
                .expect("record");
            }
            tx.execute(
                "INSERT INTO counters (key, value, updated_at) VALUES ('a', 7, 'then'), \
                 ('b', -9223372036854775808, 'then'), ('c', 9223372036854775807, 'then')",
                [],
            )
            .expect("old rows");
            tx.commit().expect("commit");
            assert!(!schema_of_counters(&conn).contains("WITHOUT ROWID"));
        }
        let store = SqliteStore::open(&path).await.expect("open migrates");
        for (key, sum) in [("a", 7), ("b", i64::MIN), ("c", i64::MAX)] {
            let stored = store.read(key, "i1").await.expect("read");
            assert_eq!(stored.value, Some(sum), "{key}");
        }
        // The migrated table takes adds, to existing keys and new ones.
        let applied = store
            .apply(Batch {
                instance_id: "i1",
                epoch: 0,
                seq: 1,
                applied: 0,
                entries: &[("a", 5), ("b", 1), ("d", -2)],
                dead_letters: &[],
            })
            .await
            .expect("apply");
        assert_eq!(applied, Applied::Committed);
        for (key, sum) in [("a", 12), ("b", i64::MIN + 1), ("d", -2)] {
            let stored = store.read(key, "i1").await.expect("read");
            assert_eq!(stored.value, Some(sum), "{key}");
        }
        drop(store);
        let conn = open_connection(&path, BUSY_TIMEOUT).expect("reopen");
        assert!(schema_of_counters(&conn).contains("WITHOUT ROWID"));
        assert_eq!(page_size(&conn), 4096);
        let pages: i64 = conn
            .pragma_query_value(None, "wal_autocheckpoint", |r| r.get(0))
            .expect("wal_autocheckpoint");
        assert_eq!(pages * 4096, WAL_CHECKPOINT_BYTES);
    }
}
