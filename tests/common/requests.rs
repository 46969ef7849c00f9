//! The requests the API tests send through [`TestApp`]: increments, reads and raw bodies.

use crate::app::TestApp;

impl TestApp {
    /// `POST /increment` with a JSON body; returns the status code.
    pub async fn increment(&self, key: &str, value: i64) -> u16 {
        self.client
            .post(format!("{}/increment", self.address))
            .json(&serde_json::json!({ "key": key, "value": value }))
            .send()
            .await
            .expect("request sent")
            .status()
            .as_u16()
    }

    /// `GET path` (e.g. `/readyz`) on this app.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// `POST` of a raw `body` with `content_type` to `url`.
    pub async fn post_raw(
        &self,
        url: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.client
            .post(url)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {url}: {e}"))
    }

    /// `GET /counters/{key}` (the key percent-encoded): the value, or `None` on 404.
    pub async fn counter(&self, key: &str) -> Option<i128> {
        let response = self
            .get(&format!("/counters/{}", percent_encode(key)))
            .await;
        if response.status() == 404 {
            return None;
        }
        assert_eq!(response.status(), 200, "GET /counters/{key}");
        let body: serde_json::Value = response.json().await.expect("json body");
        body["value"].as_i64().map(i128::from)
    }
}

/// Percent-encodes every byte outside RFC 3986's unreserved set, for a URL path segment
/// (`a/b` → `a%2Fb`).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
