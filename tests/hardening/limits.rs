//! Connection and request limits: header deadline (slow loris), request timeout, connection
//! cap, body limit; `/metrics` on its own listener; defaults and `--help`.

use std::time::{Duration, Instant};

use serde_json::Value;
use tally::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::metrics;
use crate::support::{self, client, expect_error, raw_connect, read_to_close};

#[tokio::test]
async fn a_slow_loris_connection_is_closed_after_the_header_timeout() {
    let (mut config, dir) = support::config();
    config.http.header_read_timeout = Duration::from_millis(300);
    let server = support::start((config, dir)).await;

    // Half a request head, then silence; and a connection that never says anything.
    let started = Instant::now();
    let mut partial = raw_connect(server.socket, b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await;
    let mut silent = raw_connect(server.socket, b"").await;
    for (what, stream) in [("partial head", &mut partial), ("silent", &mut silent)] {
        let read = read_to_close(stream, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("{what}: connection still open after 5 s"));
        assert!(
            read.is_empty() || read.starts_with("HTTP/1.1 408"),
            "{what}: unexpected answer {read:?}"
        );
    }
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed too early"
    );

    // A client that sends its request in time is served.
    let ok = client()
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("sent");
    assert_eq!(ok.status(), 200);
    server.stop().await;
}

#[tokio::test]
async fn a_request_that_outlives_the_request_timeout_gets_a_json_503() {
    let (mut config, dir) = support::config();
    config.http.request_timeout = Duration::from_millis(300);
    let server = support::start((config, dir)).await;

    // Headers promise 100 bytes of body; only one arrives.
    let mut stream = raw_connect(
        server.socket,
        b"POST /increment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{",
    )
    .await;
    let started = Instant::now();
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = stream.read(&mut buf).await.expect("read");
            response.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&response);
            if n == 0 || text.contains("\"message\"") && text.trim_end().ends_with('}') {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer within 5 s");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "answered too early"
    );
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{text}"
    );
    assert!(!text.to_ascii_lowercase().contains("retry-after"), "{text}");
    let body: Value = serde_json::from_str(&text[text.find("\r\n\r\n").expect("head end") + 4..])
        .expect("JSON body");
    assert_eq!(body["error"], "timeout", "{body}");
    server.stop().await;
}

/// At the cap, a connection that is busy (here: in the middle of a request head) keeps its
/// slot: a new client waits until one closes.
#[tokio::test]
async fn connections_past_the_cap_wait_while_every_slot_is_busy() {
    let (mut config, dir) = support::config();
    config.http.max_connections = 2_usize.try_into().expect("non-zero");
    let server = support::start((config, dir)).await;

    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(raw_connect(server.socket, b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await);
    }
    let third = reqwest::Client::builder()
        .timeout(Duration::from_millis(700))
        .build()
        .expect("client");
    let refused = third.get(server.url("/healthz")).send().await;
    assert!(
        refused.as_ref().is_err_and(reqwest::Error::is_timeout),
        "a third connection must wait: {refused:?}"
    );

    // Closing one frees its slot.
    let mut freed = held.pop().expect("two held");
    freed.shutdown().await.expect("shutdown");
    drop(freed);
    let served = client()
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("served");
    assert_eq!(served.status(), 200);
    drop(held);
    server.stop().await;
}

