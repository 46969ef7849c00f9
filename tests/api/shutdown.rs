//! SIGTERM drains: the real `tally` binary, a long flush interval, pending deltas, a
//! signal; on exit 0 every delta is in the store.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::both_stores::on_both_stores;
use crate::common::Backend;
use crate::journal::journal_segments;
use crate::pg::shout;
use crate::store::stored_counters;

/// How long the binary may take to answer `/healthz` after it is started.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long the binary may take to exit after SIGTERM.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `tally` process, killed (SIGKILL) if the test ends while it still runs.
struct Tally {
    child: Child,
    address: String,
    log: PathBuf,
}

impl Drop for Tally {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A port that was free a moment ago (the OS picks it; another process may take it before
/// tally binds it, in which case `Tally::start` tries another).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("local addr").port()
}

impl Tally {
    /// Starts the binary on `data_dir` and `backend` with `extra` flags; waits for
    /// `/healthz`.
    async fn start(data_dir: &Path, backend: &Backend, extra: &[&str]) -> Self {
        let client = reqwest::Client::new();
        for attempt in 1..=5 {
            let port = free_port();
            let log = data_dir.join(format!("tally-{attempt}.log"));
            // One open file for both streams: the two descriptors share one offset.
            let out = File::create(&log).expect("log file");
            let err = out.try_clone().expect("log file");
            let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
            command
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--data-dir")
                .arg(data_dir)
                .args(extra)
                .env_remove("DATABASE_URL")
                .env("RUST_LOG", "info,tally=debug")
                .stdin(Stdio::null())
                .stdout(Stdio::from(out))
                .stderr(Stdio::from(err));
            if let Backend::Postgres(url) = backend {
                command.arg("--database-url").arg(url);
            }
            let mut tally = Self {
                child: command.spawn().expect("start the tally binary"),
                address: format!("http://127.0.0.1:{port}"),
                log,
            };
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if let Ok(Some(status)) = tally.child.try_wait() {
                    let log = tally.log_text();
                    if log.contains("cannot listen") {
                        break; // port taken meanwhile: try another
                    }
                    panic!("tally exited with {status} before it was ready:\n{log}");
                }
                let health = client
                    .get(format!("{}/healthz", tally.address))
                    .timeout(Duration::from_secs(1))
                    .send()
                    .await;
                if health.is_ok_and(|r| r.status() == 200) {
                    return tally;
                }
                assert!(
                    Instant::now() < deadline,
                    "tally not healthy after {START_TIMEOUT:?}:\n{}",
                    tally.log_text()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("could not find a free port for tally in 5 attempts");
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM with `kill`, as a process manager would.
    fn terminate(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    /// Waits for the process to exit; panics with its log if it takes too long.
    async fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "tally still running {EXIT_TIMEOUT:?} after SIGTERM:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Increments sent one by one (JSON and form) and in a batch; returns the sums.
async fn send_increments(client: &reqwest::Client, address: &str) -> BTreeMap<String, i64> {
    let mut want = BTreeMap::new();
    for i in 0..60_i64 {
        let key = format!("drain-{}", i % 12);
        let value = if i % 3 == 0 { -i } else { i * 7 };
        let request = client.post(format!("{address}/increment"));
        let request = if i % 2 == 0 {
            request.json(&json!({"key": key, "value": value}))
        } else {
            request
                .header("content-type", "application/x-www-form-urlencoded")
                .body(format!("key={key}&value={value}"))
        };
        let response = request.send().await.expect("POST /increment");
        assert_eq!(response.status(), 202, "increment {i}");
        *want.entry(key).or_default() += value;
    }
    let batch: Vec<_> = (0..20_i64)
        .map(|i| json!({"key": format!("batch-{}", i % 5), "value": i}))
        .collect();
    let response = client
        .post(format!("{address}/increments"))
        .json(&batch)
        .send()
        .await
        .expect("POST /increments");
    assert_eq!(response.status(), 202);
    for i in 0..20_i64 {
        *want.entry(format!("batch-{}", i % 5)).or_default() += i;
    }
    want
}

async fn sigterm_flushes_every_pending_delta_before_exit_0(backend: Backend, ack: Option<&str>) {
    let dir = crate::common::data_dir();
    let mut flags = vec!["--flush-interval", "1h"];
    if let Some(ack) = ack {
        flags.extend(["--ack", ack]);
    }
    let mut tally = Tally::start(dir.path(), &backend, &flags).await;
    let client = reqwest::Client::new();
    let want = send_increments(&client, &tally.address).await;

    // Everything is pending: the store has none of it yet, the API has all of it.
    assert!(
        stored_counters(dir.path(), &backend).await.is_empty(),
        "nothing is flushed before the signal (flush interval 1h)"
    );
    for (key, value) in &want {
        let response = client
            .get(format!("{}/counters/{key}", tally.address))
            .send()
            .await
            .expect("GET");
        let body: serde_json::Value = response.json().await.expect("json");
        assert_eq!(body["value"], *value, "GET {key} before the signal");
    }

    tally.terminate();
    let status = tally.wait().await;
    assert!(
        status.success(),
        "exit status {status} after SIGTERM:\n{}",
        tally.log_text()
    );
    assert_eq!(
        stored_counters(dir.path(), &backend).await,
        want,
        "every pending delta is stored by the drain"
    );
    if ack.is_none() {
        // Default ack=journal: a clean exit leaves no journal segment to replay.
        assert_eq!(journal_segments(dir.path()), Vec::<String>::new());
    }
}

async fn sigterm_drains_with_ack_memory(backend: Backend) {
    sigterm_flushes_every_pending_delta_before_exit_0(backend, Some("memory")).await;
}

async fn sigterm_drains_with_the_default_ack_journal(backend: Backend) {
    sigterm_flushes_every_pending_delta_before_exit_0(backend, None).await;
}

on_both_stores!(
    sigterm_with_ack_memory_flushes_every_pending_delta_before_exit_0_sqlite,
    sigterm_with_ack_memory_flushes_every_pending_delta_before_exit_0_postgres,
    sigterm_drains_with_ack_memory
);

on_both_stores!(
    sigterm_with_ack_journal_flushes_every_pending_delta_before_exit_0_sqlite,
    sigterm_with_ack_journal_flushes_every_pending_delta_before_exit_0_postgres,
    sigterm_drains_with_the_default_ack_journal
);

/// Per key: the sum of acknowledged deltas and the sum of attempted ones.
type Sums = Arc<Mutex<BTreeMap<String, (i64, i64)>>>;

async fn sigterm_under_load_keeps_every_acknowledged_increment(backend: Backend) {
    let dir = crate::common::data_dir();
    let mut tally = Tally::start(dir.path(), &backend, &["--flush-interval", "200ms"]).await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let sums: Sums = Arc::default();
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..16_i64 {
        let (client, sums) = (client.clone(), Arc::clone(&sums));
        let url = format!("{}/increment", tally.address);
        workers.spawn(async move {
            // Positive deltas only, so that acknowledged <= stored <= attempted per key.
            for i in 0_i64.. {
                let key = format!("load-{}", (w + i) % 8);
                let value = 1 + (w * 31 + i) % 10;
                sums.lock().expect("sums").entry(key.clone()).or_default().1 += value;
                let response = client
                    .post(&url)
                    .json(&json!({"key": key, "value": value}))
                    .send()
                    .await;
                match response.map(|r| r.status().as_u16()) {
                    Ok(202) => sums.lock().expect("sums").entry(key).or_default().0 += value,
                    Ok(503) | Err(_) => return i,
                    Ok(status) => panic!("unexpected status {status} during shutdown"),
                }
            }
            unreachable!("the loop ends when tally stops answering")
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    tally.terminate();
    let status = tally.wait().await;
    let mut sent = 0;
    while let Some(worker) = workers.join_next().await {
        sent += worker.expect("worker panicked");
    }
    assert!(
        status.success(),
        "exit status {status} after SIGTERM under load:\n{}",
        tally.log_text()
    );
    let sums = sums.lock().expect("sums").clone();
    let acked: i64 = sums.values().map(|(a, _)| a).sum();
    assert!(acked > 0, "no increment was acknowledged before the signal");
    let stored = stored_counters(dir.path(), &backend).await;
    for (key, (acked, attempted)) in &sums {
        let value = stored.get(key).copied().unwrap_or(0);
        assert!(
            (*acked..=*attempted).contains(&value),
            "{key}: stored {value}, acknowledged {acked}, attempted {attempted}"
        );
    }
    if sent < 100 {
        shout(&format!(
            "sigterm_under_load: only {sent} requests were sent before the signal"
        ));
    }
}

on_both_stores!(
    sigterm_under_load_keeps_every_acknowledged_increment_sqlite,
    sigterm_under_load_keeps_every_acknowledged_increment_postgres,
    sigterm_under_load_keeps_every_acknowledged_increment
);
