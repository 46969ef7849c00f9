//! Helpers shared by the API test modules: running one test body on both stores, reading
//! the store behind the app's back, percent-encoding, metrics scraping, deterministic values.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{Backend, open_store};

/// Declares a `#[tokio::test]` per store that runs `$body(backend)`: `$sqlite` on a fresh
/// SQLite file, `$postgres` on a fresh PostgreSQL database (skipped loudly without a server).
macro_rules! on_both_stores {
    ($sqlite:ident, $postgres:ident, $body:path) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $sqlite() {
            $body(crate::common::Backend::Sqlite).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $postgres() {
            let Some(db) = crate::common::PgDatabase::create(stringify!($postgres)).await else {
                return;
            };
            $body(crate::common::Backend::Postgres(db.url.clone())).await;
        }
    };
}
pub(crate) use on_both_stores;

/// Every row of the `counters` table, read with plain SQL (not through tally's code).
pub async fn stored_counters(data_dir: &Path, backend: &Backend) -> BTreeMap<String, i64> {
    match backend {
        Backend::Sqlite => {
            let path = data_dir.join("tally.db");
            tokio::task::spawn_blocking(move || {
                let conn = rusqlite::Connection::open(&path).expect("open the SQLite file");
                let mut statement = conn
                    .prepare("SELECT key, value FROM counters")
                    .expect("prepare");
                statement
                    .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
                    .expect("query counters")
                    .collect::<Result<_, _>>()
                    .expect("read counters")
            })
            .await
            .expect("reader thread")
        }
        Backend::Postgres(url) => {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .expect("connect to the test database");
            tokio::spawn(connection);
            client
                .query("SELECT key, value FROM counters", &[])
                .await
                .expect("query counters")
                .into_iter()
                .map(|row| (row.get(0), row.get(1)))
                .collect()
        }
    }
}

/// A key's stored value, read through a second handle on the app's store.
pub async fn stored_value(data_dir: &Path, backend: &Backend, key: &str) -> Option<i64> {
    open_store(data_dir, backend)
        .await
        .read(key, "no-such-instance")
        .await
        .expect("read the store")
        .value
}

/// Polls the store until `key` holds `want`; panics with what it saw after `timeout`.
pub async fn wait_until_stored(
    data_dir: &Path,
    backend: &Backend,
    key: &str,
    want: i64,
    timeout: Duration,
) {
    let store = open_store(data_dir, backend).await;
    let deadline = Instant::now() + timeout;
    loop {
        let got = store
            .read(key, "no-such-instance")
            .await
            .expect("read the store")
            .value;
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "key {key:?}: store holds {got:?} after {timeout:?}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of one sample in a Prometheus text exposition, e.g.
/// `tally_flush_batches_total{result="failed"}`; 0 when absent.
pub fn metric(exposition: &str, sample: &str) -> f64 {
    exposition
        .lines()
        .filter_map(|line| line.strip_prefix(sample))
        .filter_map(|rest| rest.strip_prefix(' '))
        .find_map(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

/// GETs `/metrics` from `address`.
pub async fn scrape(client: &reqwest::Client, address: &str) -> String {
    let response = client
        .get(format!("{address}/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(response.status(), 200, "GET /metrics");
    response.text().await.expect("metrics text")
}
