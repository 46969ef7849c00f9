//! PostgreSQL failing over the way a highly available setup does it: a primary with a
//! streaming standby of its own (`pg_basebackup -R`), the standby promoted, and tally's URL
//! naming both hosts with `target_session_attrs=read-write`, so that it finds the one that
//! takes writes by itself. Real servers and real replication, no statement run to imitate
//! one (`fencing.rs` takes a store back in time by hand; these check that a real failover
//! is what it takes for).
//!
//! Both run `--ack journal`, the default, with a private primary and standby each
//! ([`PrivatePostgres`]).

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use serde_json::json;
use tempfile::TempDir;

use crate::common::data_dir;
use crate::pg::shout;
use crate::private_pg::{ADMIN_SECRET, PrivatePostgres};
use crate::support::{Ledger, Load, Rng, Tally, TallyConfig, eventually, seed};

/// Keys of the switchover's load, and its requests in flight.
const KEYS: usize = 50;
const IN_FLIGHT: usize = 8;
/// The longest the switchover's load runs (it is stopped long before).
const LOAD_CAP: Duration = Duration::from_secs(60);

/// A primary, its standby, and a tally that may write to either.
struct Pair {
    primary: PrivatePostgres,
    standby: PrivatePostgres,
    tally: ToBoth,
}

impl Pair {
    /// `None` (having said so) when no private server starts; see [`PrivatePostgres::start`].
    /// Returns once the standby streams from the primary.
    async fn start(what: &str, more: &[&str]) -> Option<Self> {
        let primary = PrivatePostgres::start(false, what)?;
        let standby = primary.standby(what)?;
        // The standby first: only `target_session_attrs` keeps tally off it until promoted.
        let tally = ToBoth::new(&[standby.address(), primary.address()], more);
        let admin = primary.admin("postgres").await;
        eventually(
            Duration::from_secs(15),
            "the standby streams from the primary",
            || async {
                admin
                    .query_one(
                        "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'",
                        &[],
                    )
                    .await
                    .is_ok_and(|row| row.get::<_, i64>(0) == 1)
            },
        )
        .await;
        Some(Self {
            primary,
            standby,
            tally,
        })
    }
}

/// The configuration of a tally (`--ack journal`) whose URL names `hosts` in that order, with
/// `target_session_attrs=read-write`, as the private servers' superuser.
struct ToBoth {
    config: TallyConfig,
    _secrets: TempDir,
    _dir: TempDir,
}

impl ToBoth {
    fn new(hosts: &[String], more: &[&str]) -> Self {
        let secrets = data_dir();
        let password = secrets.path().join("pgpass");
        std::fs::write(&password, ADMIN_SECRET).expect("write the password file");
        let dir = data_dir();
        let mut config = TallyConfig::new(dir.path(), None, "journal", "100ms");
        config.database_url = Some(format!(
            "postgres://postgres@{}/postgres?target_session_attrs=read-write",
            hosts.join(",")
        ));
        config.extra = ["--database-password-file", &password.display().to_string()]
            .into_iter()
            .chain(more.iter().copied())
            .map(str::to_owned)
            .collect();
        Self {
            config,
            _secrets: secrets,
            _dir: dir,
        }
    }
}

/// Every counter `server` holds; an error while a standby has yet to replay the table.
async fn try_counters(server: &PrivatePostgres) -> Result<HashMap<String, i64>, String> {
    let client = server.admin("postgres").await;
    let rows =
        (client.query("SELECT key, value FROM counters", &[]).await).map_err(|e| e.to_string())?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}

async fn counters(server: &PrivatePostgres) -> HashMap<String, i64> {
    try_counters(server).await.expect("read the counters")
}

/// The value `server` holds for `k`, 0 when it holds none.
async fn value(server: &PrivatePostgres) -> i64 {
    counters(server).await.get("k").copied().unwrap_or(0)
}

