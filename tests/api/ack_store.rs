//! `--ack store`: a 202 means the delta is already committed in the store.

use std::time::Duration;

use serde_json::json;
use tally::config::Ack;

use crate::app::{spawn_app, test_config};
use crate::both_stores::on_both_stores;
use crate::common::{Backend, data_dir};
use crate::helpers::open_store;

async fn with_ack_store_a_202_means_the_value_is_in_the_store(backend: Backend) {
    let dir = data_dir();
    let mut config = test_config(dir.path(), &backend);
    config.journal.ack = Ack::Store;
    // Only the requests themselves can make the flusher write.
    config.flush.interval = Duration::from_secs(3600);
    let app = spawn_app(config, None).await;
    let store = open_store(dir.path(), &backend).await;
    let stored = |key: &'static str| {
        let store = store.clone();
        async move {
            store
                .read(key, "reader")
                .await
                .expect("read the store")
                .value
        }
    };

    let mut sum = 0;
    for value in [5, -2, 40, i64::from(i32::MAX), -7] {
        assert_eq!(app.increment("acked", value).await, 202);
        sum += value;
        assert_eq!(
            stored("acked").await,
            Some(sum),
            "right after a 202, no wait"
        );
    }

    let response = app
        .client
        .post(format!("{}/increments", app.address))
        .json(&json!([{"key": "b1", "value": 1}, {"key": "b2", "value": -2}]))
        .send()
        .await
        .expect("POST batch");
    assert_eq!(response.status(), 202);
    assert_eq!(stored("b1").await, Some(1));
    assert_eq!(stored("b2").await, Some(-2));

    // Concurrent requests on distinct keys: each 202 finds its own delta stored.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..16_i64 {
        let (client, address, store) = (app.client.clone(), app.address.clone(), store.clone());
        tasks.spawn(async move {
            let key = format!("c{i}");
            let response = client
                .post(format!("{address}/increment"))
                .json(&json!({"key": key, "value": i + 1}))
                .send()
                .await
                .expect("POST");
            assert_eq!(response.status(), 202);
            let value = store.read(&key, "reader").await.expect("read").value;
            assert_eq!(value, Some(i + 1), "key {key} right after its 202");
        });
    }
    while let Some(task) = tasks.join_next().await {
        task.expect("request task panicked");
    }
    app.shutdown().await.expect("clean shutdown");
}

on_both_stores!(
    with_ack_store_a_202_means_the_value_is_in_the_store_sqlite,
    with_ack_store_a_202_means_the_value_is_in_the_store_postgres,
    with_ack_store_a_202_means_the_value_is_in_the_store
);
