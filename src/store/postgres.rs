//! The PostgreSQL store: the production and multi-instance backend.
//!
//! A batch is one transaction of three statements whatever its size: lock this instance's
//! seq row, upsert every key with one set-based statement over two arrays (`unnest`), and
//! record the new seq. Sums beyond `bigint` make PostgreSQL raise `numeric_value_out_of_range`,
//! which is reported as [`StoreError::Rejected`].

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use super::{Applied, Batch, Store, StoreError, Stored, migrate, seq_from_sql, seq_to_sql};

/// How long to wait for a connection (to open, or to get one from the pool) before calling
/// the store unavailable. Short, so that an outage shows in `/readyz` and the logs quickly;
/// the flusher retries anyway.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Key of the advisory lock that serialises migrations when several instances start at once.
const MIGRATION_LOCK: i64 = 0x0074_616c_6c79; // "tally" in ASCII

const UPSERT: &str = "INSERT INTO counters (key, value) \
     SELECT * FROM unnest($1::text[], $2::int8[]) \
     ON CONFLICT (key) DO UPDATE SET value = counters.value + EXCLUDED.value, updated_at = now()";

const LOCK_SEQ: &str = "SELECT last_seq FROM tally_instances WHERE instance_id = $1 FOR UPDATE";

const RECORD_SEQ: &str = "INSERT INTO tally_instances (instance_id, last_seq) VALUES ($1, $2) \
     ON CONFLICT (instance_id) DO UPDATE SET last_seq = EXCLUDED.last_seq, updated_at = now()";

/// The PostgreSQL backend: a connection pool.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.code() {
            // Class 22 is "data exception": the values themselves are at fault.
            Some(code) if code.code().starts_with("22") => StoreError::Rejected {
                reason: e
                    .as_db_error()
                    .map_or_else(|| e.to_string(), |d| d.message().to_owned()),
                keys: Vec::new(),
            },
            _ => StoreError::unavailable(e),
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        StoreError::unavailable(e)
    }
}

impl PgStore {
    /// Connects a pool of at most `pool_size` connections to `url` and applies pending
    /// migrations.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] if the URL is invalid or the server cannot be reached;
    /// [`StoreError::Migration`] if the schema cannot be brought up to date.
    pub async fn connect(url: &str, pool_size: usize) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url.parse()?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("tally");
        }
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(StoreError::unavailable)?;
        let store = Self { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute(migrate::CREATE_TABLE).await?;
        for m in migrate::POSTGRES {
            let done = tx
                .query_opt(
                    "SELECT 1 FROM tally_migrations WHERE version = $1",
                    &[&m.version],
                )
                .await?
                .is_some();
            if !done {
                tx.batch_execute(m.sql)
                    .await
                    .map_err(|e| StoreError::Migration(e.to_string()))?;
                tx.execute(
                    "INSERT INTO tally_migrations (version, applied_at) VALUES ($1, now()::text)",
                    &[&m.version],
                )
                .await?;
                tracing::info!(version = m.version, "Applied PostgreSQL migration.");
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// The pool, for tests and tools that inspect the database directly.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }
}

fn split<'a>(entries: &[(&'a str, i64)]) -> (Vec<&'a str>, Vec<i64>) {
    entries.iter().copied().unzip()
}

#[async_trait]
impl Store for PgStore {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn last_applied(&self, instance_id: &str) -> Result<u64, StoreError> {
        let client = self.pool.get().await?;
        let row = client
            .query_opt(
                "SELECT last_seq FROM tally_instances WHERE instance_id = $1",
                &[&instance_id],
            )
            .await?;
        Ok(row.map_or(0, |r| seq_from_sql(r.get(0))))
    }

    #[tracing::instrument(name = "pg.apply", skip_all, fields(seq = batch.seq, keys = batch.entries.len()))]
    async fn apply(&self, batch: Batch<'_>) -> Result<Applied, StoreError> {
        let seq = seq_to_sql(batch.seq)?;
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        // Every statement of the batch is prepared once per connection and cached: text
        // statements would cost a parse round trip each time.
        let lock_seq = tx.prepare_cached(LOCK_SEQ).await?;
        let last = tx.query_opt(&lock_seq, &[&batch.instance_id]).await?;
        if last.is_some_and(|r| r.get::<_, i64>(0) >= seq) {
            return Ok(Applied::AlreadyApplied);
        }
        let (keys, deltas) = split(batch.entries);
        let upsert = tx.prepare_cached(UPSERT).await?;
        tx.execute(&upsert, &[&keys, &deltas]).await?;
        if !batch.dead_letters.is_empty() {
            let keys: Vec<&str> = batch.dead_letters.iter().map(|d| d.key.as_str()).collect();
            let deltas: Vec<i64> = batch.dead_letters.iter().map(|d| d.delta).collect();
            let reasons: Vec<&str> = batch
                .dead_letters
                .iter()
                .map(|d| d.reason.as_str())
                .collect();
            tx.execute(
                "INSERT INTO tally_dead_letters (instance_id, seq, key, delta, reason) \
                 SELECT $1, $2, * FROM unnest($3::text[], $4::int8[], $5::text[])",
                &[&batch.instance_id, &seq, &keys, &deltas, &reasons],
            )
            .await?;
        }
        let record_seq = tx.prepare_cached(RECORD_SEQ).await?;
        tx.execute(&record_seq, &[&batch.instance_id, &seq]).await?;
        tx.commit().await?;
        Ok(Applied::Committed)
    }

    async fn probe(&self, entries: &[(&str, i64)]) -> Result<(), StoreError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let (keys, deltas) = split(entries);
        let upsert = tx.prepare_cached(UPSERT).await?;
        tx.execute(&upsert, &[&keys, &deltas]).await?;
        tx.rollback().await?;
        Ok(())
    }

    async fn read(&self, key: &str, instance_id: &str) -> Result<Stored, StoreError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "SELECT (SELECT value FROM counters WHERE key = $1), \
                        (SELECT last_seq FROM tally_instances WHERE instance_id = $2)",
                &[&key, &instance_id],
            )
            .await?;
        let seq: Option<i64> = row.get(1);
        Ok(Stored {
            value: row.get(0),
            applied_seq: seq.map_or(0, seq_from_sql),
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let client = self.pool.get().await?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    }
}
