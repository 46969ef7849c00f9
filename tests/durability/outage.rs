//! Database outage: the app reaches PostgreSQL through a TCP proxy inside the test; the
//! proxy cuts every connection (and drops new ones) for a few seconds under load. Ingest
//! must keep answering 202 (ack=journal), `/readyz` must say 503 while the store is gone,
//! the flusher must catch up by itself, and the totals must be exact afterwards.
//!
//! The proxy can also *freeze* its open connections: they stay open but nothing is
//! forwarded, as in a partition without a reset, while new connections work. tally must
//! not hand a stuck connection to the next attempt: the store catches up on fresh ones. And
//! a transaction that hangs in the database (a COMMIT held up by a slow trigger) is abandoned
//! after `--store-timeout`, logged, counted failed and retried; when the abandoned commit
//! lands after all, the retry is skipped as already applied: counted once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tally::config::Ack;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::app::{spawn_app, test_config};
use crate::common::{Backend, data_dir};
use crate::pg::{self, PgDatabase, shout};
use crate::support::{
    Direct, Ledger, Load, Rng, Tally, TallyConfig, assert_batches_stored_once,
    assert_given_up_on_and_cancelled, eventually, increment, key_name, seed, send_batches,
};

const KEYS: usize = 100;
const IN_FLIGHT: usize = 16;
/// Load before the cut.
const BEFORE_CUT: Duration = Duration::from_millis(1_000);
/// How long the database stays unreachable.
const OUTAGE: Duration = Duration::from_secs(3);
/// Load after `/readyz` is back to 200.
const AFTER_RECOVERY: Duration = Duration::from_millis(1_000);
/// Longest wait for `/readyz` to turn 503 after the cut, or 200 after the restore (the
/// flusher's backoff is capped at 2 s).
const READYZ_TIMEOUT: Duration = Duration::from_secs(15);
const LOAD_CAP: Duration = Duration::from_secs(30);

/// A TCP proxy to PostgreSQL that can cut every live connection and refuse new ones, or
/// freeze the open connections (forward nothing, close nothing) and serve new ones.
struct Proxy {
    port: u16,
    cut: Arc<AtomicBool>,
    /// Freezes the connections opened since the last freeze.
    /// One switch per freeze; the last one is the open connections'. Earlier ones are kept:
    /// dropping a switch would end its connections' pumps, a cut rather than a freeze.
    frozen: Arc<Mutex<Vec<tokio::sync::watch::Sender<bool>>>>,
    /// Cancelled by `cut`: every connection opened before the cut holds a clone.
    live: Arc<Mutex<CancellationToken>>,
    task: JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let cut = Arc::new(AtomicBool::new(false));
        let live = Arc::new(Mutex::new(CancellationToken::new()));
        let frozen = Arc::new(Mutex::new(vec![tokio::sync::watch::Sender::new(false)]));
        let task = {
            let (cut, live) = (Arc::clone(&cut), Arc::clone(&live));
            let frozen = Arc::clone(&frozen);
            tokio::spawn(async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    // Token first, flag second: `cut` sets the flag before it cancels, so a
                    // connection either sees the flag or holds the token that gets cancelled.
                    let token = live.lock().unwrap_or_else(PoisonError::into_inner).clone();
                    if cut.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let upstream = upstream.clone();
                    let (up, down) = {
                        let switches = frozen.lock().unwrap_or_else(PoisonError::into_inner);
                        let current = switches.last().expect("a switch for open connections");
                        (current.subscribe(), current.subscribe())
                    };
                    tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(&upstream).await else {
                            return;
                        };
                        let (mut in_read, mut in_write) = inbound.split();
                        let (mut out_read, mut out_write) = outbound.split();
                        tokio::select! {
                            () = token.cancelled() => {}
                            () = pump(&mut in_read, &mut out_write, up) => {}
                            () = pump(&mut out_read, &mut in_write, down) => {}
                        }
                        // Both sockets drop here: each side sees its connection end.
                    });
                }
            })
        };
        Self {
            port,
            cut,
            frozen,
            live,
            task,
        }
    }

    /// Stops forwarding on every open connection, for good, without closing any; new
    /// connections work.
    fn freeze_open_connections(&self) {
        let mut switches = self.frozen.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(current) = switches.last() {
            current.send_replace(true);
        }
        switches.push(tokio::sync::watch::Sender::new(false));
    }

    /// Closes every live connection; new ones are accepted and closed at once.
    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let old = std::mem::replace(
            &mut *self.live.lock().unwrap_or_else(PoisonError::into_inner),
            CancellationToken::new(),
        );
        old.cancel();
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .cancel();
    }
}

