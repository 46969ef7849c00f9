//! `POST /increment` and `POST /increments`: the happy paths, and what reaches the store.

use std::time::Duration;

use serde_json::json;

use crate::app::{spawn_app, test_config};
use crate::both_stores::on_both_stores;
use crate::common::{Backend, data_dir};
use crate::helpers::wait_until_stored;
use crate::store::stored_counters;

/// Long enough for a 100 ms flush interval on a busy 2-core machine.
const FLUSH_WAIT: Duration = Duration::from_secs(10);

async fn json_and_form_increments_get_an_empty_202_and_reach_the_store(backend: Backend) {
    let dir = data_dir();
    let app = spawn_app(test_config(dir.path(), &backend), None).await;
    let url = format!("{}/increment", app.address);

    let response = app
        .client
        .post(&url)
        .json(&json!({"key": "apples", "value": 5}))
        .send()
        .await
        .expect("POST json");
    assert_eq!(response.status(), 202);
    assert_eq!(
        response.text().await.expect("body"),
        "",
        "202 has an empty body"
    );

    let response = app
        .post_raw(
            &url,
            "application/x-www-form-urlencoded",
            "key=apples&value=-2",
        )
        .await;
    assert_eq!(response.status(), 202);
    assert_eq!(
        response.text().await.expect("body"),
        "",
        "202 has an empty body"
    );

    // Percent-encoded form fields, a charset parameter, unknown JSON fields, the extremes of
    // the 64-bit range.
    let response = app
        .post_raw(
            &url,
            "application/x-www-form-urlencoded; charset=utf-8",
            "value=7&key=a%2Fb+c",
        )
        .await;
    assert_eq!(response.status(), 202);
    let response = app
        .post_raw(
            &url,
            "application/json; charset=utf-8",
            r#"{"value": 9223372036854775807, "key": "max", "note": "ignored"}"#,
        )
        .await;
    assert_eq!(response.status(), 202);
    assert_eq!(app.increment("min", i64::MIN).await, 202);

    assert_eq!(app.counter("apples").await, Some(3));
    assert_eq!(app.counter("a/b c").await, Some(7));
    assert_eq!(app.counter("max").await, Some(i128::from(i64::MAX)));
    assert_eq!(app.counter("min").await, Some(i128::from(i64::MIN)));

    // The flusher writes them while the app runs.
    wait_until_stored(dir.path(), &backend, "apples", 3, FLUSH_WAIT).await;
    wait_until_stored(dir.path(), &backend, "min", i64::MIN, FLUSH_WAIT).await;
    app.shutdown().await.expect("clean shutdown");

    let stored = stored_counters(dir.path(), &backend).await;
    let want = [
        ("a/b c".to_owned(), 7),
        ("apples".to_owned(), 3),
        ("max".to_owned(), i64::MAX),
        ("min".to_owned(), i64::MIN),
    ];
    assert_eq!(stored, want.into_iter().collect());
}

on_both_stores!(
    json_and_form_increments_get_an_empty_202_and_reach_the_store_sqlite,
    json_and_form_increments_get_an_empty_202_and_reach_the_store_postgres,
    json_and_form_increments_get_an_empty_202_and_reach_the_store
);

async fn batches_in_json_and_ndjson_are_accepted_whole(backend: Backend) {
    let dir = data_dir();
    let app = spawn_app(test_config(dir.path(), &backend), None).await;
    let url = format!("{}/increments", app.address);

    let response = app
        .client
        .post(&url)
        .json(&json!([
            {"key": "x", "value": 10},
            {"key": "y", "value": -4},
            {"key": "x", "value": 1},
        ]))
        .send()
        .await
        .expect("POST json array");
    assert_eq!(response.status(), 202);
    let body: serde_json::Value = response.json().await.expect("json body");
    assert_eq!(body, json!({"accepted": 3}));

    let ndjson = "{\"key\":\"x\",\"value\":100}\n\n{\"key\":\"z\",\"value\":2}\r\n";
    let response = app.post_raw(&url, "application/x-ndjson", ndjson).await;
    assert_eq!(response.status(), 202);
    let body: serde_json::Value = response.json().await.expect("json body");
    assert_eq!(body, json!({"accepted": 2}));

    let response = app
        .client
        .post(&url)
        .json(&json!([]))
        .send()
        .await
        .expect("POST empty array");
    assert_eq!(response.status(), 202);
    let body: serde_json::Value = response.json().await.expect("json body");
    assert_eq!(body, json!({"accepted": 0}));

    assert_eq!(app.counter("x").await, Some(111));
    assert_eq!(app.counter("y").await, Some(-4));
    assert_eq!(app.counter("z").await, Some(2));

    wait_until_stored(dir.path(), &backend, "x", 111, FLUSH_WAIT).await;
    app.shutdown().await.expect("clean shutdown");
    let stored = stored_counters(dir.path(), &backend).await;
    let want = [
        ("x".to_owned(), 111),
        ("y".to_owned(), -4),
        ("z".to_owned(), 2),
    ];
    assert_eq!(stored, want.into_iter().collect());
}

on_both_stores!(
    batches_in_json_and_ndjson_are_accepted_whole_sqlite,
    batches_in_json_and_ndjson_are_accepted_whole_postgres,
    batches_in_json_and_ndjson_are_accepted_whole
);