/// Waits until `server` holds `total` for `k`.
async fn holds(server: &PrivatePostgres, total: i64, what: &str) {
    eventually(Duration::from_secs(15), what, || async {
        try_counters(server)
            .await
            .is_ok_and(|counters| counters.get("k") == Some(&total))
    })
    .await;
}

/// A switchover, as an operator or a cluster manager (Patroni, pg_auto_failover) does one:
/// the primary stopped cleanly, which first sends its standby every WAL record, then the
/// standby promoted. Under steady load: while neither server takes writes the batches fail
/// and the journal goes on acknowledging; then they land on the new primary, found through
/// `target_session_attrs`, with no restart. Every acknowledged increment is stored once (a
/// batch whose commit the stop cut off from its answer would be written again and found
/// already applied; the run says whether one was).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_to_the_standby_loses_nothing_and_counts_nothing_twice() {
    let Some(pair) = Pair::start("switchover", &[]).await else {
        return;
    };
    let mut tally = Tally::start(&pair.tally.config).await;
    let seed = seed();
    let mut rng = Rng::new(seed);
    let mut ledger = Ledger::new(KEYS);
    let load = Load::start(&tally.address, KEYS, IN_FLIGHT, &mut rng, LOAD_CAP);
    eventually(
        Duration::from_secs(15),
        "the primary holds increments",
        || async { !counters(&pair.primary).await.is_empty() },
    )
    .await;

    pair.primary.stop("fast");
    eventually(
        Duration::from_secs(15),
        "a batch fails for no host taking writes: the primary is gone, the standby read-only",
        || async { tally.failed_for("not_connected").await >= 1.0 },
    )
    .await;
    pair.standby.promote();
    eventually(
        Duration::from_secs(15),
        "the batches land on the new primary",
        || async {
            tally
                .log()
                .contains("Batch written after failed attempts; the store takes batches again.")
        },
    )
    .await;
    assert_eq!(
        tally.failed_for("other").await,
        0.0,
        "every failure told apart"
    );
    // More load, on the new primary only.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let counts = ledger.record(&load.finish().await);
    assert!(
        counts.acked == counts.attempted && ledger.other_statuses.is_empty(),
        "every increment acknowledged through the switchover: {} of {}, others {:?}",
        counts.acked,
        counts.attempted,
        ledger.other_statuses
    );
    let already = tally
        .metric(r#"tally_flush_batches_total{result="already_applied"}"#)
        .await;
    let status = tally.terminate().await;
    assert!(status.success(), "SIGTERM drains and exits 0: {status}");
    assert_eq!(
        ledger.stored(&counters(&pair.standby).await),
        ledger.acked,
        "seed {seed}: the new primary holds every acknowledged increment, once"
    );
    shout(&format!(
        "failover (switchover): {} increments acknowledged while the primary stopped and its \
         standby was promoted, every one stored once on the new primary ({already} batches \
         found already applied)",
        counts.acked
    ));
}

