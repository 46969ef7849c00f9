//! `on_both_stores!`: the same test body on a fresh SQLite file and on a fresh PostgreSQL
//! database, as two tests.

/// Declares one `#[tokio::test]` per store that runs `$body(backend)`, where `backend` is a
/// [`crate::common::Backend`]: SQLite (the body picks its data directory) or a fresh
/// PostgreSQL database (skipped loudly without a server; dropped after the test).
///
/// - `on_both_stores!(sqlite_test, postgres_test, body)` names the two tests;
/// - `on_both_stores!(body)` puts them in a module named after the body: `body::sqlite` and
///   `body::postgres`.
macro_rules! on_both_stores {
    ($sqlite:ident, $postgres:ident, $body:path) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $sqlite() {
            $body($crate::common::Backend::Sqlite).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $postgres() {
            let test = concat!(module_path!(), "::", stringify!($postgres));
            let Some(db) = $crate::pg::PgDatabase::create(test).await else {
                return;
            };
            $body($crate::common::Backend::Postgres(db.url.clone())).await;
        }
    };
    ($body:ident) => {
        mod $body {
            $crate::both_stores::on_both_stores!(sqlite, postgres, super::$body);
        }
    };
}
pub(crate) use on_both_stores;
