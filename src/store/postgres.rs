//! The PostgreSQL store: the production and multi-instance backend.
//!
//! A batch is one transaction whatever its size: lock this instance's row (and check its
//! fencing epoch), upsert every key with one set-based statement over two arrays (`unnest`),
//! set aside its dead letters if it has any, and record the new seq; the whole transaction
//! goes out pipelined, in one round trip.
//! Sums beyond `bigint` make PostgreSQL raise `numeric_value_out_of_range`, which is reported
//! as [`StoreError::Rejected`].

use std::collections::HashMap;
use std::future::poll_fn;
use std::mem;
use std::path::Path;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tokio_postgres::config::{SslMode, TargetSessionAttrs};
use tokio_postgres::types::ToSql;
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::AbortOnDropHandle;

use crate::causes::Causes;

use super::hosts::Hosts;
use super::password::PasswordFile;
use super::timed::TimedOut;
use super::tls;
use super::{
    Applied, Batch, Claim, Claimant, Handover, Store, StoreError, Stored, check_applied,
    check_epoch, migrate, seq_from_sql, seq_to_sql,
};

/// How long to wait for a connection (to open, or to get one from the pool) before calling
/// the store unavailable. Short, so that an outage shows in `/readyz` and the logs quickly;
/// the flusher retries anyway.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The least of [`CONNECT_TIMEOUT`]'s share that each host of a URL naming several gets.
const MIN_HOST_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Unacknowledged-data limit and keepalive idle time of every connection (see `connect`).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a start waits for another session to release the instance id's lock. A
/// predecessor killed a moment ago holds it until PostgreSQL notices its connection closed
/// (at once for a local kill; a few seconds over a network that drops packets).
const HOLDER_WAIT: Duration = super::timed::CLAIM_WAIT;

/// `application_name` of the connection that holds an instance id's lock, so that
/// `pg_stat_activity` shows what it is.
const HOLDER_APPLICATION: &str = "tally instance lock";

/// Takes the session-level advisory lock of an instance id: 64-bit key from the id's text.
const TRY_HOLD: &str = "SELECT pg_try_advisory_lock(hashtextextended($1, 0))";

/// Key of the advisory lock that serialises migrations when several instances start at once.
const MIGRATION_LOCK: i64 = 0x0074_616c_6c79; // "tally" in ASCII

// `now()` is taken in the inserted rows and copied in `DO UPDATE SET`, never called there:
// Citus refuses non-IMMUTABLE functions in `DO UPDATE SET` of a distributed table (see
// docs/operations.md), and this way the same statements run on it.
/// The upsert of a batch's counters, `$keys` and `$deltas` its arrays, `$cond` a `WHERE`
/// clause (or nothing).
macro_rules! upsert {
    ($keys:literal, $deltas:literal, $cond:expr) => {
        concat!(
            "INSERT INTO counters (key, value, updated_at) SELECT k, v, now() FROM unnest(",
            $keys,
            "::text[], ",
            $deltas,
            "::int8[]) AS u(k, v)",
            $cond,
            " ON CONFLICT (key) DO UPDATE SET value = counters.value + EXCLUDED.value, \
             updated_at = EXCLUDED.updated_at"
        )
    };
}

/// Whether instance `$1` may write its batch `$3` under epoch `$2`, having seen the store
/// hold seq `$applied`: the checks of [`check_epoch`], [`check_applied`] and
/// `last_seq < seq` in SQL, on the row `LOCK_SEQ` locked. [`PgStore::apply`] makes the same
/// checks on `LOCK_SEQ`'s answer.
macro_rules! if_claimed {
    ($applied:literal) => {
        concat!(
            " WHERE (SELECT epoch = $2 AND last_seq < $3 AND last_seq >= ",
            $applied,
            " FROM tally_instances WHERE instance_id = $1)"
        )
    };
}

/// Server encodings that can hold any UTF-8 key: UTF-8 itself, and `SQL_ASCII`, which
/// stores a UTF-8 client's bytes as they are.
const ENCODINGS: [&str; 2] = ["UTF8", "SQL_ASCII"];

/// A batch's upsert for [`Store::probe`]: unconditional, rolled back.
const UPSERT: &str = upsert!("$1", "$2", "");

/// Gives an instance id that has none its row, as epoch 0 and nothing applied (what a
/// missing row stands for), so that `LOCK_SEQ` always has a row to lock. Writes nothing
/// when the row exists: every claimed instance has one.
const ENSURE_ROW: &str = "INSERT INTO tally_instances (instance_id, last_seq, epoch, updated_at) \
     VALUES ($1, 0, 0, now()) ON CONFLICT (instance_id) DO NOTHING";

const LOCK_SEQ: &str =
    "SELECT last_seq, epoch FROM tally_instances WHERE instance_id = $1 FOR UPDATE";

