//! `GET /counters/{key}`: stored value plus pending delta, 404 for unknown keys, keys that
//! need percent-encoding.

use std::time::Duration;

use serde_json::json;

use crate::app::{spawn_app, test_config};
use crate::both_stores::on_both_stores;
use crate::common::{Backend, data_dir};
use crate::helpers::stored_value;
use crate::requests::percent_encode;
use crate::store::stored_counters;

async fn counter_is_the_stored_value_plus_the_pending_delta(backend: Backend) {
    let dir = data_dir();
    let mut config = test_config(dir.path(), &backend);
    // No flush but the one at shutdown: what is pending stays pending while we look.
    config.flush.interval = Duration::from_secs(3600);

    let first = spawn_app(config.clone(), None).await;
    assert_eq!(first.increment("k", 10).await, 202);
    first.shutdown().await.expect("clean shutdown");
    assert_eq!(stored_value(dir.path(), &backend, "k").await, Some(10));

    let second = spawn_app(config, None).await;
    assert_eq!(second.increment("k", 5).await, 202);
    assert_eq!(second.increment("only-pending", -3).await, 202);
    // The store still holds 10: the 5 is pending in memory, and the answer adds both.
    assert_eq!(stored_value(dir.path(), &backend, "k").await, Some(10));
    assert_eq!(
        stored_value(dir.path(), &backend, "only-pending").await,
        None
    );
    let response = second.get("/counters/k").await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body, json!({"key": "k", "value": 15}));
    assert_eq!(second.counter("only-pending").await, Some(-3));
    second.shutdown().await.expect("clean shutdown");
    assert_eq!(stored_value(dir.path(), &backend, "k").await, Some(15));
}

on_both_stores!(
    counter_is_the_stored_value_plus_the_pending_delta_sqlite,
    counter_is_the_stored_value_plus_the_pending_delta_postgres,
    counter_is_the_stored_value_plus_the_pending_delta
);

async fn unknown_key_is_a_404_with_a_json_error(backend: Backend) {
    let dir = data_dir();
    let app = spawn_app(test_config(dir.path(), &backend), None).await;
    let response = app.get("/counters/never-seen").await;
    assert_eq!(response.status(), 404);
    let body: serde_json::Value = response.json().await.expect("json error body");
    assert_eq!(body["error"], "not_found");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    app.shutdown().await.expect("clean shutdown");
}

on_both_stores!(
    unknown_key_is_a_404_with_a_json_error_sqlite,
    unknown_key_is_a_404_with_a_json_error_postgres,
    unknown_key_is_a_404_with_a_json_error
);

/// Keys that must be percent-encoded in a path, stored and read back byte for byte.
const AWKWARD_KEYS: &[&str] = &[
    "a/b",
    "a/b/",
    "with space",
    "100%",
    "q?x=1#frag",
    "héllo wörld",
    "ключ",
    "数",
    "🎉 party",
    "+plus+",
];

async fn percent_encoded_and_unicode_keys_round_trip(backend: Backend) {
    let dir = data_dir();
    let app = spawn_app(test_config(dir.path(), &backend), None).await;
    for (i, key) in AWKWARD_KEYS.iter().enumerate() {
        let value = i64::try_from(i).expect("small") + 1;
        assert_eq!(app.increment(key, value).await, 202, "POST key {key:?}");
    }
    for (i, key) in AWKWARD_KEYS.iter().enumerate() {
        let response = app.get(&format!("/counters/{}", percent_encode(key))).await;
        assert_eq!(response.status(), 200, "GET key {key:?}");
        let body: serde_json::Value = response.json().await.expect("json");
        assert_eq!(body, json!({"key": key, "value": i + 1}), "GET key {key:?}");
    }
    app.shutdown().await.expect("clean shutdown");
    let stored = stored_counters(dir.path(), &backend).await;
    let want = AWKWARD_KEYS
        .iter()
        .enumerate()
        .map(|(i, k)| ((*k).to_owned(), i64::try_from(i).expect("small") + 1))
        .collect();
    assert_eq!(stored, want);
}

on_both_stores!(
    percent_encoded_and_unicode_keys_round_trip_sqlite,
    percent_encoded_and_unicode_keys_round_trip_postgres,
    percent_encoded_and_unicode_keys_round_trip
);
