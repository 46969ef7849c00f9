//! Shutdown behind a load balancer: with `--shutdown-delay`, SIGTERM first turns `/readyz` to
//! 503 `shutting_down` while every request is still served, so the balancer takes the instance
//! out by its health check rather than by failed connections, and every response carries
//! `Connection: close` so that a proxy that does not poll `/readyz` (nginx) drops its
//! kept-alive connections; then tally drains and exits 0 with every acknowledged increment
//! stored.

use std::time::{Duration, Instant};

use crate::common::data_dir;
use crate::support::{self, Direct, Tally, TallyConfig};

const SHUTDOWN_DELAY: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_shutdown_delay_fails_readyz_first_and_keeps_serving() {
    let dir = data_dir();
    let mut config = TallyConfig::new(dir.path(), None, "journal", "100ms");
    config.extra = vec!["--shutdown-delay".to_owned(), "2s".to_owned()];
    let mut tally = Tally::start(&config).await;
    let client = reqwest::Client::new();
    let increment = || support::increment(&client, &tally.address, "k");
    let readyz = || support::readyz(&client, &tally.address);
    assert_eq!(readyz().await.0, 200);
    assert_eq!(increment().await, 202);

    tally.sigterm();
    let signalled = Instant::now();
    let (status, body) = loop {
        let (status, body) = readyz().await;
        if status != 200 || signalled.elapsed() > SHUTDOWN_DELAY {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status, 503, "/readyz fails during the drain delay: {body}");
    assert!(body.contains(r#""error":"shutting_down""#), "{body}");
    // Responses now ask the client (a proxy) to drop the connection: its kept-alive ones to
    // this instance are gone before the listener closes.
    let response = client
        .get(format!("{}/healthz", tally.address))
        .send()
        .await
        .expect("served during the shutdown delay");
    assert_eq!(
        response
            .headers()
            .get("connection")
            .and_then(|v| v.to_str().ok()),
        Some("close")
    );
    // Still served, on new connections too, until the delay is over.
    let mut served = 0;
    while signalled.elapsed() < SHUTDOWN_DELAY - Duration::from_millis(500) {
        assert_eq!(increment().await, 202, "served during the drain delay");
        served += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served > 0);
    let status = tally.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
    assert!(
        signalled.elapsed() >= SHUTDOWN_DELAY,
        "the listener stayed open for the drain delay"
    );
    let stored = Direct::open(dir.path(), None).await.value("k").await;
    assert_eq!(
        stored,
        Some(1 + served),
        "every increment acknowledged is stored"
    );
}

/// Voluntary context switches of each thread of `pid` named `tally-http-*`, by name.
fn serving_thread_switches(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let mut switches = std::collections::BTreeMap::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("list the threads");
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .map(str::to_owned)
        };
        if let Some(thread) = field("Name:").filter(|n| n.starts_with("tally-http-")) {
            let count = field("voluntary_ctxt_switches:")
                .and_then(|v| v.parse().ok())
                .expect("a switch count");
            switches.insert(thread, count);
        }
    }
    switches
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_spread_over_every_serving_thread_and_sigterm_drains_them_all() {
    let dir = data_dir();
    let mut config = TallyConfig::new(dir.path(), None, "journal", "100ms");
    config.extra = vec!["--http-threads".to_owned(), "3".to_owned()];
    let mut tally = Tally::start(&config).await;
    let before = serving_thread_switches(tally.pid());
    let names: Vec<&str> = before.keys().map(String::as_str).collect();
    assert_eq!(names, ["tally-http-0", "tally-http-1", "tally-http-2"]);

    // Six kept-alive connections (a client each), taking turns: two per thread.
    let clients: Vec<reqwest::Client> = (0..6).map(|_| reqwest::Client::new()).collect();
    let mut acknowledged = 0;
    for _ in 0..50 {
        for client in &clients {
            assert_eq!(
                support::increment(client, &tally.address, "spread").await,
                202
            );
            acknowledged += 1;
        }
    }
    // A thread serving none of them would have slept through: its count would not move.
    let after = serving_thread_switches(tally.pid());
    for (thread, count) in &after {
        assert!(
            count - before[thread] >= 50,
            "{thread} served a share of the requests: switches {before:?} -> {after:?}"
        );
    }

    // The gauge agrees, read in one scrape (on a seventh connection, counted too).
    let exposition = crate::metrics::scrape(&reqwest::Client::new(), &tally.address).await;
    let open: Vec<f64> = (0..3)
        .map(|n| {
            crate::metrics::metric(
                &exposition,
                &format!("tally_http_connections_open{{thread=\"{n}\"}}"),
            )
        })
        .collect();
    assert_eq!(open.iter().sum::<f64>(), 7.0, "{open:?}");
    assert!(open.iter().all(|&n| (2.0..=3.0).contains(&n)), "{open:?}");

    // SIGTERM with all six connections still open and a request in flight on a seventh,
    // its body half sent: that request is still answered, the rest are closed, tally
    // exits 0 with every increment answered 202 stored.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut in_flight = tokio::net::TcpStream::connect(tally.address.trim_start_matches("http://"))
        .await
        .expect("connect");
    let body = r#"{"key":"spread","value":1}"#;
    let head = format!(
        "POST /increment HTTP/1.1\r\nHost: tally\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    in_flight
        .write_all(format!("{head}{}", &body[..10]).as_bytes())
        .await
        .expect("send the head and part of the body");
    tokio::time::sleep(Duration::from_millis(200)).await;
    tally.sigterm();
    tokio::time::sleep(Duration::from_millis(300)).await;
    in_flight
        .write_all(&body.as_bytes()[10..])
        .await
        .expect("send the rest of the body");
    let mut response = Vec::new();
    in_flight
        .read_to_end(&mut response)
        .await
        .expect("read the answer");
    let response = String::from_utf8_lossy(&response);
    assert!(
        response.starts_with("HTTP/1.1 202"),
        "the request in flight is answered: {response}"
    );
    acknowledged += 1;
    let status = tally.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
    drop(clients);
    let stored = Direct::open(dir.path(), None).await.value("spread").await;
    assert_eq!(stored, Some(acknowledged));
}
