//! PostgreSQL for tests: the server at `TALLY_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and a fresh database per test. If no
//! server answers, PostgreSQL tests are skipped with a loud notice, unless
//! `TALLY_REQUIRE_POSTGRES=1` (CI sets it), which turns the skip into a failure.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Where the test PostgreSQL server is.
fn pg_admin_url() -> String {
    std::env::var("TALLY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

fn postgres_required() -> bool {
    std::env::var("TALLY_REQUIRE_POSTGRES").is_ok_and(|v| v == "1" || v == "true")
}

/// Writes straight to the process's stderr. libtest captures `eprintln!` of passing tests;
/// a skipped PostgreSQL test must be seen, so this bypasses the capture.
pub fn shout(message: &str) {
    let _ = std::io::stderr().write_all(format!("\n*** {message}\n").as_bytes());
}

/// A fresh, empty PostgreSQL database, dropped (best effort) when this guard is dropped.
pub struct PgDatabase {
    pub url: String,
    name: String,
}

impl PgDatabase {
    /// Creates a uniquely named database for `test`. `None` when no server answers and
    /// PostgreSQL is not required (the skip is announced on stderr).
    ///
    /// # Panics
    ///
    /// When no server answers and `TALLY_REQUIRE_POSTGRES=1`.
    pub async fn create(test: &str) -> Option<Self> {
        Self::create_with(test, "").await
    }

    /// [`PgDatabase::create`], with `options` after `CREATE DATABASE <name>` (an
    /// encoding, say).
    ///
    /// # Panics
    ///
    /// As [`PgDatabase::create`].
    pub async fn create_with(test: &str, options: &str) -> Option<Self> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let admin = pg_admin_url();
        let client = match connect(&admin).await {
            Ok(client) => client,
            Err(e) if postgres_required() => {
                panic!(
                    "TALLY_REQUIRE_POSTGRES is set but PostgreSQL at {admin} is unreachable: {e}"
                )
            }
            Err(e) => {
                shout(&format!(
                    "SKIPPED PostgreSQL test `{test}`: no server at {admin} ({e}). Start PostgreSQL \
                     or set TALLY_TEST_DATABASE_URL; CI sets TALLY_REQUIRE_POSTGRES=1 to make this fatal."
                ));
                return None;
            }
        };
        let name = format!(
            "tally_test_{}_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            uuid::Uuid::new_v4().simple()
        );
        client
            .batch_execute(&format!("CREATE DATABASE {name} {options}"))
            .await
            .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
        let url = match admin.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => panic!("TALLY_TEST_DATABASE_URL {admin} has no database part"),
        };
        Some(Self { url, name })
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let (admin, name) = (pg_admin_url(), self.name.clone());
        // Drop runs outside async context guarantees; use a throwaway runtime on a thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let client = connect(&admin).await.ok()?;
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// A connection to the database at `url`, for assertions and sabotage.
pub async fn client(url: &str) -> tokio_postgres::Client {
    connect(url).await.expect("connect to the test database")
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = url.parse()?;
    config.connect_timeout(Duration::from_secs(3));
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Slow commits on demand, to hold a batch's transaction open in its COMMIT: a deferred
/// constraint trigger on `tally_instances` sleeps that long while the switch is on.
#[allow(dead_code, reason = "used by the durability tests only")]
pub struct SlowCommits<'a> {
    client: &'a tokio_postgres::Client,
}

#[allow(dead_code, reason = "used by the durability tests only")]
impl<'a> SlowCommits<'a> {
    /// Installs the trigger (off) in `client`'s database, which tally has migrated.
    pub async fn install(client: &'a tokio_postgres::Client, sleep: Duration) -> Self {
        client
            .batch_execute(&format!(
                "CREATE TABLE slow_commit_switch (slow boolean NOT NULL);
                 INSERT INTO slow_commit_switch VALUES (false);
                 CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                     IF (SELECT slow FROM slow_commit_switch) THEN
                         PERFORM pg_sleep({});
                     END IF;
                     RETURN NULL;
                 END $$;
                 CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT OR UPDATE ON tally_instances
                     DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();",
                sleep.as_secs_f64()
            ))
            .await
            .expect("install the slow-commit trigger");
        Self { client }
    }

    /// Turns slow commits on or off (a commit already sleeping sleeps on).
    pub async fn set(&self, slow: bool) {
        self.client
            .execute("UPDATE slow_commit_switch SET slow = $1", &[&slow])
            .await
            .expect("switch slow commits");
    }

    /// Whether a commit is sleeping in the trigger now.
    pub async fn sleeping(&self) -> bool {
        sessions(self.client, "wait_event = 'PgSleep'").await > 0
    }
}

/// How many sessions of `client`'s database wait on a lock.
#[allow(dead_code, reason = "used by the durability tests only")]
pub async fn sessions_waiting_on_a_lock(client: &tokio_postgres::Client) -> i64 {
    sessions(client, "wait_event_type = 'Lock'").await
}

/// How many sessions of `client`'s database `pg_stat_activity` shows matching `condition`.
async fn sessions(client: &tokio_postgres::Client, condition: &str) -> i64 {
    client
        .query_one(
            &format!(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND {condition}"
            ),
            &[],
        )
        .await
        .expect("read pg_stat_activity")
        .get(0)
}
