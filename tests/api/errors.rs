//! The error contract: every bad request gets the right 4xx and a JSON body
//! `{"error", "message"}`, nothing of it reaches the store, and the server keeps serving.

use std::collections::BTreeMap;

use reqwest::Method;
use serde_json::json;

use crate::app::{TestApp, spawn_app, test_config};
use crate::both_stores::on_both_stores;
use crate::common::{Backend, data_dir};
use crate::store::stored_counters;

/// The body limit set for these tests, small so that a too-large body is cheap to send.
const MAX_BODY_BYTES: usize = 1024;
/// The batch item limit set for these tests.
const MAX_BATCH_ITEMS: usize = 5;

const JSON: Option<&str> = Some("application/json");
const FORM: Option<&str> = Some("application/x-www-form-urlencoded");
const NDJSON: Option<&str> = Some("application/x-ndjson");

/// One bad request and the answer it must get.
struct Case {
    name: &'static str,
    method: Method,
    path: String,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
}

fn case(
    name: &'static str,
    method: Method,
    path: &str,
    content_type: Option<&'static str>,
    body: impl Into<Vec<u8>>,
    status: u16,
    code: &'static str,
) -> Case {
    Case {
        name,
        method,
        path: path.to_owned(),
        content_type,
        body: body.into(),
        status,
        code,
    }
}

/// `POST /increment` with `body`.
fn one(
    name: &'static str,
    content_type: Option<&'static str>,
    body: impl Into<Vec<u8>>,
    status: u16,
    code: &'static str,
) -> Case {
    case(
        name,
        Method::POST,
        "/increment",
        content_type,
        body,
        status,
        code,
    )
}

/// `POST /increments` with `body`.
fn many(
    name: &'static str,
    content_type: Option<&'static str>,
    body: impl Into<Vec<u8>>,
    status: u16,
    code: &'static str,
) -> Case {
    case(
        name,
        Method::POST,
        "/increments",
        content_type,
        body,
        status,
        code,
    )
}