/// The statements after `LOCK_SEQ` in a batch's transaction, parameters `$1` instance id,
/// `$2` epoch, `$3` seq, and its applied seq last: each writes only if the batch may be
/// written (`if_claimed!`), so they can be sent before `LOCK_SEQ`'s answer is known and a
/// refused batch writes nothing.
const UPSERT_IF_CLAIMED: &str = upsert!("$4", "$5", if_claimed!("$6"));

const DEAD_LETTERS_IF_CLAIMED: &str = concat!(
    "INSERT INTO tally_dead_letters (instance_id, seq, key, delta, reason) \
     SELECT $1, $3, * FROM unnest($4::text[], $5::int8[], $6::text[])",
    if_claimed!("$7")
);

const RECORD_SEQ_IF_CLAIMED: &str = concat!(
    "INSERT INTO tally_instances (instance_id, last_seq, epoch, updated_at) \
     SELECT $1, $3, $2, now()",
    if_claimed!("$4"),
    " ON CONFLICT (instance_id) DO UPDATE SET last_seq = EXCLUDED.last_seq, \
     updated_at = EXCLUDED.updated_at"
);

/// One statement, so one implicit transaction: the upsert waits for the row lock (or the
/// uncommitted insert) of a batch still being committed, then works on its committed row.
/// Claims for journal `$2`; when the claim passes to another journal, notes the one it
/// passes from and the seq reached (the right-hand sides read the row as it was). With `$3`
/// (exclusive) it updates nothing, and returns no row, if another journal claimed the id
/// last, or a claim that recorded no claimant (an older tally's) came after this journal's
/// (checked on that committed row).
const CLAIM: &str = "INSERT INTO tally_instances \
     (instance_id, last_seq, epoch, updated_at, claimed_by, handover_seq, claimed_epoch) \
     VALUES ($1, 0, 1, now(), $2, 0, 1) \
     ON CONFLICT (instance_id) DO UPDATE SET epoch = tally_instances.epoch + 1, \
     updated_at = EXCLUDED.updated_at, \
     previous_claimant = CASE WHEN tally_instances.claimed_by IS NOT DISTINCT FROM \
     EXCLUDED.claimed_by THEN tally_instances.previous_claimant \
     ELSE tally_instances.claimed_by END, \
     handover_seq = CASE WHEN tally_instances.claimed_by IS NOT DISTINCT FROM \
     EXCLUDED.claimed_by THEN tally_instances.handover_seq \
     ELSE tally_instances.last_seq END, \
     claimed_by = EXCLUDED.claimed_by, claimed_epoch = tally_instances.epoch + 1 \
     WHERE NOT $3 OR tally_instances.claimed_by IS NULL \
     OR (tally_instances.claimed_by = EXCLUDED.claimed_by \
     AND tally_instances.claimed_epoch = tally_instances.epoch) \
     RETURNING last_seq, epoch, previous_claimant, handover_seq";

/// The claim of instance `$1` as it stands; the claimant only if the last claim recorded it.
const CLAIMANT: &str = "SELECT CASE WHEN claimed_epoch = epoch THEN claimed_by END, \
     previous_claimant, handover_seq FROM tally_instances WHERE instance_id = $1";

/// A connection from the pool that goes back to it only when its user says it ended its
/// work cleanly ([`Conn::release`]). One dropped in the middle of a statement (an attempt
/// that `--store-timeout` gave up on) or after an error is taken out of the pool and closed
/// instead: it may still be running the abandoned transaction, and the next user would
/// queue behind it. This is what lets the pool skip the check query on reuse.
struct Conn {
    client: Option<deadpool_postgres::Client>,
    /// The TLS of the store's connections, for the cancel request (see `drop`).
    tls: Option<MakeRustlsConnect>,
}

impl Conn {
    async fn get(store: &PgStore) -> Result<Self, StoreError> {
        Ok(Self {
            client: Some(store.pool.get().await?),
            tls: store.connector.tls.clone(),
        })
    }

    /// Back to the pool, for reuse.
    fn release(mut self) {
        self.client.take();
    }
}

impl std::ops::Deref for Conn {
    type Target = deadpool_postgres::Client;

