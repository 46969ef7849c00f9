//! Support for the durability tests: the real `tally` binary as a child process, direct
//! reads of its store (never through tally), a concurrent load driver that records what was
//! acknowledged and what was attempted, and a small seeded RNG.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use crate::common::Backend;
use crate::metrics::{metric, scrape};
use crate::pg::PgDatabase;
use crate::store::{read_sqlite, stored_counters};

/// How long a started binary may take to answer `/healthz` (journal replay included).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a killed binary may take to be reaped.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a SIGTERMed binary may take to drain and exit (its own drain budget is 20 s).
const TERM_TIMEOUT: Duration = Duration::from_secs(40);
/// Per-request timeout of the load driver: a request with no answer by then is "attempted".
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on the requests one load worker sends, whatever the time.
const MAX_REQUESTS_PER_WORKER: usize = 200_000;
/// Log lines of the child printed when a test fails.
const LOG_TAIL_LINES: usize = 40;

pub use crate::rng::Rng;

impl Rng {
    /// A value in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

/// The seed for this run: `TALLY_TEST_SEED` if set (to replay a failure), else the clock.
/// Tests print it.
pub fn seed() -> u64 {
    std::env::var("TALLY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        })
}

/// A port that was free a moment ago (the binary binds it right after; a clash would show
/// as a failed start with the reason in the log tail).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// Where and how to run the binary.
#[derive(Debug, Clone)]
pub struct TallyConfig {
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    pub ack: &'static str,
    pub flush_interval: &'static str,
    /// `--shutdown-timeout`: how long the HTTP drain and the final flush may each take.
    pub shutdown_timeout: &'static str,
    /// More flags, appended as they are.
    pub extra: Vec<String>,
    /// A command that runs the binary (e.g. `prlimit --fsize=…`), if any; it must exec it,
    /// so that the pid is tally's.
    pub wrapper: Vec<String>,
}

impl TallyConfig {
    pub fn new(
        data_dir: &Path,
        db: Option<&PgDatabase>,
        ack: &'static str,
        flush_interval: &'static str,
    ) -> Self {
        Self {
            data_dir: data_dir.to_owned(),
            database_url: db.map(|db| db.url.clone()),
            ack,
            flush_interval,
            shutdown_timeout: "20s",
            extra: Vec::new(),
            wrapper: Vec::new(),
        }
    }

    /// `sqlite` or `postgres`, for messages.
    pub fn backend(&self) -> &'static str {
        if self.database_url.is_some() {
            "postgres"
        } else {
            "sqlite"
        }
    }
}

/// A running `tally` child process. Dropping it SIGKILLs the process if it still runs (so
/// a failing test leaves nothing behind) and, when the test is failing, prints the tail of
/// its log.
pub struct Tally {
    child: Child,
    pid: u32,
    pub address: String,
    log: PathBuf,
}

impl Tally {
    /// Starts the binary on a free port and waits until `/healthz` answers.
    pub async fn start(config: &TallyConfig) -> Self {
        let mut tally = Self::spawn(config);
        tally.wait_ready().await;
        tally
    }