/// A failover that loses commits: the standby had stopped receiving WAL (asynchronous
/// replication, fallen behind), the primary committed more of tally's batches, then crashed,
/// and the standby was promoted. The database has lost those batches; tally finds out at its
/// next batch (the store's last seq is below one it saw committed), answers 503 `fenced`,
/// and drains to exit 1 by itself (here an operator's two signals end that drain at once);
/// its new start writes them again from its journal. Every acknowledged increment is stored
/// once on the new primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_a_standby_that_missed_commits_is_healed_from_the_journal() {
    // A drain that keeps serving a while, so that the 503 is seen before the listener closes.
    let Some(pair) = Pair::start("lossy failover", &["--shutdown-delay", "2s"]).await else {
        return;
    };
    let mut tally = Tally::start(&pair.tally.config).await;
    let client = reqwest::Client::new();
    let post = |value: i64| {
        client
            .post(format!("{}/increment", tally.address))
            .json(&json!({ "key": "k", "value": value }))
            .send()
    };
    let status = |answer: reqwest::Result<reqwest::Response>| answer.expect("an answer").status();

    assert_eq!(status(post(5).await), 202);
    holds(&pair.standby, 5, "the standby has the first increment").await;
    // The standby falls behind for good: it stops receiving WAL.
    let standby = pair.standby.admin("postgres").await;
    for statement in [
        "ALTER SYSTEM SET primary_conninfo = ''",
        "SELECT pg_reload_conf()",
    ] {
        standby.batch_execute(statement).await.expect(statement);
    }
    eventually(
        Duration::from_secs(15),
        "the standby's WAL receiver has stopped",
        || async {
            standby
                .query_one("SELECT count(*) FROM pg_stat_wal_receiver", &[])
                .await
                .is_ok_and(|row| row.get::<_, i64>(0) == 0)
        },
    )
    .await;
    let committed = r#"tally_flush_batches_total{result="committed"}"#;
    let before = tally.metric(committed).await;
    assert_eq!(status(post(7).await), 202);
    holds(
        &pair.primary,
        12,
        "the primary has committed the second increment",
    )
    .await;
    // And tally has its answer: the batch counts as one it saw committed.
    eventually(
        Duration::from_secs(15),
        "tally has seen the commit",
        || async { tally.metric(committed).await > before },
    )
    .await;

    pair.primary.stop("immediate");
    pair.standby.promote();
    assert_eq!(
        value(&pair.standby).await,
        5,
        "the promoted standby lost a batch"
    );
    // Until its next batch meets the new primary, tally does not know: what it acknowledges
    // meanwhile is journaled. Then it refuses increments, and goes.
    let mut acked_after = 0;
    let refusal = loop {
        let answer = post(1).await.expect("an answer while tally drains");
        if answer.status() != 202 {
            break (answer.status(), answer.text().await.unwrap_or_default());
        }
        acked_after += 1;
        assert!(acked_after < 3_000, "tally never found the loss");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        refusal.0 == 503 && refusal.1.contains("fenced"),
        "refused as fenced: {refusal:?}"
    );
    // The operator's signals are heard during this drain (within its 2 s delay): the first
    // is logged, the second exits at once; the journal still holds everything.
    tally.sigterm();
    eventually(
        Duration::from_secs(5),
        "the signal is heard during the drain",
        || async { tally.log().contains("Shutdown requested; draining.") },
    )
    .await;
    tally.sigterm();
    let exited = tally.wait_exit(Duration::from_secs(30)).await;
    let log = tally.log();
    assert!(
        exited.code() == Some(130) && log.contains("Second signal: exiting without draining."),
        "a second signal exits at once: {exited}\n{log}"
    );
    assert!(
        log.contains("Fenced: the store has gone back in time") && log.contains("lost batches"),
        "the log says what happened:\n{log}"
    );
    assert_eq!(
        value(&pair.standby).await,
        5,
        "nothing written after the loss was found"
    );

    // Its supervisor starts it again.
    let mut again = Tally::start(&pair.tally.config).await;
    let exited = again.terminate().await;
    assert!(exited.success(), "{exited}");
    assert_eq!(
        value(&pair.standby).await,
        12 + acked_after,
        "the new primary holds every acknowledged increment, once"
    );
    shout(&format!(
        "failover (lost commits): tally found the promoted standby's loss, exited 1, and its \
         new start wrote the lost batch and the {acked_after} increments acknowledged \
         meanwhile from its journal"
    ));
}

/// A first host that does not answer at all (its machine down, its packets dropped: here a
/// listener whose queue is full, so that a connection to it hangs) is passed over for the
/// next one within the pool's wait for a connection, at start and after. With the whole
/// wait spent on the first host, as before, tally did not start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_host_that_does_not_answer_is_passed_over_for_the_next() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a listener");
    // SAFETY: listen on a socket this process owns; a second listen() only sets the
    // backlog, here to none: its one queued connection fills it, and others hang.
    assert_eq!(unsafe { libc::listen(silent.as_raw_fd(), 0) }, 0);
    let address = silent.local_addr().expect("its address");
    let _queued = std::net::TcpStream::connect(address).expect("fill its queue");
    passed_over_for_the_next(address, "a first host that does not answer").await;
}

