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
            read_sqlite(&data_dir.join("tally.db"), |conn| {
                let mut statement = conn.prepare(SQL)?;
                let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
                rows.collect()
            })
            .await
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

/// Runs `f` on a read-only connection to the SQLite file at `path`, on a blocking thread.
/// The connection waits for a writer's lock (the app may be flushing while the test looks)
/// instead of failing at once.
pub async fn read_sqlite<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
) -> T {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let conn = rusqlite::Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        f(&conn)
    })
    .await
    .expect("SQLite reader thread")
    .expect("read the SQLite store directly")
}
