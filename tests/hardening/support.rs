//! Starting an app for one test, and the raw-HTTP helpers misbehaving clients need.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tally::config::Config;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::app::{TestApp, spawn_app, test_config};
use crate::common::{Backend, data_dir};

/// A test configuration on a fresh data directory (kept alive by the returned guard).
pub fn config() -> (Config, TempDir) {
    let dir = data_dir();
    let config = test_config(dir.path(), &Backend::Sqlite);
    (config, dir)
}

/// Starts an app on `config`, owning its data directory.
pub async fn start((config, dir): (Config, TempDir)) -> TestApp {
    let mut app = spawn_app(config, None).await;
    app._dir = Some(dir);
    app
}

impl TestApp {
    /// Stops the app and checks that it drained cleanly within 20 s.
    pub async fn stop(self) {
        tokio::time::timeout(Duration::from_secs(20), self.shutdown())
            .await
            .expect("app stops within 20s")
            .expect("clean shutdown");
    }
}

/// A client that does not pool connections (each request stands alone).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// A client whose connections come from `local` (another loopback address: another peer).
pub fn client_from(local: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .local_address(local.parse::<std::net::IpAddr>().expect("ip"))
        .build()
        .expect("client")
}

/// `POST /increment` with a JSON body and an optional bearer token.
pub async fn increment(
    client: &reqwest::Client,
    server: &TestApp,
    token: Option<&str>,
) -> reqwest::Response {
    let mut request = client
        .post(server.url("/increment"))
        .json(&serde_json::json!({"key": "k", "value": 1}));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("request sent")
}

/// Asserts the JSON error contract and returns the body.
pub async fn expect_error(response: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(response.status().as_u16(), status, "status");
    let body: Value = response.json().await.expect("JSON error body");
    assert_eq!(body["error"], code, "error code in {body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "message in {body}"
    );
    body
}

/// Sends raw bytes on a fresh connection.
pub async fn raw_connect(address: SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    if !bytes.is_empty() {
        stream.write_all(bytes).await.expect("write");
    }
    stream
}

/// Reads until the server closes the connection (or `limit` passes); what was read.
pub async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read).await.ok()?;
    Some(String::from_utf8_lossy(&out).into_owned())
}
