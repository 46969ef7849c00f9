//! Bounded memory (invariant 6): past `--max-pending-keys`, new keys get 503 with
//! `Retry-After` and `/readyz` says why, while keys already pending still add; nothing
//! accepted is lost.

use std::time::Duration;

use crate::app::{spawn_app, test_config};
use crate::both_stores::on_both_stores;
use crate::common::{Backend, data_dir};
use crate::store::stored_counters;

async fn new_keys_are_shed_with_503_past_the_pending_key_cap(backend: Backend) {
    let dir = data_dir();
    let mut config = test_config(dir.path(), &backend);
    config.flush.max_pending_keys = 3_usize.try_into().expect("non-zero");
    // Nothing is flushed while the test runs, so the cap stays reached.
    config.flush.interval = Duration::from_secs(3600);
    let app = spawn_app(config, None).await;
    for key in ["a", "b", "c"] {
        assert_eq!(app.increment(key, 1).await, 202, "key {key} under the cap");
    }

    let response = app
        .post_raw(
            &format!("{}/increment", app.address),
            "application/json",
            r#"{"key":"d","value":1}"#,
        )
        .await;
    assert_eq!(response.status(), 503, "a fourth key is refused");
    assert!(
        response.headers().contains_key("retry-after"),
        "503 carries Retry-After"
    );
    let body: serde_json::Value = response.json().await.expect("json body");
    assert_eq!(body["error"], "overloaded");

    assert_eq!(app.increment("a", 5).await, 202, "a pending key still adds");
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), 503, "/readyz reports the shedding");
    let body: serde_json::Value = ready.json().await.expect("json body");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("max-pending-keys")),
        "/readyz says why: {body}"
    );

    app.shutdown().await.expect("clean shutdown");
    let stored = stored_counters(dir.path(), &backend).await;
    let want = [("a", 6), ("b", 1), ("c", 1)].map(|(k, v)| (k.to_owned(), v));
    assert_eq!(
        stored,
        want.into_iter().collect(),
        "accepted deltas only, all of them"
    );
}

on_both_stores!(
    new_keys_are_shed_with_503_past_the_pending_key_cap_sqlite,
    new_keys_are_shed_with_503_past_the_pending_key_cap_postgres,
    new_keys_are_shed_with_503_past_the_pending_key_cap
);
