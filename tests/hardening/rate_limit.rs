//! Per-client rate limits: 429 with Retry-After past the burst, one bucket per client
//! (peer address, JWT subject, or a trusted X-Forwarded-For), probes never limited.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tally::config::Secret;

use crate::app::TestApp;
use crate::support::{self, client, client_from, expect_error, increment};

const SECRET: &str = "test-jwt-secret-0123456789abcdef0123456789";

/// Rate 0.2/s: after the burst, a token every 5 s, far longer than a test's requests take
/// even on a loaded machine, so the counts below are exact.
async fn start_limited(burst: u32, configure: impl FnOnce(&mut tally::config::Config)) -> TestApp {
    let (mut config, dir) = support::config();
    config.rate_limit.per_second = Some(0.2);
    config.rate_limit.burst = Some(burst.try_into().expect("non-zero"));
    configure(&mut config);
    support::start((config, dir)).await
}

fn jwt(sub: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 3600;
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": sub, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

#[tokio::test]
async fn a_client_past_its_burst_gets_429_with_retry_after_and_others_are_unaffected() {
    let server = start_limited(3, |_| {}).await;
    let a = client_from("127.0.0.1");
    for n in 0..3 {
        assert_eq!(
            increment(&a, &server, None).await.status(),
            202,
            "request {n}"
        );
    }
    let limited = increment(&a, &server, None).await;
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("whole seconds");
    assert!((1..=5).contains(&retry_after), "Retry-After {retry_after}");
    expect_error(limited, 429, "rate_limited").await;
    // Reads count too, and the probes never do.
    expect_error(
        a.get(server.url("/counters/k")).send().await.expect("sent"),
        429,
        "rate_limited",
    )
    .await;
    for _ in 0..5 {
        assert_eq!(
            a.get(server.url("/healthz"))
                .send()
                .await
                .expect("sent")
                .status(),
            200
        );
        assert_eq!(
            a.get(server.url("/readyz"))
                .send()
                .await
                .expect("sent")
                .status(),
            200
        );
    }

    // Another peer address is another client with a full bucket.
    let b = client_from("127.0.0.2");
    for n in 0..3 {
        assert_eq!(
            increment(&b, &server, None).await.status(),
            202,
            "client b request {n}"
        );
    }

    let metrics = client_from("127.0.0.3")
        .get(server.url("/metrics"))
        .send()
        .await
        .expect("sent")
        .text()
        .await
        .expect("text");
    let limited_total = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tally_rate_limited_total "))
        .expect("tally_rate_limited_total is exported");
    assert!(
        limited_total.trim().parse::<f64>().expect("number") >= 2.0,
        "{limited_total}"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_bucket_refills_at_the_configured_rate() {
    let (mut config, dir) = support::config();
    config.rate_limit.per_second = Some(2.0);
    config.rate_limit.burst = Some(1_u32.try_into().expect("non-zero"));
    let server = support::start((config, dir)).await;
    let client = client();
    // A token every 500 ms: two requests in a row on loopback are far closer than that.
    assert_eq!(increment(&client, &server, None).await.status(), 202);
    expect_error(increment(&client, &server, None).await, 429, "rate_limited").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(increment(&client, &server, None).await.status(), 202);
    server.stop().await;
}

#[tokio::test]
async fn jwt_subjects_are_limited_separately_wherever_they_connect_from() {
    let server = start_limited(2, |c| c.auth.jwt_secret = Some(Secret::new(SECRET))).await;
    let (alice, bob) = (jwt("alice"), jwt("bob"));
    let here = client_from("127.0.0.1");
    let there = client_from("127.0.0.2");
    // alice spends her burst from two addresses: one bucket.
    assert_eq!(increment(&here, &server, Some(&alice)).await.status(), 202);
    assert_eq!(increment(&there, &server, Some(&alice)).await.status(), 202);
    expect_error(
        increment(&here, &server, Some(&alice)).await,
        429,
        "rate_limited",
    )
    .await;
    // bob, from the same address as alice, has his own.
    assert_eq!(increment(&here, &server, Some(&bob)).await.status(), 202);
    assert_eq!(increment(&here, &server, Some(&bob)).await.status(), 202);
    expect_error(
        increment(&there, &server, Some(&bob)).await,
        429,
        "rate_limited",
    )
    .await;
    server.stop().await;
}

async fn increment_as(client: &reqwest::Client, server: &TestApp, forwarded_for: &str) -> u16 {
    client
        .post(server.url("/increment"))
        .header("x-forwarded-for", forwarded_for)
        .json(&json!({"key": "k", "value": 1}))
        .send()
        .await
        .expect("sent")
        .status()
        .as_u16()
}

#[tokio::test]
async fn x_forwarded_for_names_the_client_only_behind_a_trusted_proxy() {
    let trusting = start_limited(1, |c| c.rate_limit.trust_proxy = true).await;
    let proxy = client();
    assert_eq!(increment_as(&proxy, &trusting, "198.51.100.1").await, 202);
    assert_eq!(increment_as(&proxy, &trusting, "198.51.100.1").await, 429);
    // The proxy appended the real address last; what the client put first is ignored.
    assert_eq!(
        increment_as(&proxy, &trusting, "198.51.100.1, 198.51.100.2").await,
        202
    );
    assert_eq!(
        increment_as(&proxy, &trusting, "203.0.113.9, 198.51.100.2").await,
        429
    );
    trusting.stop().await;

    let direct = start_limited(1, |_| {}).await;
    assert_eq!(increment_as(&proxy, &direct, "198.51.100.1").await, 202);
    // Without --trust-proxy a client cannot escape its limit by inventing addresses.
    assert_eq!(increment_as(&proxy, &direct, "198.51.100.2").await, 429);
    direct.stop().await;
}