    fn deref(&self) -> &Self::Target {
        // Only `release` and `drop` take the client, and both consume the guard.
        self.client.as_ref().expect("a connection until released")
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.client.as_mut().expect("a connection until released")
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            // The server may still be running the abandoned statement (e.g. waiting on a
            // row lock): the client's connection stays open until every answer it awaits
            // has come, so each attempt given up on would keep a server connection for as
            // long as the lock is held, a new one every --store-timeout, until the server
            // ran out of them. Cancelling ends the statement, and with it the connection.
            // (On a connection that is idle, a cancel request does nothing.) The token keeps
            // the connection's `sslmode`, so under `require` it must go over TLS too.
            let (cancel, tls) = (client.cancel_token(), self.tls.take());
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let cancelled = match tls {
                        None => cancel.cancel_query(NoTls).await,
                        Some(tls) => cancel.cancel_query(tls).await,
                    };
                    if let Err(e) = cancelled {
                        tracing::debug!(error = %Causes(&e), "Could not cancel the abandoned statement; its connection closes when it ends.");
                    }
                });
            }
            // Detached from the pool; dropping it closes the connection.
            drop(deadpool_postgres::Object::take(client));
            crate::metrics::Metrics::global()
                .store_connections_discarded
                .increment(1);
            tracing::debug!(
                "Closed a PostgreSQL connection whose last use did not finish cleanly (an error, or an attempt given up on); the pool opens a fresh one."
            );
        }
    }
}

/// How every new connection is opened, the pool's and the instance lock's alike: the URL's
/// settings, with the password of `--database-password-file` as the file says now, over TLS
/// when the URL says `sslmode=require` (see [`super::tls`]), to the first of the URL's hosts
/// that opens one, each host within [`Hosts::per_host`] (see [`super::hosts`]).
#[derive(Clone)]
struct Connector {
    hosts: Arc<Hosts>,
    password: Option<Arc<PasswordFile>>,
    tls: Option<MakeRustlsConnect>,
}

/// The task that drives a connection, boxed so that a plain one and a TLS one are alike.
type Driver = Pin<Box<dyn Future<Output = Result<(), tokio_postgres::Error>> + Send>>;

impl Connector {
    /// Opens a connection on the first host that opens one, as `application_name` if given
    /// (else the URL's, or tally's): the client, and the future to spawn to drive it.
    ///
    /// Every host but the last is looked up, and tried at each of its addresses, each try
    /// given [`Hosts::per_host`] for the whole attempt; the last is left to tokio-postgres,
    /// with what is left of the caller's wait, which is at least as long (an error of
    /// tokio-postgres' own, the only kind it returns, cannot be made for a time-out).
    async fn open(
        &self,
        application_name: Option<&str>,
    ) -> Result<(tokio_postgres::Client, Driver), tokio_postgres::Error> {
        // Read once for every host tried.
        let password = self.password.as_ref().map(|file| file.current());
        let settings = |config: &tokio_postgres::Config| {
            let mut config = config.clone();
            if let Some(password) = &password {
                config.password(password);
            }
            if let Some(name) = application_name {
                config.application_name(name);
            }
            config
        };
        let (before, last) = self.hosts.in_turn();
        let per_host = self.hosts.per_host;
        // The hosts before the last share what the last's share leaves of the wait, each try
        // at most `per_host`, however many addresses their names have.
        let until = Instant::now() + self.hosts.wait.saturating_sub(per_host);
        let share = || per_host.min(until.saturating_duration_since(Instant::now()));
        for host in before {
            if share().is_zero() {
                passed_over(&host.name, &"no time left before the last host", true);
                continue;
            }
            let addresses = match tokio::time::timeout(share(), host.addresses()).await {
                Ok(Ok(addresses)) => addresses,
                Ok(Err(e)) => {
                    passed_over(&host.name, &e, false);
                    continue;
                }
                Err(_) => {
                    passed_over(&host.name, &"its name was not looked up in time", true);
                    continue;
                }
            };
            for (config, name) in addresses {
                let share = share();
                if share.is_zero() {
                    passed_over(&name, &"no time left before the last host", true);
                    continue;
                }
                match tokio::time::timeout(share, self.open_on(&settings(&config))).await {
                    Ok(Ok(opened)) => return Ok(opened),
                    Ok(Err(e)) => passed_over(&name, &Causes(&e), timed_out(&e)),
                    Err(_) => passed_over(&name, &"no answer in time", true),
                }
            }
        }
        self.open_on(&settings(&last.config)).await
    }

    /// Opens a connection with `config`, one host's.
    async fn open_on(
        &self,
        config: &tokio_postgres::Config,
    ) -> Result<(tokio_postgres::Client, Driver), tokio_postgres::Error> {
        Ok(match &self.tls {
            None => {
                let (client, connection) = config.connect(NoTls).await?;
                (client, Box::pin(connection))
            }
            Some(tls) => {
                let (client, connection) = config.connect(tls.clone()).await?;
                (client, Box::pin(connection))
            }
        })
    }
}

/// Counts and logs a host (or one address of it) passed over for the next: at warn when it
/// took too long (our deadline, or tokio-postgres' on the TCP connect), as a host that hangs
/// is a fault; at info when it refused, as a standby does while another host is primary.
fn passed_over(host: &str, why: &dyn std::fmt::Display, timeout: bool) {
    let counts = &crate::metrics::Metrics::global().store_hosts_passed_over;
    if timeout {
        counts.timeout.increment(1);
        tracing::warn!(host, error = %why, "A PostgreSQL host did not open a connection in time (it does not answer, or too slowly); trying the next. If it is down for good, stop it or take it out of --database-url.");
    } else {
        counts.refused.increment(1);
        tracing::info!(host, error = %why, "A PostgreSQL host did not open a connection; trying the next.");
    }
}