/// Every bad request. All keys start with `bad` so that the final check can tell them apart.
#[rustfmt::skip]
fn cases() -> Vec<Case> {
    let long_key = "b".repeat(257);
    let padded = format!(
        r#"{{"key":"bad-padded","value":1}}{}"#,
        " ".repeat(MAX_BODY_BYTES)
    );
    let padded_batch = format!(
        r#"[{{"key":"bad-padded","value":1}}]{}"#,
        " ".repeat(MAX_BODY_BYTES)
    );
    let too_many = serde_json::to_vec(&vec![
        json!({"key": "bad-many", "value": 1});
        MAX_BATCH_ITEMS + 1
    ])
    .expect("json");
    vec![
        // Malformed bodies: 400.
        one("truncated JSON", JSON, r#"{"key":"bad","value":1"#, 400, "malformed_body"),
        one("not JSON at all", JSON, "hello", 400, "malformed_body"),
        one("empty JSON body", JSON, "", 400, "malformed_body"),
        one("trailing garbage", JSON, r#"{"key":"bad","value":1} x"#, 400, "malformed_body"),
        one("invalid UTF-8", JSON, b"{\"key\":\"bad\xff\",\"value\":1}".to_vec(), 400, "malformed_body"),
        // Wrong types and values: 422.
        one("value as a string", JSON, r#"{"key":"bad","value":"1"}"#, 422, "invalid_value"),
        one("value null", JSON, r#"{"key":"bad","value":null}"#, 422, "invalid_value"),
        one("value boolean", JSON, r#"{"key":"bad","value":true}"#, 422, "invalid_value"),
        one("key as a number", JSON, r#"{"key":1,"value":1}"#, 422, "invalid_value"),
        one("key as an object", JSON, r#"{"key":{"a":1},"value":1}"#, 422, "invalid_value"),
        one("array instead of object", JSON, r#"[{"key":"bad","value":1}]"#, 422, "invalid_value"),
        one("bare number", JSON, "5", 422, "invalid_value"),
        one("float value", JSON, r#"{"key":"bad","value":1.5}"#, 422, "invalid_value"),
        one("integral float value", JSON, r#"{"key":"bad","value":1.0}"#, 422, "invalid_value"),
        one("exponent value", JSON, r#"{"key":"bad","value":1e3}"#, 422, "invalid_value"),
        one("value above i64::MAX", JSON, r#"{"key":"bad","value":9223372036854775808}"#, 422, "invalid_value"),
        one("value below i64::MIN", JSON, r#"{"key":"bad","value":-9223372036854775809}"#, 422, "invalid_value"),
        one("huge value", JSON, r#"{"key":"bad","value":123456789012345678901234567890}"#, 422, "invalid_value"),
        one("missing key", JSON, r#"{"value":1}"#, 422, "invalid_value"),
        one("missing value", JSON, r#"{"key":"bad"}"#, 422, "invalid_value"),
        one("empty object", JSON, "{}", 422, "invalid_value"),
        one("empty key", JSON, r#"{"key":"","value":1}"#, 422, "invalid_value"),
        one("257-byte key", JSON, format!(r#"{{"key":"{long_key}","value":1}}"#), 422, "invalid_value"),
        one("NUL in key", JSON, r#"{"key":"bad\u0000x","value":1}"#, 422, "invalid_value"),
        // Forms.
        one("form without value", FORM, "key=bad", 422, "invalid_value"),
        one("form without key", FORM, "value=1", 422, "invalid_value"),
        one("form value not a number", FORM, "key=bad&value=abc", 422, "invalid_value"),
        one("form float value", FORM, "key=bad&value=1.5", 422, "invalid_value"),
        one("form value above i64::MAX", FORM, "key=bad&value=9223372036854775808", 422, "invalid_value"),
        one("form value below i64::MIN", FORM, "key=bad&value=-9223372036854775809", 422, "invalid_value"),
        one("form empty key", FORM, "key=&value=1", 422, "invalid_value"),
        one("form NUL in key", FORM, "key=bad%00x&value=1", 422, "invalid_value"),
        one("form 257-byte key", FORM, format!("key={long_key}&value=1"), 422, "invalid_value"),
        // Content types: 415.
        one("text/plain", Some("text/plain"), r#"{"key":"bad","value":1}"#, 415, "unsupported_media_type"),
        one("no content type", None, r#"{"key":"bad","value":1}"#, 415, "unsupported_media_type"),
        one("XML", Some("application/xml"), "<key>bad</key>", 415, "unsupported_media_type"),
        one("NDJSON to /increment", NDJSON, r#"{"key":"bad","value":1}"#, 415, "unsupported_media_type"),
        many("form to /increments", FORM, "key=bad&value=1", 415, "unsupported_media_type"),
        many("no content type to /increments", None, r#"[{"key":"bad","value":1}]"#, 415, "unsupported_media_type"),
        // Sizes: 413.
        one("body over --max-body-bytes", JSON, padded, 413, "too_large"),
        many("batch body over --max-body-bytes", JSON, padded_batch, 413, "too_large"),
        many("more items than --max-batch-items", JSON, too_many, 413, "too_large"),
        // Batches: one bad item and nothing of the batch is applied.
        many("batch with an empty key", JSON, r#"[{"key":"bad-batch","value":1},{"key":"","value":2}]"#, 422, "invalid_value"),
        many("batch with a float", JSON, r#"[{"key":"bad-batch","value":1},{"key":"bad-batch2","value":2.5}]"#, 422, "invalid_value"),
        many("batch with a missing value", JSON, r#"[{"key":"bad-batch","value":1},{"key":"bad-batch2"}]"#, 422, "invalid_value"),
        many("batch that is an object", JSON, r#"{"key":"bad-batch","value":1}"#, 422, "invalid_value"),
        many("truncated batch", JSON, r#"[{"key":"bad-batch","value":1},"#, 400, "malformed_body"),
        many("NDJSON with a malformed line", NDJSON, "{\"key\":\"bad-batch\",\"value\":1}\n{oops\n", 400, "malformed_body"),
        many("NDJSON with a NUL key", NDJSON, "{\"key\":\"bad-batch\",\"value\":1}\n{\"key\":\"bad\\u0000\",\"value\":1}\n", 422, "invalid_value"),
        many("batch summing past i64::MAX", JSON, r#"[{"key":"bad-sum","value":9223372036854775807},{"key":"bad-sum","value":1}]"#, 422, "invalid_value"),
        // Routes and methods.
        case("unknown route", Method::GET, "/nope", None, "", 404, "not_found"),
        case("unknown route under /increment", Method::POST, "/increment/extra", JSON, r#"{"key":"bad","value":1}"#, 404, "not_found"),
        case("counters without a key", Method::GET, "/counters/", None, "", 404, "not_found"),
        case("GET /increment", Method::GET, "/increment", None, "", 405, "method_not_allowed"),
        case("PUT /increment", Method::PUT, "/increment", JSON, r#"{"key":"bad","value":1}"#, 405, "method_not_allowed"),
        case("DELETE /counters/x", Method::DELETE, "/counters/bad", None, "", 405, "method_not_allowed"),
        case("POST /counters/x", Method::POST, "/counters/bad", JSON, r#"{"key":"bad","value":1}"#, 405, "method_not_allowed"),
        case("POST /healthz", Method::POST, "/healthz", None, "", 405, "method_not_allowed"),
        // Reads of invalid keys.
        case("GET a 257-byte key", Method::GET, &format!("/counters/{long_key}"), None, "", 422, "invalid_value"),
        case("GET a key with NUL", Method::GET, "/counters/bad%00x", None, "", 422, "invalid_value"),
    ]
}

async fn assert_healthy(app: &TestApp, after: &str) {
    let response = app
        .client
        .get(format!("{}/healthz", app.address))
        .send()
        .await
        .unwrap_or_else(|e| panic!("server gone after {after:?}: {e}"));
    assert_eq!(response.status(), 200, "/healthz after {after:?}");
}

async fn bad_requests_get_the_right_4xx_and_json_and_store_nothing(backend: Backend) {
    let dir = data_dir();
    let mut config = test_config(dir.path(), &backend);
    config.limits.max_body_bytes = MAX_BODY_BYTES;
    config.limits.max_batch_items = MAX_BATCH_ITEMS.try_into().expect("non-zero");
    let app = spawn_app(config, None).await;
    // A control value, so that "nothing stored" is checked against a working store.
    assert_eq!(app.increment("good", 1).await, 202);

    let mut failures = Vec::new();
    for case in cases() {
        let mut request = app
            .client
            .request(case.method.clone(), format!("{}{}", app.address, case.path))
            .body(case.body.clone());
        if let Some(content_type) = case.content_type {
            request = request.header("content-type", content_type);
        }
        let response = request.send().await.expect("request sent");
        let status = response.status().as_u16();
        let body = response.text().await.expect("body");
        let parsed: Option<serde_json::Value> = serde_json::from_str(&body).ok();
        let code = parsed.as_ref().and_then(|b| b["error"].as_str());
        let has_message = parsed
            .as_ref()
            .and_then(|b| b["message"].as_str())
            .is_some_and(|m| !m.is_empty());
        if status != case.status || code != Some(case.code) || !has_message {
            failures.push(format!(
                "{}: want {} {:?}, got {status} {body}",
                case.name, case.status, case.code
            ));
        }
        assert_healthy(&app, case.name).await;
    }
    assert!(
        failures.is_empty(),
        "{} bad requests got the wrong answer:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Nothing of the bad requests is pending.
    for key in [
        "bad",
        "bad-batch",
        "bad-batch2",
        "bad-sum",
        "bad-many",
        "bad-padded",
    ] {
        assert_eq!(app.counter(key).await, None, "key {key:?} must not exist");
    }
    // A 256-byte key is the largest accepted.
    let longest = "g".repeat(256);
    assert_eq!(app.increment(&longest, 2).await, 202);
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), 200, "still ready after every bad request");
    app.shutdown().await.expect("clean shutdown");

    let stored = stored_counters(dir.path(), &backend).await;
    let want: BTreeMap<String, i64> = [("good".to_owned(), 1), (longest, 2)].into();
    assert_eq!(stored, want, "only the good increments reached the store");
}

on_both_stores!(
    bad_requests_get_the_right_4xx_and_json_and_store_nothing_sqlite,
    bad_requests_get_the_right_4xx_and_json_and_store_nothing_postgres,
    bad_requests_get_the_right_4xx_and_json_and_store_nothing
);

async fn an_add_that_would_overflow_the_pending_sum_is_a_422(backend: Backend) {
    let dir = data_dir();
    let mut config = test_config(dir.path(), &backend);
    // Keep the sums pending, so the refusal comes from the aggregator, not the store.
    config.flush.interval = std::time::Duration::from_secs(3600);
    let app = spawn_app(config, None).await;

    for (key, first, second) in [("high", i64::MAX, 1), ("low", i64::MIN, -1)] {
        assert_eq!(app.increment(key, first).await, 202);
        let response = app
            .client
            .post(format!("{}/increment", app.address))
            .json(&json!({"key": key, "value": second}))
            .send()
            .await
            .expect("POST");
        assert_eq!(response.status(), 422, "{key}: {first} + {second}");
        let body: serde_json::Value = response.json().await.expect("json error");
        assert_eq!(body["error"], "invalid_value");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("overflow"))
        );
        // Refused, not wrapped: the sum is still the first value, and moving away from the
        // edge still works.
        assert_eq!(app.counter(key).await, Some(i128::from(first)));
    }
    // A batch that would overflow one key applies to none.
    let response = app
        .client
        .post(format!("{}/increments", app.address))
        .json(&json!([{"key": "other", "value": 5}, {"key": "high", "value": 1}]))
        .send()
        .await
        .expect("POST batch");
    assert_eq!(response.status(), 422);
    assert_eq!(app.counter("other").await, None);
    assert_eq!(app.increment("high", -1).await, 202);
    assert_eq!(app.counter("high").await, Some(i128::from(i64::MAX) - 1));
    app.shutdown().await.expect("clean shutdown");

    let stored = stored_counters(dir.path(), &backend).await;
    let want: BTreeMap<String, i64> = [
        ("high".to_owned(), i64::MAX - 1),
        ("low".to_owned(), i64::MIN),
    ]
    .into();
    assert_eq!(stored, want);
}

on_both_stores!(
    an_add_that_would_overflow_the_pending_sum_is_a_422_sqlite,
    an_add_that_would_overflow_the_pending_sum_is_a_422_postgres,
    an_add_that_would_overflow_the_pending_sum_is_a_422
);