/// At the cap, idle keep-alive connections yield: a new client gets the slot of the one idle
/// longest, which is closed; the others stay open.
#[tokio::test]
async fn at_the_cap_the_longest_idle_connection_yields_to_a_new_client() {
    let (mut config, dir) = support::config();
    config.http.max_connections = 3_usize.try_into().expect("non-zero");
    // Scrapes go to a listener of their own, outside the cap.
    config.http.metrics_listen = Some("127.0.0.1:0".parse().expect("address"));
    let server = support::start((config, dir)).await;
    let metrics_address = server.metrics.expect("metrics listener");

    // Three keep-alive connections, each served once and then left idle, oldest first.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream =
            raw_connect(server.socket, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("served within 5 s")
            .expect("read");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(stream);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Process-wide: other tests may add to it, never take from it.
    let yielded = || async {
        let text = metrics::scrape(&client(), &format!("http://{metrics_address}")).await;
        metrics::metric(&text, "tally_http_connections_yielded_total")
    };
    let before = yielded().await;

    let started = Instant::now();
    let served = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .expect("client")
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("a new client is served within a second while the cap is full of idle connections");
    assert_eq!(served.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(
        yielded().await > before,
        "the yielded connection is counted in tally_http_connections_yielded_total"
    );

    let mut oldest = held.remove(0);
    let closed = read_to_close(&mut oldest, Duration::from_secs(2))
        .await
        .expect("the longest-idle connection is closed");
    assert!(closed.is_empty(), "closed without an answer: {closed:?}");
    // The newest idle one was left alone.
    let newest = held.last_mut().expect("held");
    newest
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), newest.read(&mut buf))
        .await
        .expect("answered")
        .expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    drop(held);
    server.stop().await;
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let (mut config, dir) = support::config();
    config.limits.max_body_bytes = 1024;
    let server = support::start((config, dir)).await;
    let key = "k".repeat(2000);
    let response = client()
        .post(server.url("/increment"))
        .json(&serde_json::json!({"key": key, "value": 1}))
        .send()
        .await
        .expect("sent");
    expect_error(response, 413, "too_large").await;

    // Chunked, with no length to refuse it by up front: cut off while read, 413 too; and a
    // chunked body within the limit is accepted.
    for (chunks, status) in [(vec!["k"; 2000].concat(), 413), ("k".to_owned(), 202)] {
        let body = format!(r#"{{"key":"{chunks}","value":1}}"#);
        let request = format!(
            "POST /increment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        );
        let mut stream = raw_connect(server.socket, request.as_bytes()).await;
        let answer = read_to_close(&mut stream, Duration::from_secs(5))
            .await
            .expect("answered and closed within 5 s");
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "chunked body of {} bytes: {answer}",
            body.len()
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn metrics_listen_serves_metrics_apart_from_the_api() {
    let (mut config, dir) = support::config();
    config.http.metrics_listen = Some("127.0.0.1:0".parse().expect("address"));
    let server = support::start((config, dir)).await;
    let client = client();
    assert_eq!(
        client
            .post(server.url("/increment"))
            .json(&serde_json::json!({"key": "m", "value": 1}))
            .send()
            .await
            .expect("sent")
            .status(),
        202
    );
    expect_error(
        client
            .get(server.url("/metrics"))
            .send()
            .await
            .expect("sent"),
        404,
        "not_found",
    )
    .await;
    let metrics_address = server.metrics.expect("metrics listener");
    assert_ne!(metrics_address, server.socket);
    let response = client
        .get(format!("http://{metrics_address}/metrics"))
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/plain")
    );
    let text = response.text().await.expect("text");
    assert!(text.contains("tally_increments_total"), "{text}");
    // The API is not served there.
    let api = client
        .get(format!("http://{metrics_address}/healthz"))
        .send()
        .await
        .expect("sent");
    assert_eq!(api.status(), 404);
    server.stop().await;
}

#[test]
fn limits_have_safe_defaults_and_rate_limiting_is_off() {
    let config = Config::defaults();
    assert_eq!(config.http.header_read_timeout, Duration::from_secs(10));
    assert_eq!(config.http.request_timeout, Duration::from_secs(30));
    assert_eq!(config.http.max_connections.get(), 4096);
    assert_eq!(config.limits.max_body_bytes, 4 * 1024 * 1024);
    assert_eq!(config.rate_limit.per_second, None);
    assert!(!config.rate_limit.trust_proxy);
    assert!(!config.auth_enabled());
    assert_eq!(config.http.metrics_listen, None);
}

#[test]
fn help_documents_every_hardening_flag_without_showing_secrets() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("--help")
        .env("TALLY_AUTH_TOKEN", "secret-from-env-0123456789")
        .env(
            "TALLY_JWT_SECRET",
            "jwt-secret-from-env-0123456789abcdef0123",
        )
        .output()
        .expect("run tally --help");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--auth-token",
        "--jwt-secret",
        "--jwt-public-key",
        "--jwt-audience",
        "--jwt-issuer",
        "--metrics-listen",
        "--rate-limit-per-second",
        "--rate-limit-burst",
        "--rate-limit-max-clients",
        "--trust-proxy",
        "--header-read-timeout",
        "--request-timeout",
        "--max-connections",
        "--max-header-bytes",
        "--max-body-bytes",
        "--idle-timeout",
        "--shutdown-delay",
        "--store-timeout",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    assert!(!help.contains("secret-from-env"), "--help shows a secret");
}

/// A request head well past `--max-header-bytes` (32 KiB by default) is refused with 431
/// before more of it is held; one under it is served. (hyper checks the limit before each
/// read, so a head may pass it by up to one read: it is a bound, not an exact cut.)
#[tokio::test]
async fn a_request_head_past_the_header_limit_gets_431() {
    let server = support::start(support::config()).await;
    let filler = "a".repeat(100 * 1024);
    let head = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Filler: {filler}\r\n\r\n");
    let mut stream = raw_connect(server.socket, head.as_bytes()).await;
    let read = read_to_close(&mut stream, Duration::from_secs(5))
        .await
        .expect("the connection is answered and closed");
    assert!(read.starts_with("HTTP/1.1 431"), "got {read:?}");

    let ok = client()
        .get(server.url("/healthz"))
        .header("x-filler", "a".repeat(16 * 1024))
        .send()
        .await
        .expect("sent");
    assert_eq!(ok.status(), 200, "16 KiB of headers is within the limit");
    server.stop().await;
}

/// `Expect: 100-continue` with a `Content-Length` over `--max-body-bytes`: 413 at once, never
/// `100 Continue` (which would invite the client to send the whole body first).
#[tokio::test]
async fn an_oversized_expect_continue_request_gets_413_without_100_continue() {
    let (mut config, dir) = support::config();
    config.limits.max_body_bytes = 100;
    let server = support::start((config, dir)).await;
    let mut stream = raw_connect(
        server.socket,
        b"POST /increment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 5000\r\nExpect: 100-continue\r\n\r\n",
    )
    .await;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf))
        .await
        .expect("an answer at once")
        .expect("read");
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "got {text:?}");
    assert!(text.contains(r#""error":"too_large""#), "{text}");
    server.stop().await;
}

/// `--max-body-memory` bounds what slow uploads hold together, whatever the connection cap:
/// with room for two bodies, two clients trickling large bodies take it, a third large body
/// is refused at once with `503 overloaded` and `Retry-After` (before it is read), small
/// increments go on, and the room comes back when an upload ends.
#[tokio::test]
async fn slow_large_bodies_cannot_take_more_than_the_body_memory() {
    const BODY: usize = 100 * 1024;
    let (mut config, dir) = support::config();
    config.limits.max_body_bytes = BODY;
    config.limits.max_body_memory = 2 * BODY + 1024;
    config.http.request_timeout = Duration::from_secs(30);
    let server = support::start((config, dir)).await;
    let head = format!(
        "POST /increments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {BODY}\r\n\r\n["
    );
    // Two uploads that send their head and one byte of body, then stall.
    let mut holders = Vec::new();
    for _ in 0..2 {
        holders.push(raw_connect(server.socket, head.as_bytes()).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut third = raw_connect(server.socket, head.as_bytes()).await;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(3), third.read(&mut buf))
        .await
        .expect("refused at once, not after the body")
        .expect("read");
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 503"), "got {text:?}");
    assert!(text.to_ascii_lowercase().contains("retry-after:"), "{text}");
    assert!(text.contains(r#""error":"overloaded""#), "{text}");
    assert!(text.contains("--max-body-memory"), "{text}");

    // Small bodies are not counted: increments go on.
    let ok = client()
        .post(server.url("/increment"))
        .json(&serde_json::json!({"key": "k", "value": 1}))
        .send()
        .await
        .expect("sent");
    assert_eq!(ok.status(), 202);

    // One upload gives up: its room is back and a large body is taken again.
    drop(holders.pop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let items: Vec<String> = (0..1000)
        .map(|i| format!(r#"{{"key":"big{i}","value":1}}"#))
        .collect();
    let mut body = format!("[{}]", items.join(","));
    body.push_str(&" ".repeat(BODY - body.len()));
    let ok = client()
        .post(server.url("/increments"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("sent");
    assert_eq!(ok.status(), 202, "{:?}", ok.text().await);
    server.stop().await;
}