/// Whether `e` is a time-out of the TCP connect (tokio-postgres' `connect_timeout`).
fn timed_out(e: &tokio_postgres::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(e) = cause {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cause = e.source();
    }
    false
}

/// A pooled connection as deadpool takes it: the client, and the task that drives it.
type Connected =
    Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>;

/// The pool opens its connections here, so that each reads the password file again.
impl deadpool_postgres::Connect for Connector {
    fn connect(
        &self,
        _: &tokio_postgres::Config,
    ) -> Pin<Box<dyn Future<Output = Connected> + Send + '_>> {
        Box::pin(async move {
            let (client, connection) = self.open(None).await?;
            // As deadpool's own connector does it.
            let driver = tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::warn!(error = %Causes(&e), "A pooled PostgreSQL connection ended with an error.");
                }
            });
            Ok((client, driver))
        })
    }
}

/// The PostgreSQL backend: a connection pool, plus one connection per claimed instance id
/// that holds the id's lock.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    connector: Connector,
    /// Instance ids whose lock this store holds. Dropping the last clone of the store
    /// drops the guards, which close the lock connections (an app restarted in-process, as
    /// the tests do, must be able to claim its id again).
    held: Arc<Mutex<HashMap<String, DropGuard>>>,
}

/// Whether the server refused `e`'s statement for the values in it: SQLSTATE class 22,
/// "data exception".
fn is_data_error(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|code| code.code().starts_with("22"))
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        if is_data_error(&e) {
            StoreError::Rejected {
                reason: e
                    .as_db_error()
                    .map_or_else(|| e.to_string(), |d| d.message().to_owned()),
                keys: Vec::new(),
            }
        } else {
            StoreError::unavailable(e)
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        use deadpool_postgres::{PoolError, TimeoutType};
        match e {
            PoolError::Backend(e) => not_connected(e),
            // deadpool's own words, "Timeout occurred while creating a new object", do not
            // say what timed out.
            PoolError::Timeout(TimeoutType::Create) => StoreError::unavailable(NotConnected(
                "no connection to PostgreSQL opened in time (--database-url: a host whose \
                 packets are dropped, or one that accepts and does not answer, holds the \
                 wait)"
                    .into(),
            )),
            PoolError::Timeout(TimeoutType::Wait) => StoreError::unavailable(TimedOut {
                operation: "waiting for a pooled connection",
                timeout: CONNECT_TIMEOUT,
            }),
            e => StoreError::unavailable(e),
        }
    }
}

/// A connection that could not be opened: never the data's fault (a server that refuses a
/// connection's settings answers with SQLSTATE class 22 too), so always unavailable, and
/// with what to do when it was the server's certificate that was refused.
fn not_connected(e: tokio_postgres::Error) -> StoreError {
    match tls::explained(e) {
        Ok(untrusted) => StoreError::unavailable(NotConnected(untrusted.into())),
        Err(e) => StoreError::unavailable(NotConnected(e.into())),
    }
}

/// A connection that could not be opened ([`not_connected`]), told apart by
/// [`StoreError::failure`]; it reads as its cause.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct NotConnected(Box<dyn std::error::Error + Send + Sync>);

impl PgStore {
    /// Connects a pool of at most `pool_size` connections to `url` and applies pending
    /// migrations.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unavailable`] if the URL is invalid or the server cannot be reached;
    /// [`StoreError::Migration`] if the schema cannot be brought up to date;
    /// [`StoreError::Encoding`] if the database's encoding cannot hold every key.
    pub async fn connect(url: &str, pool_size: usize) -> Result<Self, StoreError> {
        Self::connect_with(url, None, None, pool_size).await
    }