    /// Starts the binary on a free port without waiting for it (its start-up may block).
    pub fn spawn(config: &TallyConfig) -> Self {
        static RUNS: AtomicUsize = AtomicUsize::new(0);
        let port = free_port();
        let logs = config.data_dir.join("logs");
        std::fs::create_dir_all(&logs).expect("create the log directory");
        let log = logs.join(format!(
            "tally-{}.log",
            RUNS.fetch_add(1, Ordering::Relaxed)
        ));
        let out = File::create(&log).expect("create the child's log file");
        let err = out.try_clone().expect("clone the log file handle");

        let binary = env!("CARGO_BIN_EXE_tally");
        let mut command = match config.wrapper.split_first() {
            None => Command::new(binary),
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(binary);
                command
            }
        };
        // The child's configuration is exactly what is written here, not what the test
        // environment happens to export.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("TALLY_") || name == "DATABASE_URL" {
                command.env_remove(&*name);
            }
        }
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        command
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(&config.data_dir)
            .arg("--ack")
            .arg(config.ack)
            .arg("--flush-interval")
            .arg(config.flush_interval)
            .arg("--shutdown-timeout")
            .arg(config.shutdown_timeout);
        if let Some(url) = &config.database_url {
            command.arg("--database-url").arg(url);
        }
        command.args(&config.extra);
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn the tally binary");
        let pid = child.id().expect("a just spawned child has a pid");
        Self {
            child,
            pid,
            address: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    /// Waits until `/healthz` answers 200; panics (with the log tail) if the process exits
    /// or [`READY_TIMEOUT`] passes.
    pub async fn wait_ready(&mut self) {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()
            .expect("http client");
        let url = format!("{}/healthz", self.address);
        let started = Instant::now();
        while started.elapsed() < READY_TIMEOUT {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "tally exited during start-up with {status}; log tail:\n{}",
                    self.log_tail()
                );
            }
            if let Ok(response) = client.get(&url).send().await
                && response.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "tally did not answer /healthz within {READY_TIMEOUT:?}; log tail:\n{}",
            self.log_tail()
        );
    }

    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {} failed", self.pid);
    }

    /// Sends SIGTERM and returns at once (see [`Tally::terminate`] to wait for the exit).
    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// SIGKILL, then waits until the process is gone.
    pub async fn kill9(&mut self) {
        self.signal("KILL");
        tokio::time::timeout(KILL_TIMEOUT, self.child.wait())
            .await
            .expect("a SIGKILLed tally is reaped in time")
            .expect("wait for tally");
    }

    /// SIGTERM, then waits for the drain and the exit; returns the exit status.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        match tokio::time::timeout(TERM_TIMEOUT, self.child.wait()).await {
            Ok(status) => status.expect("wait for tally"),
            Err(_) => panic!(
                "tally did not exit within {TERM_TIMEOUT:?} of SIGTERM; log tail:\n{}",
                self.log_tail()
            ),
        }
    }

    /// Waits for the process to exit on its own; panics (with the log tail) after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.expect("wait for tally"),
            Err(_) => panic!(
                "tally did not exit within {timeout:?}; log tail:\n{}",
                self.log_tail()
            ),
        }
    }

    /// This run's whole log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of this run's log.
    pub fn log_tail(&self) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    /// How many batches it counted failed for `reason` (`tally_flush_batches_total`).
    pub async fn failed_for(&self, reason: &str) -> f64 {
        self.metric(&crate::metrics::failed_for(reason)).await
    }

    /// A metric's current value (0 when the series is not exported yet).
    pub async fn metric(&self, series: &str) -> f64 {
        metric(
            &scrape(&reqwest::Client::new(), &self.address).await,
            series,
        )
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = std::process::Command::new("kill")
                .arg("-KILL")
                .arg(self.pid.to_string())
                .status();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- tally (pid {}) log tail, {} ---\n{}\n---",
                self.pid,
                self.log.display(),
                self.log_tail()
            );
        }
    }
}

/// A dead-letter row as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterRow {
    pub key: String,
    pub delta: i64,
    pub reason: String,
}

/// Direct access to the store tally writes, for assertions: a SQLite file opened by the
/// test itself, or a connection of its own to the test database (never through tally or
/// a proxy).
pub enum Direct {
    Sqlite(PathBuf),
    /// A connection of the test's own, and the database's URL.
    Postgres(tokio_postgres::Client, String),
}

impl Direct {
    /// The store of a tally with this data dir and (if any) PostgreSQL database.
    pub async fn open(data_dir: &Path, db: Option<&PgDatabase>) -> Self {
        match db {
            Some(db) => Self::Postgres(crate::pg::client(&db.url).await, db.url.clone()),
            None => Self::Sqlite(data_dir.join("tally.db")),
        }
    }

    /// Every counter in the store.
    pub async fn counters(&self) -> HashMap<String, i64> {
        let counters = match self {
            Self::Sqlite(path) => {
                let data_dir = path.parent().expect("tally.db lies in a data directory");
                stored_counters(data_dir, &Backend::Sqlite).await
            }
            // The data directory only locates a SQLite file.
            Self::Postgres(_, url) => {
                stored_counters(Path::new("."), &Backend::Postgres(url.clone())).await
            }
        };
        counters.into_iter().collect()
    }

    /// One counter's stored value.
    pub async fn value(&self, key: &str) -> Option<i64> {
        match self {
            Self::Sqlite(path) => {
                let key = key.to_owned();
                read_sqlite(path, move |conn| {
                    use rusqlite::OptionalExtension;
                    conn.query_row("SELECT value FROM counters WHERE key = ?1", [key], |r| {
                        r.get(0)
                    })
                    .optional()
                })
                .await
            }
            Self::Postgres(client, _) => client
                .query_opt("SELECT value FROM counters WHERE key = $1", &[&key])
                .await
                .expect("read a counter from PostgreSQL")
                .map(|r| r.get(0)),
        }
    }

