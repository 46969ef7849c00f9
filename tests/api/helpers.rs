//! Helpers of the API tests only: reading single values through a second handle on the
//! app's store, and signed random deltas. (Shared helpers live in `tests/common/`.)

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tally::store::{PgStore, SqliteStore, Store};

use crate::common::Backend;
use crate::rng::Rng;

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

impl Rng {
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