    /// [`PgStore::connect`], with the password apart from the URL, in a file read again for
    /// every new connection (`--database-password-file`; see [`PasswordFile`]), and more
    /// root certificates for TLS (`--database-ca-file`; see [`super::tls`]).
    ///
    /// # Errors
    ///
    /// As [`PgStore::connect`], and [`StoreError::Tls`] if the URL asks for TLS
    /// (`sslmode=require`) and it cannot be set up.
    pub async fn connect_with(
        url: &str,
        password: Option<PasswordFile>,
        ca_file: Option<&Path>,
        pool_size: usize,
    ) -> Result<Self, StoreError> {
        let mut config: tokio_postgres::Config = url.parse()?;
        let tls = match config.get_ssl_mode() {
            SslMode::Require => Some(tls::connector(ca_file)?),
            _ => None,
        };
        // A peer that vanished without a reset (a failover, a partition): the kernel drops
        // a connection whose data stays unacknowledged this long, instead of retrying for
        // ~15 minutes, and keepalives find idle pooled connections that died.
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(TCP_USER_TIMEOUT);
        }
        // tokio-postgres' default idle time is 2 h; a URL that sets one keeps it.
        if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
            config.keepalives_idle(TCP_USER_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("tally");
        }
        // Several hosts (a primary and its standby): each is tried in turn for its share
        // of the pool's wait for a new connection (see `Connector::open`), so that a first
        // host that does not answer at all (its machine down, its packets dropped) or
        // accepts and then hangs leaves the next one time within that wait.
        let hosts = Hosts::new(&config, CONNECT_TIMEOUT, MIN_HOST_CONNECT_TIMEOUT)
            .map_err(StoreError::unavailable)?;
        if hosts.count() > 1 && config.get_target_session_attrs() != TargetSessionAttrs::ReadWrite {
            tracing::warn!(
                hosts = hosts.count(),
                "--database-url names several hosts without target_session_attrs=read-write: \
                 a connection may be opened on a standby, where every batch fails as \
                 read-only. Add ?target_session_attrs=read-write to the URL \
                 (docs/operations.md, Faults)."
            );
        }
        let create_timeout = hosts.wait;
        let connector = Connector {
            hosts: Arc::new(hosts),
            password: password.map(Arc::new),
            tls,
        };
        let manager = Manager::from_connect(
            config,
            connector.clone(),
            ManagerConfig {
                // Fast: a pooled connection is reused as it is (unless closed), without a
                // check query, which was one more round trip before every batch. A connection
                // that may be stuck never goes back to the pool: see [`Conn`].
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(create_timeout))
            .build()
            .map_err(StoreError::unavailable)?;
        let store = Self {
            pool,
            connector,
            held: Arc::default(),
        };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut client = Conn::get(self).await?;
        // Checked first, so that nothing is created in a database tally cannot use: in any
        // other encoding a key outside its character set fails the batch (22P05), and its
        // dead letter fails the same way, so the flusher would retry that batch for ever.
        let encoding: String = client
            .query_one("SELECT current_setting('server_encoding')", &[])
            .await?
            .get(0);
        if !ENCODINGS.contains(&encoding.as_str()) {
            client.release();
            return Err(StoreError::Encoding { encoding });
        }
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
                    .map_err(|e| StoreError::Migration(Causes(&e).to_string()))?;
                tx.execute(
                    "INSERT INTO tally_migrations (version, applied_at) VALUES ($1, now()::text)",
                    &[&m.version],
                )
                .await?;
                tracing::info!(version = m.version, "Applied PostgreSQL migration.");
            }
        }
        tx.commit().await?;
        client.release();
        Ok(())
    }

    /// Takes `instance_id`'s advisory lock on a connection of its own and keeps both for
    /// the life of the process, so that a second live process with the same id refuses to
    /// start. The lock is what tells a live duplicate from a dead predecessor; correctness
    /// does not rest on it (a lock goes with its connection, while the process may live
    /// on): the claim's epoch does. If the connection drops, it is re-taken in the
    /// background.
    async fn hold(&self, instance_id: &str) -> Result<(), StoreError> {
        if self.lock_held().contains_key(instance_id) {
            return Ok(());
        }
        let started = Instant::now();
        let mut announced = false;
        let client = loop {
            if let Some(client) = try_hold(&self.connector, instance_id).await? {
                break client;
            }
            if started.elapsed() >= HOLDER_WAIT {
                return Err(StoreError::InUse {
                    instance_id: instance_id.to_owned(),
                    waited: HOLDER_WAIT,
                });
            }
            if !announced {
                tracing::warn!(
                    %instance_id,
                    wait = ?HOLDER_WAIT,
                    "Another PostgreSQL session holds this instance id; waiting in case it is a process that just died."
                );
                announced = true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let stop = CancellationToken::new();
        // Dropping the guard below (with the last clone of the store) cancels the task; its
        // client goes with it, which ends the connection and with it the lock.
        let (connector, id) = (self.connector.clone(), instance_id.to_owned());
        let keeping = stop.clone();
        tokio::spawn(async move {
            keeping
                .run_until_cancelled(hold_forever(connector, id, client))
                .await
        });
        self.lock_held()
            .insert(instance_id.to_owned(), stop.drop_guard());
        Ok(())
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, HashMap<String, DropGuard>> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The longest a new connection may spend on the URL's other hosts before it tries the
    /// last one: the wait for a connection less the last host's share; zero for a URL with
    /// one host.
    pub fn wait_before_last_host(&self) -> Duration {
        let hosts = &self.connector.hosts;
        if hosts.count() > 1 {
            hosts.wait.saturating_sub(hosts.per_host)
        } else {
            Duration::ZERO
        }
    }

    /// The pool, for tests and tools that inspect the database directly.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }
}

/// A connection holding `instance_id`'s lock, or `None` when another session holds it.
async fn try_hold(connector: &Connector, instance_id: &str) -> Result<Option<Holder>, StoreError> {
    // `connect_timeout` bounds each host's TCP connect only: a server that accepts and
    // never answers would hold this attempt, and with it the lock's retake, for good.
    let timeout = connector.hosts.wait;
    (tokio::time::timeout(timeout, try_hold_now(connector, instance_id)).await).map_err(|_| {
        StoreError::unavailable(TimedOut {
            operation: "taking the instance id's lock",
            timeout,
        })
    })?
}

async fn try_hold_now(
    connector: &Connector,
    instance_id: &str,
) -> Result<Option<Holder>, StoreError> {
    let (client, connection) =
        (connector.open(Some(HOLDER_APPLICATION)).await).map_err(not_connected)?;
    // Until it is handed over in a `Holder`, the connection ends with this attempt: one
    // given up on at `try_hold`'s deadline must not keep its session open (a client
    // dropped mid-query leaves its connection waiting for the answer), nor a lock the
    // server may have granted meanwhile.
    let connection = AbortOnDropHandle::new(tokio::spawn(connection));
    let row = client.query_one(TRY_HOLD, &[&instance_id]).await?;
    Ok(row.get::<_, bool>(0).then(|| Holder {
        client,
        connection: connection.detach(),
    }))
}

/// The connection that holds an instance id's lock, and the task driving it.
struct Holder {
    client: tokio_postgres::Client,
    connection: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
}

/// Keeps `holder` open; when its connection ends, takes the lock again on a new one.
async fn hold_forever(connector: Connector, instance_id: String, mut holder: Holder) {
    loop {
        let ended = (&mut holder.connection).await;
        drop(holder.client);
        tracing::warn!(
            %instance_id,
            error = ?ended.ok().and_then(Result::err).map(|e| Causes(&e).to_string()),
            "Lost the connection that holds this instance id's lock; taking it again. (Fencing still keeps another process's writes apart.)"
        );
        let mut warned = false;
        holder = loop {
            tokio::time::sleep(HOLDER_WAIT).await;
            match try_hold(&connector, &instance_id).await {
                Ok(Some(holder)) => break holder,
                Ok(None) => {
                    tracing::warn!(%instance_id, "Another session holds this instance id's lock; this process will be fenced off if it claimed the id.")
                }
                // The first failure says why; the rest of an outage is the flusher's to tell.
                Err(e) if !warned => {
                    warned = true;
                    tracing::warn!(%instance_id, error = %e, retry_every = ?HOLDER_WAIT, "Cannot take the instance id's lock yet; trying again.")
                }
                Err(e) => {
                    tracing::debug!(%instance_id, error = %e, "Cannot take the instance id's lock yet.")
                }
            }
        };
        tracing::info!(%instance_id, "Holding this instance id's lock again.");
    }
}

fn split<'a>(entries: &[(&'a str, i64)]) -> (Vec<&'a str>, Vec<i64>) {
    entries.iter().copied().unzip()
}