/// A first host that takes the connection and then never answers (a server whose disk
/// hangs, a proxy whose backend is gone; here a listener that queues every connection and
/// reads nothing) is passed over for the next one, with a warning that names it and a
/// count. Before, tokio-postgres' `connect_timeout` bounded the TCP connect alone, so the
/// whole wait went to the first host, and tally did not start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_host_that_accepts_and_hangs_is_passed_over_for_the_next() {
    let hung = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a listener");
    let address = hung.local_addr().expect("its address");
    let what = "a first host that accepts and hangs";
    let Some(log) = passed_over_for_the_next(address, what).await else {
        return;
    };
    assert!(
        log.contains("did not open a connection in time") && log.contains(&address.to_string()),
        "the host passed over is named:\n{log}"
    );
}

/// Starts a tally whose URL names `first` and then a real server, checks that it starts in
/// time and stores an increment on the real one, counting `first` passed over for time.
/// Returns tally's log; `None` (having said so) when no private server starts.
async fn passed_over_for_the_next(first: std::net::SocketAddr, what: &str) -> Option<String> {
    let server = PrivatePostgres::start(false, what)?;
    let both = ToBoth::new(&[first.to_string(), server.address()], &[]);
    let started = Instant::now();
    let mut tally = Tally::start(&both.config).await;
    let took = started.elapsed();
    // Each new connection spends its 2.5 s on the first host: the pool's and the lock's.
    assert!(took < Duration::from_secs(10), "started in {took:?}");
    let client = reqwest::Client::new();
    let answer = (client.post(format!("{}/increment", tally.address)))
        .json(&json!({ "key": "k", "value": 3 }))
        .send()
        .await
        .expect("an answer");
    assert_eq!(answer.status(), 202);
    holds(
        &server,
        3,
        "the increment is stored on the host that answers",
    )
    .await;
    let timeouts = (tally.metric(r#"tally_store_hosts_passed_over_total{reason="timeout"}"#)).await;
    assert!(
        timeouts >= 1.0,
        "the first host is counted passed over for time: {timeouts}"
    );
    assert!(tally.terminate().await.success());
    shout(&format!(
        "failover ({what}): passed over for the next, tally started in {took:.1?}"
    ));
    Some(tally.log())
}

/// Several hosts without `target_session_attrs=read-write` (so a connection may be opened on
/// a standby, where every batch would fail): tally says so at start, and what to add. And
/// hosts before the last that may take longer than `--store-timeout` (each gets 2.5 s of
/// two, against 2 s here): every batch would give up before the last host while the others
/// hang, which tally says too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_hosts_without_target_session_attrs_are_warned_about() {
    let Some(server) = PrivatePostgres::start(false, "several hosts") else {
        return;
    };
    let mut both = ToBoth::new(
        &[server.address(), server.address()],
        &["--store-timeout", "2s"],
    );
    let url = both.config.database_url.take().unwrap_or_default();
    both.config.database_url = url
        .strip_suffix("?target_session_attrs=read-write")
        .map(str::to_owned);
    let mut tally = Tally::start(&both.config).await;
    assert!(tally.terminate().await.success());
    let log = tally.log();
    assert!(
        log.contains("names several hosts without target_session_attrs=read-write")
            && log.contains("Add ?target_session_attrs=read-write"),
        "the start warns and says what to add:\n{log}"
    );
    assert!(
        log.contains("every batch gives up before the last host is tried")
            && log.contains("before_last=2.5s"),
        "the start warns of hosts slower than --store-timeout:\n{log}"
    );
}