    /// Every dead letter, in insertion order.
    pub async fn dead_letters(&self) -> Vec<DeadLetterRow> {
        const SQL: &str = "SELECT key, delta, reason FROM tally_dead_letters ORDER BY seq, key";
        match self {
            Self::Sqlite(path) => {
                read_sqlite(path, |conn| {
                    let mut stmt = conn.prepare(SQL)?;
                    let rows = stmt.query_map([], |r| {
                        Ok(DeadLetterRow {
                            key: r.get(0)?,
                            delta: r.get(1)?,
                            reason: r.get(2)?,
                        })
                    })?;
                    rows.collect()
                })
                .await
            }
            Self::Postgres(client, _) => client
                .query(SQL, &[])
                .await
                .expect("read dead letters from PostgreSQL")
                .into_iter()
                .map(|r| DeadLetterRow {
                    key: r.get(0),
                    delta: r.get(1),
                    reason: r.get(2),
                })
                .collect(),
        }
    }
}

/// `POST /increment` of 1 to `key` at `address`; the status, 0 when there was no answer.
pub async fn increment(client: &reqwest::Client, address: &str, key: &str) -> u16 {
    increment_answer(client, address, key).await.0
}

/// [`increment`], with the `error` code of the answer's body (empty for none).
pub async fn increment_answer(client: &reqwest::Client, address: &str, key: &str) -> (u16, String) {
    let Ok(response) = client
        .post(format!("{address}/increment"))
        .json(&serde_json::json!({ "key": key, "value": 1 }))
        .send()
        .await
    else {
        return (0, String::new());
    };
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    let code = body["error"].as_str().unwrap_or_default().to_owned();
    (status, code)
}

/// Asserts that `tally` gave batches up on while a row lock was held (`--store-timeout`) and
/// that at most `most` sessions waited on that lock at once: the attempt in progress, and one
/// being cancelled; the abandoned ones were cancelled, not left on the server.
pub async fn assert_given_up_on_and_cancelled(tally: &Tally, most: i64) {
    assert!(
        tally
            .metric("tally_flush_batches_total{result=\"failed\"}")
            .await
            >= 3.0,
        "attempts were given up on"
    );
    assert!(
        (1..=2).contains(&most),
        "{most} sessions wait on the lock: only the attempt in progress (and one being \
         cancelled) may\n{}",
        tally.log_tail()
    );
}

/// Asserts that a run's whole `log` holds `line` exactly once: one line per change of state.
pub fn assert_logged_once(log: &str, line: &str, when: &str) {
    assert_eq!(log.matches(line).count(), 1, "one line {when}:\n{log}");
}

/// `GET /readyz` at `address`: status and body.
pub async fn readyz(client: &reqwest::Client, address: &str) -> (u16, String) {
    let response = client
        .get(format!("{address}/readyz"))
        .send()
        .await
        .expect("/readyz answers");
    (
        response.status().as_u16(),
        response.text().await.unwrap_or_default(),
    )
}

impl Direct {
    /// Waits until `key` is stored with `value`; panics after `timeout`.
    pub async fn wait_for(&self, key: &str, value: i64, timeout: Duration) {
        eventually(
            timeout,
            &format!("{key} = {value} in the store"),
            || async { self.value(key).await == Some(value) },
        )
        .await;
    }
}

/// Polls `check` every 20 ms until it returns true; panics with `what` after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return;
        }
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The name of load key `i`.
pub fn key_name(i: usize) -> String {
    format!("key-{i:03}")
}

/// One request the load driver sent: which key, which delta, the status (`None`: no
/// answer, e.g. the process was killed or the connection refused) and when it ended.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    pub key: usize,
    pub delta: i64,
    pub status: Option<u16>,
    pub at: Instant,
}

impl Sent {
    pub fn acked(&self) -> bool {
        self.status == Some(202)
    }
}

/// Concurrent `POST /increment` traffic with positive deltas over `keys` keys, from
/// `workers` tasks that each keep one request in flight, until [`Load::finish`] or
/// `max_duration`.
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<Vec<Sent>>>,
}

