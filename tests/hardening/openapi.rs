//! `GET /openapi.json`: a valid OpenAPI 3 document describing every route the server has,
//! fitted to the configuration.

use serde_json::Value;
use tally::config::Secret;

use crate::app::TestApp;
use crate::support::{self, client};

const PATHS: &[(&str, &str)] = &[
    ("/increment", "post"),
    ("/increments", "post"),
    ("/counters/{key}", "get"),
    ("/healthz", "get"),
    ("/readyz", "get"),
    ("/metrics", "get"),
    ("/openapi.json", "get"),
];

async fn document(server: &TestApp, token: Option<&str>) -> Value {
    let mut request = client().get(server.url("/openapi.json"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("sent");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    response.json().await.expect("valid JSON")
}

#[tokio::test]
async fn the_document_describes_every_route_and_each_described_route_exists() {
    let server = support::start(support::config()).await;
    let doc = document(&server, None).await;
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().expect("paths");
    assert_eq!(
        paths.len(),
        PATHS.len(),
        "{:?}",
        paths.keys().collect::<Vec<_>>()
    );
    for (path, method) in PATHS {
        let operation = &doc["paths"][path][method];
        assert!(operation.is_object(), "{method} {path} is described");
        assert!(
            operation["responses"]
                .as_object()
                .is_some_and(|r| !r.is_empty())
        );
        // Every described operation answers something other than "no such route".
        let url = server.url(&path.replace("{key}", "some-key"));
        let response = match *method {
            "post" => client()
                .post(url)
                .json(&serde_json::json!({"key": "k", "value": 1})),
            _ => client().get(url),
        }
        .send()
        .await
        .expect("sent");
        assert_ne!(response.status(), 405, "{method} {path}");
        let status = response.status();
        let text = response.text().await.expect("body");
        assert!(
            !text.contains("no such route"),
            "{method} {path}: {status} {text}"
        );
    }
    // Schemas come from the structs the handlers use; the key limit from the config.
    let schemas = &doc["components"]["schemas"];
    for name in ["Increment", "Accepted", "Counter", "ErrorBody", "Status"] {
        assert!(schemas[name].is_object(), "schema {name}");
    }
    assert_eq!(schemas["Increment"]["properties"]["key"]["maxLength"], 256);
    let codes = schemas["ErrorBody"]["properties"]["error"]["enum"]
        .as_array()
        .expect("error codes");
    for code in ["invalid_value", "unauthorized", "rate_limited", "timeout"] {
        assert!(codes.iter().any(|c| c == code), "{code}");
    }
    // Off by default: no security scheme, no 401/429.
    assert!(doc["components"]["securitySchemes"].is_null());
    assert!(doc["paths"]["/increment"]["post"]["responses"]["401"].is_null());
    assert!(doc["paths"]["/increment"]["post"]["responses"]["429"].is_null());
    server.stop().await;
}

#[tokio::test]
async fn the_document_follows_the_configuration() {
    let (mut config, dir) = support::config();
    config.auth.token = Some(Secret::new("test-static-token-0123456789"));
    config.rate_limit.per_second = Some(100.0);
    config.http.metrics_listen = Some("127.0.0.1:0".parse().expect("address"));
    config.limits.max_key_bytes = 64_usize.try_into().expect("non-zero");
    let server = support::start((config, dir)).await;
    let doc = document(&server, Some("test-static-token-0123456789")).await;
    assert!(
        doc["paths"]["/metrics"].is_null(),
        "/metrics is served elsewhere"
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    assert_eq!(
        doc["components"]["schemas"]["Increment"]["properties"]["key"]["maxLength"],
        64
    );
    let increment = &doc["paths"]["/increment"]["post"]["responses"];
    assert!(increment["401"]["headers"]["WWW-Authenticate"].is_object());
    assert!(increment["429"]["headers"]["Retry-After"].is_object());
    for probe in ["/healthz", "/readyz"] {
        let operation = &doc["paths"][probe]["get"];
        assert!(
            operation["responses"]["401"].is_null(),
            "{probe} needs no token"
        );
        assert_eq!(operation["security"], serde_json::json!([{}]), "{probe}");
    }
    server.stop().await;
}
