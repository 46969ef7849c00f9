use crate::app::{spawn_app, test_config};
use crate::common::{Backend, data_dir};
use crate::pg::PgDatabase;

async fn increments_are_counted_and_stored(backend: Backend) {
    let dir = data_dir();
    let app = spawn_app(test_config(dir.path(), &backend), None).await;
    assert_eq!(app.increment("a", 5).await, 202);
    assert_eq!(app.increment("a", -2).await, 202);
    assert_eq!(app.counter("a").await, Some(3));
    assert_eq!(app.counter("never").await, None);
    app.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn smoke_sqlite() {
    increments_are_counted_and_stored(Backend::Sqlite).await;
}

#[tokio::test]
async fn smoke_postgres() {
    let Some(db) = PgDatabase::create("smoke_postgres").await else {
        return;
    };
    increments_are_counted_and_stored(Backend::Postgres(db.url.clone())).await;
}