/// Copies `from` to `to` until either side ends; holds what it read while `frozen`.
async fn pump(
    from: &mut (impl tokio::io::AsyncRead + Unpin),
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
    mut frozen: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let Ok(n @ 1..) = from.read(&mut buf).await else {
            return;
        };
        if frozen.wait_for(|f| !f).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Splits `postgres://user@host:port/db?x` into the upstream `host:port` and the same URL
/// pointing at `127.0.0.1:<proxy_port>`.
fn via_proxy(url: &str, proxy_port: u16) -> (String, String) {
    let (scheme, rest) = url.split_once("://").expect("URL has a scheme");
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let (userinfo, host) = match authority.rsplit_once('@') {
        Some((user, host)) => (format!("{user}@"), host),
        None => (String::new(), authority),
    };
    let has_port = host.rsplit_once(':').is_some_and(|(_, p)| !p.contains(']'));
    let upstream = if has_port {
        host.to_owned()
    } else {
        format!("{host}:5432")
    };
    (
        upstream,
        format!("{scheme}://{userinfo}127.0.0.1:{proxy_port}{path}"),
    )
}

async fn readyz(client: &reqwest::Client, address: &str) -> Option<u16> {
    client
        .get(format!("{address}/readyz"))
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// An app with `ack=journal` whose PostgreSQL is reached through a [`Proxy`].
struct Proxied {
    db: PgDatabase,
    proxy: Proxy,
    dir: tempfile::TempDir,
    app: crate::app::TestApp,
}

/// A fresh database `name` behind a proxy, and an app with `ack=journal` on it, its config
/// changed by `tweak` first; `None` when no PostgreSQL answers (see `PgDatabase::create`).
async fn journal_behind_proxy(
    name: &str,
    tweak: impl FnOnce(&mut tally::config::Config),
) -> Option<Proxied> {
    let db = PgDatabase::create(name).await?;
    let (upstream, _) = via_proxy(&db.url, 0);
    let proxy = Proxy::start(upstream).await;
    let (_, proxied_url) = via_proxy(&db.url, proxy.port);
    let dir = data_dir();
    let mut config = test_config(dir.path(), &Backend::Postgres(proxied_url));
    config.journal.ack = Ack::Journal;
    tweak(&mut config);
    let app = spawn_app(config, None).await;
    Some(Proxied {
        db,
        proxy,
        dir,
        app,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_continues_through_a_database_outage_and_totals_are_exact_after_recovery() {
    let Some(db) = PgDatabase::create("outage").await else {
        return;
    };
    let (upstream, _) = via_proxy(&db.url, 0);
    let proxy = Proxy::start(upstream).await;
    let dir = data_dir();
    // Its own process, so that its failure counts are its own (in-process apps share one
    // recorder).
    let mut config = TallyConfig::new(dir.path(), Some(&db), "journal", "100ms");
    config.database_url = Some(via_proxy(&db.url, proxy.port).1);
    let mut app = Tally::start(&config).await;
    let client = reqwest::Client::new();
    let seed = seed();
    let mut rng = Rng::new(seed);

    let load = Load::start(&app.address, KEYS, IN_FLIGHT, &mut rng, LOAD_CAP);
    tokio::time::sleep(BEFORE_CUT).await;
    assert_eq!(
        readyz(&client, &app.address).await,
        Some(200),
        "ready before the outage"
    );

    proxy.cut();
    let cut_at = Instant::now();
    eventually(
        READYZ_TIMEOUT,
        "/readyz answers 503 during the outage",
        || {
            let (client, address) = (&client, &app.address);
            async move { readyz(client, address).await == Some(503) }
        },
    )
    .await;
    let not_ready_after = cut_at.elapsed();
    tokio::time::sleep(OUTAGE.saturating_sub(cut_at.elapsed())).await;
    proxy.restore();
    let restored_at = Instant::now();
    eventually(
        READYZ_TIMEOUT,
        "/readyz answers 200 after the outage",
        || {
            let (client, address) = (&client, &app.address);
            async move { readyz(client, address).await == Some(200) }
        },
    )
    .await;
    let ready_after = restored_at.elapsed();
    let (not_connected, lost, other) = (
        app.failed_for("not_connected").await,
        app.failed_for("connection_lost").await,
        app.failed_for("other").await,
    );
    assert!(
        not_connected >= 1.0 && other == 0.0,
        "the cut's failures told apart: {not_connected} not_connected (new connections closed \
         at once), {lost} connection_lost, {other} other"
    );
    tokio::time::sleep(AFTER_RECOVERY).await;

    let sent = load.finish().await;
    assert!(app.terminate().await.success(), "drains after the outage");

    let mut ledger = Ledger::new(KEYS);
    ledger.record(&sent);
    let during_outage = sent
        .iter()
        .filter(|s| s.acked() && s.at > cut_at && s.at < restored_at)
        .count();
    let refused: Vec<_> = sent.iter().filter(|s| !s.acked()).take(5).collect();
    assert!(
        refused.is_empty(),
        "every increment must be acknowledged through the outage; first refused: {refused:?}"
    );
    assert!(
        during_outage > 0,
        "no increment was acknowledged while the database was cut"
    );

    // Straight to PostgreSQL, not through the proxy.
    let counters = Direct::open(dir.path(), Some(&db)).await.counters().await;
    let stored = ledger.stored(&counters);
    let wrong: Vec<String> = (0..KEYS)
        .filter(|&i| stored[i] != ledger.acked[i])
        .map(|i| {
            format!(
                "{}: acked {} stored {}",
                key_name(i),
                ledger.acked[i],
                stored[i]
            )
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "totals must be exact after the outage (seed {seed}):\n{}",
        wrong.join("\n")
    );
    assert_eq!(counters.len(), KEYS, "no key besides the load's");
    shout(&format!(
        "outage postgres ack=journal: {} requests, all 202 ({during_outage} during the {OUTAGE:?} cut); \
         /readyz 503 {not_ready_after:.1?} after the cut, 200 {ready_after:.1?} after the restore; \
         failed batches: {not_connected} not_connected, {lost} connection_lost; \
         stored == acked for all {KEYS} keys (Σ {})",
        ledger.requests_attempted,
        ledger.acked_total()
    ));
}

async fn journal_bytes(client: &reqwest::Client, address: &str) -> u64 {
    journal_metric(client, address, "tally_journal_bytes").await
}

async fn journal_metric(client: &reqwest::Client, address: &str, name: &str) -> u64 {
    let exposition = crate::metrics::scrape(client, address).await;
    crate::metrics::metric(&exposition, name) as u64
}

/// Journal segments of 1 MiB, so that the [`send_batches`] close one.
fn small_segments(config: &mut tally::config::Config) {
    config.journal.segment_bytes = tally::journal::MIN_SEGMENT_BYTES;
}

/// While the database is away the journal holds everything acknowledged since, and the
/// operator sees how much disk that takes in `tally_journal_bytes`; once the store has
/// caught up the closed segments are deleted and the gauge falls with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_journal_size_shows_while_the_database_is_away_and_falls_once_it_catches_up() {
    let Some(Proxied {
        db,
        proxy,
        dir,
        app,
    }) = journal_behind_proxy("journal_bytes", small_segments).await
    else {
        return;
    };
    let client = reqwest::Client::new();
    let empty = journal_bytes(&client, &app.address).await;

    proxy.cut();
    send_batches(&client, &app.address).await;
    let away = journal_bytes(&client, &app.address).await;
    let on_disk = crate::journal::journal_files_bytes(dir.path());
    let segments = crate::journal::journal_segments(dir.path()).len();
    assert!(segments > 1, "the batches closed a segment");
    assert_eq!(away, on_disk, "the gauge is what the segment files take");
    assert!(
        away > empty + 3 * (tally::journal::MIN_SEGMENT_BYTES / 2),
        "the journal holds the batches: {empty} → {away} bytes"
    );

    proxy.restore();
    let restored_at = Instant::now();
    let after = std::cell::Cell::new(away);
    eventually(
        READYZ_TIMEOUT,
        "the closed segments are deleted once the store has caught up",
        || {
            let (client, address, after, dir) = (&client, &app.address, &after, &dir);
            async move {
                after.set(journal_bytes(client, address).await);
                after.get() < away && crate::journal::journal_segments(dir.path()).len() == 1
            }
        },
    )
    .await;
    let caught_up_after = restored_at.elapsed();
    let after = after.get();
    assert_eq!(
        after,
        crate::journal::journal_files_bytes(dir.path()),
        "the gauge is what the segment files take, after the trim"
    );
    app.shutdown().await.expect("drains after the outage");
    assert_batches_stored_once(dir.path(), Some(&db), 0).await;
    shout(&format!(
        "journal bytes: {empty} at start, {away} with the database cut ({segments} segment \
         files), {after} {caught_up_after:.1?} after the restore"
    ));
}

/// A segment the store has every record of that cannot be deleted (here a directory in its
/// place, which `unlink` refuses whoever runs the test; in the field an immutable file or a
/// directory made read-only) stays counted in `tally_journal_bytes`, every failed attempt
/// shows in `tally_journal_trim_failures_total`, the other segments are deleted meanwhile,
/// and it goes at the next flush tick once it can, with no traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_segment_that_cannot_be_deleted_stays_counted_until_it_can_be() {
    let Some(Proxied {
        db,
        proxy,
        dir,
        app,
    }) = journal_behind_proxy("journal_trim", small_segments).await
    else {
        return;
    };
    let client = reqwest::Client::new();
    proxy.cut();
    send_batches(&client, &app.address).await;
    let mut segments = crate::journal::journal_segments(dir.path());
    segments.sort();
    assert!(segments.len() > 1, "the batches closed a segment");
    let journal = dir.path().join("journal");
    let (oldest, active) = (
        journal.join(&segments[0]),
        journal.join(&segments[segments.len() - 1]),
    );
    let oldest_bytes = std::fs::metadata(&oldest)
        .expect("the oldest segment")
        .len();
    std::fs::remove_file(&oldest).expect("remove the oldest segment");
    std::fs::create_dir(&oldest).expect("a directory in its place");

    proxy.restore();
    let (client, address, data) = (&client, app.address.as_str(), dir.path());
    eventually(
        READYZ_TIMEOUT,
        "the store catches up and the deletion fails",
        || async move {
            journal_metric(client, address, "tally_journal_trim_failures_total").await >= 1
                && crate::journal::journal_segments(data).len() == 2
        },
    )
    .await;
    let active_bytes = std::fs::metadata(&active)
        .expect("the active segment")
        .len();
    assert_eq!(
        journal_bytes(client, address).await,
        oldest_bytes + active_bytes,
        "the segment not deleted still counts"
    );
    assert_eq!(
        journal_metric(client, address, "tally_journal_trim_failing").await,
        1,
        "while it is left on disk"
    );

    std::fs::remove_dir(&oldest).expect("it can be deleted now");
    // Its file is gone already (the test removed the directory): what changes once the
    // flush tick has tried it again, with no increment coming, is the gauge.
    eventually(
        READYZ_TIMEOUT,
        "the gauge falls to what the segment files take, with no traffic",
        || async move {
            journal_bytes(client, address).await == crate::journal::journal_files_bytes(data)
        },
    )
    .await;
    assert_eq!(
        increment(client, address, "after").await,
        202,
        "an increment"
    );
    assert_eq!(
        crate::journal::journal_segments(data).len(),
        1,
        "the active one"
    );
    assert_eq!(
        journal_metric(client, address, "tally_journal_trim_failing").await,
        0,
        "nothing is left behind"
    );
    let failures = journal_metric(client, address, "tally_journal_trim_failures_total").await;
    app.shutdown().await.expect("drains");
    assert_batches_stored_once(dir.path(), Some(&db), 1).await;
    shout(&format!(
        "undeletable journal segment: {oldest_bytes} bytes counted through {failures} failed \
         deletions, gone after the next batch once it could be"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_database_connections_are_replaced_by_fresh_ones() {
    let Some(db) = PgDatabase::create("frozen").await else {
        return;
    };
    let (upstream, _) = via_proxy(&db.url, 0);
    let proxy = Proxy::start(upstream).await;
    let (_, proxied_url) = via_proxy(&db.url, proxy.port);
    let dir = data_dir();
    let mut config = TallyConfig::new(dir.path(), None, "journal", "100ms");
    config.database_url = Some(proxied_url);
    config.extra = vec!["--store-timeout".to_owned(), "1s".to_owned()];
    let mut tally = Tally::start(&config).await;
    let client = reqwest::Client::new();
    let direct = Direct::open(dir.path(), Some(&db)).await;

    assert_eq!(increment(&client, &tally.address, "k").await, 202);
    direct.wait_for("k", 1, Duration::from_secs(10)).await;

    proxy.freeze_open_connections();
    let frozen_at = Instant::now();
    for _ in 0..10 {
        assert_eq!(
            increment(&client, &tally.address, "k").await,
            202,
            "ingest goes on"
        );
    }
    // Every pooled connection is frozen for good: the batches get through only if tally
    // gives up on those and opens new ones.
    direct.wait_for("k", 11, Duration::from_secs(20)).await;
    let caught_up_after = frozen_at.elapsed();
    eventually(READYZ_TIMEOUT, "/readyz answers 200", || {
        let (client, address) = (&client, &tally.address);
        async move { readyz(client, address).await == Some(200) }
    })
    .await;
    let status = tally.terminate().await;
    assert!(
        status.success(),
        "drains with frozen connections about: {status}"
    );
    assert_eq!(direct.value("k").await, Some(11), "exactly once");
    shout(&format!(
        "frozen postgres connections: caught up on fresh connections {caught_up_after:.1?} after every \
         open one froze, exactly once"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_commit_is_abandoned_after_the_store_timeout_and_counted_once() {
    let Some(db) = PgDatabase::create("hung_commit").await else {
        return;
    };
    let dir = data_dir();
    let mut config = TallyConfig::new(dir.path(), Some(&db), "journal", "100ms");
    config.extra = vec!["--store-timeout".to_owned(), "1s".to_owned()];
    let mut tally = Tally::start(&config).await;
    let admin = pg::client(&db.url).await;
    let slow = pg::SlowCommits::install(&admin, Duration::from_secs(3)).await;
    let client = reqwest::Client::new();
    let direct = Direct::open(dir.path(), Some(&db)).await;
    let already = r#"tally_flush_batches_total{result="already_applied"}"#;

    assert_eq!(increment(&client, &tally.address, "k").await, 202);
    direct.wait_for("k", 1, Duration::from_secs(10)).await;

    slow.set(true).await;
    let failed_after = five_increments_until_counted_failed(&tally, &client).await;
    slow.set(false).await;
    let log = tally.log();
    assert!(
        log.contains("Batch not written; retrying")
            && log.contains("--store-timeout")
            && log.contains("reason=\"timeout\""),
        "the log says the attempt timed out:\n{log}"
    );
    assert_failed_for(&tally, "timeout").await;
    // The abandoned COMMIT is cancelled, or lands first if it was through already; the
    // retry writes the batch or finds it applied. Either way, once.
    direct.wait_for("k", 6, Duration::from_secs(20)).await;
    let retry = if tally.metric(already).await >= 1.0 {
        "it landed first and the retry was skipped as already applied"
    } else {
        "it was cancelled and the retry wrote it"
    };
    let status = tally.terminate().await;
    assert!(status.success(), "{status}");
    assert_eq!(direct.value("k").await, Some(6), "counted once");
    shout(&format!(
        "hung postgres commit: abandoned and counted failed {failed_after:.1?} after it hung \
         (--store-timeout 1s); {retry}: counted once"
    ));
}

/// A batch whose session the server ends under it (an operator's `pg_terminate_backend`, a
/// server restarting, a failover cutting its sessions) fails as `connection_lost`, is retried
/// on a fresh connection and counted once: here the session is ended while its COMMIT sleeps
/// in a trigger, so the end lands mid-transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_session_is_ended_under_it_is_counted_lost_and_written_once() {
    let Some(db) = PgDatabase::create("session_ended").await else {
        return;
    };
    let dir = data_dir();
    let mut config = TallyConfig::new(dir.path(), Some(&db), "journal", "100ms");
    // Longer than the commit's sleep, which is long enough for the test to end the session
    // in it on a busy machine: the batch must not be given up on first.
    config.extra = vec!["--store-timeout".to_owned(), "30s".to_owned()];
    let mut tally = Tally::start(&config).await;
    let admin = pg::client(&db.url).await;
    let slow = pg::SlowCommits::install(&admin, Duration::from_secs(20)).await;
    let client = reqwest::Client::new();
    let direct = Direct::open(dir.path(), Some(&db)).await;

    assert_eq!(increment(&client, &tally.address, "k").await, 202);
    direct.wait_for("k", 1, Duration::from_secs(10)).await;
    slow.set(true).await;
    for _ in 0..5 {
        assert_eq!(increment(&client, &tally.address, "k").await, 202);
    }
    eventually(Duration::from_secs(10), "a batch's commit sleeps", || {
        slow.sleeping()
    })
    .await;
    slow.set(false).await;
    let ended: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'tally' \
             AND wait_event = 'PgSleep'",
            &[],
        )
        .await
        .expect("end the batch's session")
        .get(0);
    assert_eq!(ended, 1, "the batch's session is ended");
    direct.wait_for("k", 6, Duration::from_secs(20)).await;
    assert_failed_for(&tally, "connection_lost").await;
    let status = tally.terminate().await;
    assert!(status.success(), "{status}");
    assert_eq!(direct.value("k").await, Some(6), "counted once");
    let log = tally.log();
    assert!(
        log.contains("reason=\"connection_lost\"") && log.contains("terminating connection"),
        "the log says the session was ended, in the server's words:\n{log}"
    );
}

/// A database made read-only (`ALTER DATABASE … SET default_transaction_read_only`, as for
/// maintenance; an old primary after a failover refuses writes the same way): every batch
/// fails with the server's own words in the log and in `/readyz` (not tokio-postgres' bare
/// "db error"), increments are still acknowledged into the journal, and once the database
/// takes writes again the sessions it made read-only are not reused: the batch lands, once,
/// with no restart and no session ended by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_database_is_named_and_its_sessions_left_once_it_is_writable() {
    let Some(db) = PgDatabase::create("read_only").await else {
        return;
    };
    let dir = data_dir();
    let config = TallyConfig::new(dir.path(), Some(&db), "journal", "100ms");
    let mut tally = Tally::start(&config).await;
    // Both opened before the database turns read-only, so both stay writable sessions.
    let admin = pg::client(&db.url).await;
    let direct = Direct::open(dir.path(), Some(&db)).await;
    let client = reqwest::Client::new();
    let name: String = admin
        .query_one("SELECT current_database()", &[])
        .await
        .expect("the database's name")
        .get(0);
    let refused = "cannot execute INSERT in a read-only transaction";

    assert_eq!(increment(&client, &tally.address, "k").await, 202);
    direct.wait_for("k", 1, Duration::from_secs(10)).await;

    admin
        .batch_execute(&format!(
            "ALTER DATABASE {name} SET default_transaction_read_only = on"
        ))
        .await
        .expect("make the database read-only");
    // The setting holds for sessions opened from now on; tally's open ones end.
    let ended: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name LIKE 'tally%'",
            &[],
        )
        .await
        .expect("end tally's sessions")
        .get(0);
    assert!(ended >= 1, "tally had sessions open");
    for _ in 0..5 {
        assert_eq!(increment(&client, &tally.address, "k").await, 202);
    }
    eventually(
        Duration::from_secs(15),
        "the log says why the batch is not written, in the server's words",
        || async { tally.log().contains(refused) },
    )
    .await;
    let ready = client
        .get(format!("{}/readyz", tally.address))
        .send()
        .await
        .expect("/readyz answers");
    assert_eq!(ready.status().as_u16(), 503);
    let reason = ready.text().await.expect("/readyz's body");
    assert!(reason.contains(refused), "/readyz says why: {reason}");
    assert_eq!(
        direct.value("k").await,
        Some(1),
        "nothing written meanwhile"
    );

    admin
        .batch_execute(&format!(
            "ALTER DATABASE {name} RESET default_transaction_read_only"
        ))
        .await
        .expect("make the database writable again");
    let writable_at = Instant::now();
    direct.wait_for("k", 6, Duration::from_secs(15)).await;
    let caught_up_after = writable_at.elapsed();
    let log = tally.log();
    assert!(
        log.contains("Batch written after failed attempts"),
        "the log says the store takes batches again:\n{}",
        tally.log_tail()
    );
    assert_failed_for(&tally, "database_error").await;
    let status = tally.terminate().await;
    assert!(status.success(), "{status}");
    assert_eq!(direct.value("k").await, Some(6), "counted once");
    shout(&format!(
        "read-only postgres: batches refused with \"{refused}\" in the log and /readyz; \
         written {caught_up_after:.1?} after the database took writes again, counted once"
    ));
}

/// An `sqlite3` shell left in a write transaction: tally's writes run in place on the
/// flusher's thread, where `--store-timeout` cannot abandon them, so SQLite's own lock wait
/// must end within it (5 s otherwise): the batch is logged, counted failed, `/readyz` says
/// why, and once the lock is gone the batch lands, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_database_another_process_keeps_locked_fails_batches_within_the_store_timeout() {
    let dir = data_dir();
    let mut config = TallyConfig::new(dir.path(), None, "journal", "100ms");
    config.extra = vec!["--store-timeout".to_owned(), "1s".to_owned()];
    let (mut tally, client, direct, shell) = locked_after_one_write(&config).await;
    let failed_after = five_increments_until_counted_failed(&tally, &client).await;
    assert!(
        failed_after < Duration::from_secs(4),
        "a write waited {failed_after:?} for the lock: longer than --store-timeout 1s allows"
    );
    // The failure is counted just before it is logged and shown.
    eventually(
        Duration::from_secs(5),
        "the log and /readyz say the database is locked",
        || async {
            let log = tally.log();
            let (status, body) = crate::support::readyz(&client, &tally.address).await;
            log.contains("Batch not written; retrying")
                && log.contains("database is locked")
                && status == 503
                && body.contains("database is locked")
        },
    )
    .await;

    assert_failed_for(&tally, "database_error").await;
    shell.execute_batch("ROLLBACK").expect("let the lock go");
    drop(shell);
    direct.wait_for("k", 6, Duration::from_secs(20)).await;
    let status = tally.terminate().await;
    assert!(status.success(), "{status}");
    assert_eq!(direct.value("k").await, Some(6), "counted once");
    shout(&format!(
        "locked sqlite database: the write failed {failed_after:.1?} after the lock was taken \
         (--store-timeout 1s), logged and shown by /readyz; counted once after the lock went"
    ));
}

/// The same lock at shutdown: the final flush, whose SQLite writes run in place on the
/// flusher's thread, gives up at `--shutdown-timeout` instead of holding the process, says
/// so, and exits non-zero; the journal keeps the deltas, and the next start writes them once.
#[tokio::test]
async fn a_locked_sqlite_database_at_shutdown_gives_up_at_the_shutdown_timeout_and_the_journal_keeps_the_rest()
 {
    let dir = data_dir();
    let mut config = TallyConfig::new(dir.path(), None, "journal", "100ms");
    config.shutdown_timeout = "2s";
    config.extra = vec!["--store-timeout".to_owned(), "300ms".to_owned()];
    let (mut tally, client, direct, shell) = locked_after_one_write(&config).await;
    five_increments_until_counted_failed(&tally, &client).await;
    let stopping = Instant::now();
    let status = tally.terminate().await;
    let took = stopping.elapsed();
    assert!(
        !status.success(),
        "the drain could not finish, yet: {status}"
    );
    // The HTTP drain ends at once (no request in flight); the final flush gets 2 s, and each
    // of its attempts waits at most --store-timeout for the lock (SQLite's own wait is 5 s).
    assert!(
        took < Duration::from_secs(4),
        "shutdown took {took:?} with --shutdown-timeout 2s"
    );
    assert!(
        tally.log().contains("final flush did not finish within 2s"),
        "the log says why; tail:\n{}",
        tally.log_tail()
    );

    shell.execute_batch("ROLLBACK").expect("let the lock go");
    drop(shell);
    let mut restarted = Tally::start(&config).await;
    direct.wait_for("k", 6, Duration::from_secs(20)).await;
    let status = restarted.terminate().await;
    assert!(status.success(), "{status}");
    assert_eq!(direct.value("k").await, Some(6), "counted once");
    shout(&format!(
        "locked sqlite database at shutdown: gave up after {took:.1?} (--shutdown-timeout 2s); \
         the journal's 5 deltas written once after restart"
    ));
}

/// Starts tally on SQLite with `config`, waits until it has written `k` = 1, then takes the
/// database's write lock from a second connection (an `sqlite3` shell left in a write
/// transaction) and returns it with the rest, held.
async fn locked_after_one_write(
    config: &TallyConfig,
) -> (Tally, reqwest::Client, Direct, rusqlite::Connection) {
    let tally = Tally::start(config).await;
    let client = reqwest::Client::new();
    let direct = Direct::open(&config.data_dir, None).await;
    assert_eq!(increment(&client, &tally.address, "k").await, 202);
    direct.wait_for("k", 1, Duration::from_secs(10)).await;
    let shell =
        rusqlite::Connection::open(config.data_dir.join("tally.db")).expect("open the database");
    shell
        .execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    (tally, client, direct, shell)
}

/// Asserts that `tally` counted at least one batch failed for `reason`, and none it could
/// not tell (`other`).
async fn assert_failed_for(tally: &Tally, reason: &str) {
    let (for_reason, other) = (
        tally.failed_for(reason).await,
        tally.failed_for("other").await,
    );
    assert!(
        for_reason >= 1.0 && other == 0.0,
        "{for_reason} failed batches counted with reason {reason:?}, {other} with `other`"
    );
}

/// Adds 1 to `k` five times (each answered 202) and waits until the flusher has counted a
/// batch failed; returns how long that took.
async fn five_increments_until_counted_failed(tally: &Tally, client: &reqwest::Client) -> Duration {
    let started = Instant::now();
    for _ in 0..5 {
        assert_eq!(increment(client, &tally.address, "k").await, 202);
    }
    eventually(
        Duration::from_secs(10),
        "a batch is counted failed",
        || async {
            tally
                .metric(r#"tally_flush_batches_total{result="failed"}"#)
                .await
                >= 1.0
        },
    )
    .await;
    started.elapsed()
}

/// A batch waiting on a row lock someone holds (an operator's forgotten `SELECT … FOR
/// UPDATE`) is given up on every `--store-timeout` and retried on a fresh connection. The
/// abandoned attempts must not stay on the server, each holding a connection for as long as
/// the lock is held, until the server has none left for anyone: tally cancels them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_given_up_on_a_held_lock_do_not_pile_up_on_the_server() {
    let Some(db) = PgDatabase::create("held_lock").await else {
        return;
    };
    let dir = data_dir();
    let mut config = TallyConfig::new(dir.path(), Some(&db), "journal", "100ms");
    config.extra = ["--store-timeout", "1s", "--instance-id", "locked"]
        .map(str::to_owned)
        .to_vec();
    let mut tally = Tally::start(&config).await;
    let client = reqwest::Client::new();
    let direct = Direct::open(dir.path(), Some(&db)).await;
    assert_eq!(increment(&client, &tally.address, "k").await, 202);
    direct.wait_for("k", 1, Duration::from_secs(10)).await;

    let admin = pg::client(&db.url).await;
    let holder = pg::client(&db.url).await;
    holder
        .batch_execute(
            "BEGIN; SELECT 1 FROM tally_instances WHERE instance_id = 'locked' FOR UPDATE",
        )
        .await
        .expect("hold the instance's row");
    assert_eq!(increment(&client, &tally.address, "k").await, 202);
    // About five attempts are given up on in six seconds.
    tokio::time::sleep(Duration::from_secs(6)).await;
    // Sampled over more than one attempt and its backoff.
    let mut most = 0;
    for _ in 0..30 {
        most = most.max(pg::sessions_waiting_on_a_lock(&admin).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_given_up_on_and_cancelled(&tally, most).await;
    holder.batch_execute("ROLLBACK").await.expect("release");
    direct.wait_for("k", 2, Duration::from_secs(10)).await;
    assert!(tally.terminate().await.success());
    assert_eq!(direct.value("k").await, Some(2), "once");
    shout(&format!(
        "held lock postgres: batches given up on while a row lock was held left at most {most} \
         session(s) waiting on it; counted once after its release"
    ));
}
