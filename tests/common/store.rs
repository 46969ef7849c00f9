//! Reading the store behind tally's back: every row of the `counters` table, with plain SQL
//! on a connection of the test's own (never through tally's code or a proxy).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use crate::common::Backend;

/// Every counter of the store of an app with this data directory and backend.
pub async fn stored_counters(data_dir: &Path, backend: &Backend) -> BTreeMap<String, i64> {
    const SQL: &str = "SELECT key, value FROM counters";
    match backend {
        Backend::Sqlite => {
            let path = data_dir.join("tally.db");
            tokio::task::spawn_blocking(move || {
                // Read-only, and patient with a writer holding the lock: the app may be
                // flushing while the test looks.
                let conn = rusqlite::Connection::open_with_flags(
                    &path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )?;
                conn.busy_timeout(Duration::from_secs(5))?;
                let mut statement = conn.prepare(SQL)?;
                let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
                rows.collect::<rusqlite::Result<_>>()
            })
            .await
            .expect("reader thread")
            .expect("read the counters from SQLite")
        }
        Backend::Postgres(url) => crate::pg::client(url)
            .await
            .query(SQL, &[])
            .await
            .expect("read the counters from PostgreSQL")
            .into_iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect(),
    }
}