/// `statement`, noting in `unsent` when it failed before it was sent. A tokio-postgres
/// query encodes and queues its messages on its first poll and then waits for the answer,
/// so an error on that first poll means nothing of it went out (it could not be encoded,
/// or the connection is closed).
async fn noting_unsent<T, E>(
    unsent: &AtomicBool,
    statement: impl Future<Output = Result<T, E>>,
) -> Result<T, E> {
    let mut statement = pin!(statement);
    let mut first = true;
    poll_fn(|cx| {
        let poll = statement.as_mut().poll(cx);
        if mem::take(&mut first) && matches!(poll, Poll::Ready(Err(_))) {
            unsent.store(true, Ordering::Relaxed);
        }
        poll
    })
    .await
}

#[async_trait]
impl Store for PgStore {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn claim(&self, instance_id: &str, by: Claimant<'_>) -> Result<Claim, StoreError> {
        self.hold(instance_id).await?;
        let client = Conn::get(self).await?;
        let claimed = client
            .query_opt(CLAIM, &[&instance_id, &by.journal, &by.exclusive])
            .await?;
        let Some(row) = claimed else {
            let row = client.query_one(CLAIMANT, &[&instance_id]).await?;
            client.release();
            return Err(StoreError::ClaimedElsewhere {
                instance_id: instance_id.to_owned(),
                claimant: row.get(0),
                handover: Handover {
                    from: row.get(1),
                    seq: seq_from_sql(row.get(2)),
                },
            });
        };
        client.release();
        Ok(Claim {
            last_seq: seq_from_sql(row.get(0)),
            epoch: seq_from_sql(row.get(1)),
            handover: Handover {
                from: row.get(2),
                seq: seq_from_sql(row.get(3)),
            },
        })
    }

