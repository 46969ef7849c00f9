//! Test support shared by every integration test binary: real PostgreSQL databases, an
//! in-process app on port 0, and the real `tally` binary as a child process.
//!
//! PostgreSQL: tests use the server at `TALLY_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and create a fresh database per test. If
//! no server answers, PostgreSQL tests are skipped with a loud notice, unless
//! `TALLY_REQUIRE_POSTGRES=1` (CI sets it), which turns the skip into a failure.
#![allow(dead_code)] // each test binary uses a different part of this module

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tally::config::{Ack, Config, DatabaseUrl};
use tally::startup::App;
use tally::store::{PgStore, SqliteStore, Store};
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Where the test PostgreSQL server is.
pub fn pg_admin_url() -> String {
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
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("cannot create test database {name}: {e}"));
        let url = match admin.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => panic!("TALLY_TEST_DATABASE_URL {admin} has no database part"),
        };
        Some(Self { url, name })
    }

    /// A direct connection to this database, for assertions and sabotage.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url)
            .await
            .expect("connect to the test database")
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

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = url.parse()?;
    config.connect_timeout(Duration::from_secs(3));
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Which store a test app runs on.
#[derive(Debug, Clone)]
pub enum Backend {
    Sqlite,
    Postgres(String),
}

/// A configuration for tests: port 0, the given data dir and backend, a short flush
/// interval, memory ack unless changed.
pub fn test_config(data_dir: &Path, backend: &Backend) -> Config {
    let mut config = Config::defaults();
    config.http.listen = "127.0.0.1:0".parse().expect("valid address");
    config.store.data_dir = data_dir.to_owned();
    config.store.database_url = match backend {
        Backend::Sqlite => None,
        Backend::Postgres(url) => Some(DatabaseUrl::new(url.clone()).expect("a postgres URL")),
    };
    config.store.instance_id = None;
    config.flush.interval = Duration::from_millis(100);
    config.journal.ack = Ack::Memory;
    config.http.shutdown_timeout = Duration::from_secs(10);
    config
}

/// Opens a second handle on the app's store, for assertions.
pub async fn open_store(data_dir: &Path, backend: &Backend) -> Arc<dyn Store> {
    match backend {
        Backend::Sqlite => Arc::new(
            SqliteStore::open(&data_dir.join("tally.db"))
                .await
                .expect("open sqlite"),
        ),
        Backend::Postgres(url) => {
            Arc::new(PgStore::connect(url, 2).await.expect("connect postgres"))
        }
    }
}

/// A tally app running in this process on a free port.
pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub instance_id: String,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

/// Starts `App` on `store` (or the configured one when `None`) with `config`.
pub async fn spawn_app(config: Config, store: Option<Arc<dyn Store>>) -> TestApp {
    init_test_log();
    let app = match store {
        Some(store) => App::build_with_store(config, store).await,
        None => App::build(config).await,
    }
    .expect("app builds");
    let address = format!("http://{}", app.local_addr().expect("bound"));
    let instance_id = app.instance_id().to_owned();
    let stop = CancellationToken::new();
    let task = tokio::spawn(app.run_until(stop.clone().cancelled_owned()));
    TestApp {
        address,
        client: reqwest::Client::new(),
        instance_id,
        stop,
        task,
    }
}

impl TestApp {
    /// `POST /increment` with a JSON body; returns the status code.
    pub async fn increment(&self, key: &str, value: i64) -> u16 {
        self.client
            .post(format!("{}/increment", self.address))
            .json(&serde_json::json!({ "key": key, "value": value }))
            .send()
            .await
            .expect("request sent")
            .status()
            .as_u16()
    }

    /// `GET path` (e.g. `/readyz`) on this app.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.address))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// `POST` of a raw `body` with `content_type` to `url`.
    pub async fn post_raw(
        &self,
        url: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.client
            .post(url)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {url}: {e}"))
    }

    /// `GET /counters/{key}` (the key percent-encoded): the value, or `None` on 404.
    pub async fn counter(&self, key: &str) -> Option<i128> {
        let response = self
            .get(&format!("/counters/{}", percent_encode(key)))
            .await;
        if response.status() == 404 {
            return None;
        }
        assert_eq!(response.status(), 200, "GET /counters/{key}");
        let body: serde_json::Value = response.json().await.expect("json body");
        body["value"].as_i64().map(i128::from)
    }

    /// Stops the app as SIGTERM would, and waits for the drain.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await.expect("app task panicked")
    }
}

/// Percent-encodes every byte outside RFC 3986's unreserved set, for a URL path segment
/// (`a/b` → `a%2Fb`).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Logs to stderr when `TEST_LOG` is set; silent otherwise.
pub fn init_test_log() {
    if std::env::var_os("TEST_LOG").is_some() {
        tally::telemetry::init(tally::config::LogFormat::Text);
    }
}

/// A temp data directory.
pub fn data_dir() -> TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// SplitMix64: a tiny seeded generator, so test traffic is reproducible without a `rand`
/// dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (the modulo bias is irrelevant for test traffic).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A value in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// A value in `-limit..=limit`, zero excluded.
    pub fn nonzero(&mut self, limit: i64) -> i64 {
        let magnitude = i64::try_from(self.below(limit.unsigned_abs()) + 1).expect("small");
        if self.next_u64() & 1 == 0 {
            magnitude
        } else {
            -magnitude
        }
    }
}