impl Load {
    pub fn start(
        address: &str,
        keys: usize,
        workers: usize,
        rng: &mut Rng,
        max_duration: Duration,
    ) -> Self {
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .pool_max_idle_per_host(workers)
            .build()
            .expect("http client");
        let url = format!("{address}/increment");
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + max_duration;
        let tasks = (0..workers)
            .map(|_| {
                let (client, url, stop) = (client.clone(), url.clone(), Arc::clone(&stop));
                let mut rng = Rng::new(rng.next_u64());
                tokio::spawn(async move {
                    let mut sent = Vec::new();
                    while !stop.load(Ordering::Relaxed)
                        && Instant::now() < deadline
                        && sent.len() < MAX_REQUESTS_PER_WORKER
                    {
                        let key = rng.range(0, keys as u64 - 1) as usize;
                        let delta = rng.range(1, 100) as i64;
                        let status = client
                            .post(&url)
                            .json(&serde_json::json!({ "key": key_name(key), "value": delta }))
                            .send()
                            .await
                            .ok()
                            .map(|r| r.status().as_u16());
                        sent.push(Sent {
                            key,
                            delta,
                            status,
                            at: Instant::now(),
                        });
                        if status.is_none() {
                            // The server is gone or going: do not spin on refused connects.
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                    sent
                })
            })
            .collect();
        Self { stop, tasks }
    }

    /// Stops the workers and returns every request they sent.
    pub async fn finish(self) -> Vec<Sent> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for task in self.tasks {
            let sent = tokio::time::timeout(REQUEST_TIMEOUT * 2, task)
                .await
                .expect("load worker stops in time")
                .expect("load worker panicked");
            all.extend(sent);
        }
        all
    }
}

/// Per key: the sum of acknowledged deltas and the sum of attempted ones (every request
/// sent, whatever became of it); plus request counts.
#[derive(Debug, Clone)]
pub struct Ledger {
    pub acked: Vec<i128>,
    pub attempted: Vec<i128>,
    pub requests_acked: u64,
    pub requests_attempted: u64,
    /// Answers other than 202, by status.
    pub other_statuses: HashMap<u16, u64>,
}

/// Request counts of one [`Ledger::record`] call.
#[derive(Debug, Clone, Copy)]
pub struct Counts {
    pub acked: u64,
    pub attempted: u64,
}

impl Ledger {
    pub fn new(keys: usize) -> Self {
        Self {
            acked: vec![0; keys],
            attempted: vec![0; keys],
            requests_acked: 0,
            requests_attempted: 0,
            other_statuses: HashMap::new(),
        }
    }

    pub fn record(&mut self, sent: &[Sent]) -> Counts {
        let mut counts = Counts {
            acked: 0,
            attempted: 0,
        };
        for s in sent {
            self.attempted[s.key] += i128::from(s.delta);
            counts.attempted += 1;
            match s.status {
                Some(202) => {
                    self.acked[s.key] += i128::from(s.delta);
                    counts.acked += 1;
                }
                Some(other) => *self.other_statuses.entry(other).or_default() += 1,
                None => {}
            }
        }
        self.requests_acked += counts.acked;
        self.requests_attempted += counts.attempted;
        counts
    }

    pub fn acked_total(&self) -> i128 {
        self.acked.iter().sum()
    }

    pub fn attempted_total(&self) -> i128 {
        self.attempted.iter().sum()
    }

    /// The stored value of each load key (0 when absent), in key order.
    pub fn stored(&self, counters: &HashMap<String, i64>) -> Vec<i128> {
        (0..self.acked.len())
            .map(|i| counters.get(&key_name(i)).copied().map_or(0, i128::from))
            .collect()
    }
}

/// [`send_batches`] sends this many batches of [`BATCH_ITEMS`] keys: 8 × 10,000 entries of
/// 22 bytes, about 1.76 MB of records, so that 1 MiB journal segments close one.
pub const BATCHES: usize = 8;
pub const BATCH_ITEMS: usize = 10_000;

/// Sends the [`BATCHES`] to `POST /increments`, each of keys `batch-00000` … adding 1, each
/// answered 202.
pub async fn send_batches(client: &reqwest::Client, address: &str) {
    let body: Vec<_> = (0..BATCH_ITEMS)
        .map(|i| serde_json::json!({ "key": format!("batch-{i:05}"), "value": 1 }))
        .collect();
    for _ in 0..BATCHES {
        let answer = client
            .post(format!("{address}/increments"))
            .json(&body)
            .send()
            .await
            .expect("an answer");
        assert_eq!(answer.status(), 202, "a batch");
    }
}

/// Asserts that the store of `data_dir` (or `db`) holds each key of [`send_batches`] exactly
/// [`BATCHES`] times, besides `others` keys of the test's own.
pub async fn assert_batches_stored_once(data_dir: &Path, db: Option<&PgDatabase>, others: usize) {
    let counters = Direct::open(data_dir, db).await.counters().await;
    assert_eq!(
        counters.len(),
        BATCH_ITEMS + others,
        "every key of the batches"
    );
    assert!(
        (counters.iter())
            .filter(|(key, _)| key.starts_with("batch-"))
            .all(|(_, &v)| v == BATCHES as i64),
        "every increment stored once"
    );
}