    #[tracing::instrument(name = "pg.apply", skip_all, fields(seq = batch.seq, keys = batch.entries.len()))]
    async fn apply(&self, batch: Batch<'_>) -> Result<Applied, StoreError> {
        let seq = seq_to_sql(batch.seq)?;
        let epoch = seq_to_sql(batch.epoch)?;
        let applied = seq_to_sql(batch.applied)?;
        let client = Conn::get(self).await?;
        // Every statement of the batch is prepared once per connection and cached: text
        // statements would cost a parse round trip each time.
        let ensure_row = client.prepare_cached(ENSURE_ROW).await?;
        let lock_seq = client.prepare_cached(LOCK_SEQ).await?;
        let upsert = client.prepare_cached(UPSERT_IF_CLAIMED).await?;
        let record_seq = client.prepare_cached(RECORD_SEQ_IF_CLAIMED).await?;
        let dead_letters = client.prepare_cached(DEAD_LETTERS_IF_CLAIMED).await?;
        let (keys, deltas) = split(batch.entries);
        let dead: (Vec<&str>, Vec<i64>, Vec<&str>) = batch
            .dead_letters
            .iter()
            .map(|d| (d.key.as_str(), d.delta, d.reason.as_str()))
            .collect();
        // The whole transaction goes out at once, pipelined on the connection: one round
        // trip where it took three (`BEGIN`, then the statements, then `COMMIT`). The server
        // runs them in order (`biased`: polled, and so sent, in the order written): the
        // instance's row is locked before anything is written and stays locked to the end, and
        // every write is conditional on it (`if_claimed!`), so a batch the checks refuse
        // (fenced, the store gone back, or already applied) commits nothing; the same checks
        // are made below on the lock's answer, to say why. A statement the server fails aborts the transaction, and
        // `COMMIT` then rolls it back; its error is returned. A statement that fails before it
        // is sent (it could not be encoded) turns the `COMMIT` into a `ROLLBACK`, so the others
        // cannot commit without it. If this future is dropped (store timeout) once sent, the
        // transaction runs on to its own end, and the connection's next user queues behind it:
        // the batch may then commit after the caller gave up on it, which the retry's
        // `last_seq` check covers, as for any lost answer to a `COMMIT`.
        let unsent = AtomicBool::new(false);
        let id: &(dyn ToSql + Sync) = &batch.instance_id;
        let claim: [&(dyn ToSql + Sync); 4] = [id, &epoch, &seq, &applied];
        let upsert_params: [&(dyn ToSql + Sync); 6] = [id, &epoch, &seq, &keys, &deltas, &applied];
        let (begun, ensured, row, upserted, set_aside, recorded, ended) = tokio::join!(
            biased;
            noting_unsent(&unsent, client.batch_execute("BEGIN")),
            noting_unsent(&unsent, client.execute(&ensure_row, &claim[..1])),
            noting_unsent(&unsent, client.query_one(&lock_seq, &claim[..1])),
            noting_unsent(&unsent, client.execute(&upsert, &upsert_params)),
            noting_unsent(&unsent, async {
                if dead.0.is_empty() {
                    return Ok(0);
                }
                let params: [&(dyn ToSql + Sync); 7] =
                    [id, &epoch, &seq, &dead.0, &dead.1, &dead.2, &applied];
                client.execute(&dead_letters, &params).await
            }),
            noting_unsent(&unsent, client.execute(&record_seq, &claim)),
            // Polled last, after every statement above had its first poll.
            async {
                if unsent.load(Ordering::Relaxed) {
                    client.batch_execute("ROLLBACK").await
                } else {
                    client.batch_execute("COMMIT").await
                }
            },
        );
        // Every statement has its answer, and the transaction ended with the last one (a
        // COMMIT after a failed statement rolls back): the connection is idle again. It goes
        // back to the pool unless a statement failed for a reason other than the data: a
        // session keeps what it was opened with, so one the server made read-only (a
        // database set `default_transaction_read_only`, an old primary) would fail every
        // batch it is given after the server is writable again, where a fresh one works.
        // (The statements after the first failed one fail only because it did.)
        let first_failed = [
            begun.as_ref().err(),
            ensured.as_ref().err(),
            row.as_ref().err(),
            upserted.as_ref().err(),
            set_aside.as_ref().err(),
            recorded.as_ref().err(),
        ]
        .into_iter()
        .flatten()
        .next();
        if ended.is_ok() && first_failed.is_none_or(is_data_error) {
            client.release();
        }
        begun?;
        ensured?;
        let row = row?;
        let (last, current): (i64, i64) = (row.get(0), row.get(1));
        check_epoch(batch.instance_id, batch.epoch, seq_from_sql(current))?;
        check_applied(batch.instance_id, batch.applied, seq_from_sql(last))?;
        if last >= seq {
            return Ok(Applied::AlreadyApplied);
        }
        upserted?;
        set_aside?;
        let recorded = recorded?;
        ended?;
        if recorded != 1 {
            // Cannot happen: the checks above and the statements' own ran on the same locked
            // row. Said loudly rather than reported as applied; the retry is safe, because the
            // upsert ran under the same condition as the seq upsert, so it wrote nothing either.
            return Err(StoreError::unavailable(format!(
                "batch {seq} of {}: its seq was not recorded although the checks passed",
                batch.instance_id
            )));
        }
        Ok(Applied::Committed)
    }

