//! The app in process on port 0, for tests that need its internals (a wrapped store, a
//! configuration no flag can express) rather than the real binary.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tally::config::{Ack, Config, DatabaseUrl};
use tally::startup::App;
use tally::store::Store;
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::common::Backend;

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
    // Two serving threads whatever the CPU count: tests run many apps at once.
    config.http.http_threads = std::num::NonZeroUsize::new(2);
    config
}

/// A tally app running in this process on a free port.
pub struct TestApp {
    /// Base URL, `http://127.0.0.1:PORT`.
    pub address: String,
    /// The bound socket address, for raw TCP clients.
    #[allow(
        dead_code,
        reason = "read by the hardening tests only; api and durability include this file too"
    )]
    pub socket: SocketAddr,
    /// The `--metrics-listen` address, when /metrics is served apart.
    #[allow(
        dead_code,
        reason = "read by the hardening tests only; api and durability include this file too"
    )]
    pub metrics: Option<SocketAddr>,
    #[allow(
        dead_code,
        reason = "read by the api tests only; durability and hardening include this file too"
    )]
    pub client: reqwest::Client,
    #[allow(
        dead_code,
        reason = "read by the api tests only; durability and hardening include this file too"
    )]
    pub instance_id: String,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    /// The data directory, when the app owns it (the hardening tests hand it over); held,
    /// never read.
    pub _dir: Option<TempDir>,
}

/// Starts `App` on `store` (or the configured one when `None`) with `config`.
pub async fn spawn_app(config: Config, store: Option<Arc<dyn Store>>) -> TestApp {
    init_test_log();
    let app = match store {
        Some(store) => App::build_with_store(config, store).await,
        None => App::build(config).await,
    }
    .expect("app builds");
    let socket = app.local_addr().expect("bound");
    let metrics = app.metrics_addr().expect("metrics address");
    let instance_id = app.instance_id().to_owned();
    let stop = CancellationToken::new();
    let task = tokio::spawn(app.run_until(stop.clone().cancelled_owned()));
    TestApp {
        address: format!("http://{socket}"),
        socket,
        metrics,
        client: reqwest::Client::new(),
        instance_id,
        stop,
        task,
        _dir: None,
    }
}

impl TestApp {
    /// The URL of `path` (e.g. `/readyz`) on this app.
    #[allow(
        dead_code,
        reason = "the durability tests build their URLs from `address`"
    )]
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// Stops the app as SIGTERM would, and waits for the drain.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await.expect("app task panicked")
    }
}

/// Logs to stderr when `TEST_LOG` is set; silent otherwise.
pub fn init_test_log() {
    if std::env::var_os("TEST_LOG").is_some() {
        tally::telemetry::init(tally::config::LogFormat::Text);
    }
}