    async fn probe(&self, entries: &[(&str, i64)]) -> Result<(), StoreError> {
        let mut client = Conn::get(self).await?;
        let tx = client.transaction().await?;
        let (keys, deltas) = split(entries);
        let upsert = tx.prepare_cached(UPSERT).await?;
        tx.execute(&upsert, &[&keys, &deltas]).await?;
        tx.rollback().await?;
        client.release();
        Ok(())
    }

    async fn read(&self, key: &str, instance_id: &str) -> Result<Stored, StoreError> {
        let client = Conn::get(self).await?;
        let row = client
            .query_one(
                "SELECT (SELECT value FROM counters WHERE key = $1), \
                        (SELECT last_seq FROM tally_instances WHERE instance_id = $2)",
                &[&key, &instance_id],
            )
            .await?;
        client.release();
        let seq: Option<i64> = row.get(1);
        Ok(Stored {
            value: row.get(0),
            applied_seq: seq.map_or(0, seq_from_sql),
        })
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let client = Conn::get(self).await?;
        client.simple_query("SELECT 1").await?;
        client.release();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connector without TLS or password to 127.0.0.1:`port`, as user `tally`.
    fn plain_connector(port: u16, open_timeout: Duration) -> Connector {
        let mut config = tokio_postgres::Config::new();
        config.host("127.0.0.1").port(port).user("tally");
        Connector {
            hosts: Arc::new(Hosts::new(&config, open_timeout, Duration::ZERO).expect("one host")),
            password: None,
            tls: None,
        }
    }

    /// A server that accepts the connection and never answers holds a lock attempt no
    /// longer than a new connection may take.
    #[tokio::test]
    async fn taking_the_lock_from_a_server_that_never_answers_is_given_up_on() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = silent.local_addr().expect("its address").port();
        let connector = plain_connector(port, Duration::from_millis(200));
        let started = Instant::now();
        let attempt = tokio::time::timeout(Duration::from_secs(5), try_hold(&connector, "id"))
            .await
            .expect("given up on by its own deadline");
        assert!(matches!(&attempt, Err(e) if e.failure() == super::super::Failure::Timeout));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        drop(silent);
    }

    /// One that logs tally in and then never answers its lock query: the attempt given up
    /// on closes its connection (a lock the server granted meanwhile goes with it).
    #[tokio::test]
    async fn a_lock_attempt_given_up_on_mid_query_closes_its_connection() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("its address").port();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("a connection");
            let mut buffer = [0u8; 4096];
            // The startup message; then AuthenticationOk and ReadyForQuery (idle).
            let _ = socket.read(&mut buffer).await.expect("the startup message");
            socket
                .write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0, b'Z', 0, 0, 0, 5, b'I'])
                .await
                .expect("log in");
            // Then silence, until the client closes the connection.
            loop {
                match socket.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
        let connector = plain_connector(port, Duration::from_millis(300));
        let attempt = try_hold(&connector, "id").await;
        assert!(matches!(&attempt, Err(e) if e.failure() == super::super::Failure::Timeout));
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the connection is closed once the attempt is given up on")
            .expect("the fake server");
    }

    #[tokio::test]
    async fn only_a_statement_failing_on_its_first_poll_counts_as_unsent() {
        let unsent = AtomicBool::new(false);
        // Answered after a wait: it was sent, whatever the answer.
        let answered_later = async {
            tokio::task::yield_now().await;
            Err::<(), &str>("server error")
        };
        assert!(noting_unsent(&unsent, answered_later).await.is_err());
        assert!(!unsent.load(Ordering::Relaxed));
        assert_eq!(
            noting_unsent(&unsent, async { Ok::<_, ()>(1) }).await,
            Ok(1)
        );
        assert!(!unsent.load(Ordering::Relaxed));
        // Failed at once: never sent.
        let refused = std::future::ready(Err::<(), &str>("cannot encode"));
        assert!(noting_unsent(&unsent, refused).await.is_err());
        assert!(unsent.load(Ordering::Relaxed));
    }
}
