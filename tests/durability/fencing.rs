//! The instance id is claimed, not assumed: a batch of a process that no longer holds the
//! claim never lands as if it were the new one's, and the new one never reuses its seqs.
//!
//! The case that broke before fencing: `kill -9` while PostgreSQL is still committing the
//! dead process's batch. The commit finishes *after* the restarted instance read its
//! progress, so the restart numbered its first batch with the seq the dead process had
//! just used; the store then skipped that batch as "already applied", and increments
//! acknowledged after the restart were lost. A deferred constraint trigger that sleeps
//! makes that commit slow on demand, so the test is deterministic.

use std::time::Duration;

use serde_json::json;

use crate::common::data_dir;
use crate::pg::{self, PgDatabase, shout};
use crate::support::{Direct, Tally, TallyConfig, eventually, increment, readyz};

/// How long the dead process's commit takes: longer than a restart.
const SLOW_COMMIT: Duration = Duration::from_secs(2);
/// Increments acknowledged by the restarted instance.
const AFTER: i64 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_finishing_after_kill_9_does_not_swallow_the_restarts_first_batch() {
    let Some(db) = PgDatabase::create("zombie_commit").await else {
        return;
    };
    let dir = data_dir();
    // ack=memory: nothing but the store's bookkeeping decides what the restart numbers.
    let config = TallyConfig::new(dir.path(), Some(&db), "memory", "100ms");
    let admin = pg::client(&db.url).await;
    let client = reqwest::Client::new();

    let mut tally = Tally::start(&config).await;
    let slow = pg::SlowCommits::install(&admin, SLOW_COMMIT).await;
    // A first batch, committed at normal speed: the instance's row exists from now on, and
    // the slow commit below updates it (as every commit but an instance's first does).
    assert_eq!(increment(&client, &tally.address, "warm-up").await, 202);
    let direct = Direct::open(dir.path(), Some(&db)).await;
    direct.wait_for("warm-up", 1, Duration::from_secs(10)).await;
    slow.set(true).await;
    assert_eq!(increment(&client, &tally.address, "before").await, 202);
    eventually(
        Duration::from_secs(10),
        "tally's batch commit is in the slow trigger",
        || slow.sleeping(),
    )
    .await;
    tally.kill9().await;
    // The dead process's commit is sleeping already; later commits are fast.
    slow.set(false).await;

    let mut tally = Tally::start(&config).await;
    for _ in 0..AFTER {
        assert_eq!(increment(&client, &tally.address, "after").await, 202);
    }
    let status = tally.terminate().await;
    assert!(status.success(), "SIGTERM drains and exits 0: {status}");

    assert_eq!(
        direct.value("before").await,
        Some(1),
        "the dead process's commit went through (else this test tests nothing)"
    );
    assert_eq!(
        direct.value("after").await,
        Some(AFTER),
        "every increment acknowledged after the restart is in the store"
    );
    shout(
        "fencing postgres: a batch commit still running at kill -9 finished after the restart \
         read its progress; the restart's own batches were all stored",
    );
}

/// `--instance-id` given to both instances of the tests below.
const SHARED_ID: &str = "shared-id";

fn with_shared_id(mut config: TallyConfig) -> TallyConfig {
    config.extra = vec!["--instance-id".to_owned(), SHARED_ID.to_owned()];
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_live_process_with_the_same_instance_id_refuses_to_start() {
    let Some(db) = PgDatabase::create("duplicate_id").await else {
        return;
    };
    let (dir_a, dir_b) = (data_dir(), data_dir());
    let config_a = with_shared_id(TallyConfig::new(
        dir_a.path(),
        Some(&db),
        "journal",
        "100ms",
    ));
    let config_b = with_shared_id(TallyConfig::new(
        dir_b.path(),
        Some(&db),
        "journal",
        "100ms",
    ));
    let client = reqwest::Client::new();

    let mut a = Tally::start(&config_a).await;
    assert_eq!(increment(&client, &a.address, "k").await, 202);
    let mut b = Tally::spawn(&config_b);
    let status = b.wait_exit(Duration::from_secs(30)).await;
    let log = b.log();
    assert!(
        !status.success(),
        "the duplicate must not run: {status}\n{log}"
    );
    assert!(
        log.contains("in use by another running tally") && log.contains(SHARED_ID),
        "the duplicate says why, naming the id:\n{log}"
    );

    // The first one never noticed.
    assert_eq!(increment(&client, &a.address, "k").await, 202);
    let status = a.terminate().await;
    assert!(
        status.success(),
        "the first instance drains and exits 0: {status}"
    );
    let direct = Direct::open(dir_a.path(), Some(&db)).await;
    assert_eq!(direct.value("k").await, Some(2));
    shout("fencing postgres: a second live process with the same --instance-id refused to start");
}

/// `POST /increment` of 1 to "k", answered whatever its status.
async fn post_one(client: &reqwest::Client, address: &str) -> reqwest::Response {
    client
        .post(format!("{address}/increment"))
        .json(&json!({ "key": "k", "value": 1 }))
        .send()
        .await
        .expect("an answer")
}

/// Claims the shared id as another tally would (a duplicate whose lock connection had
/// dropped): the id's epoch + 1, recording the claim as passing from this one's journal to
/// the intruder's at the seq reached.
fn take_claim() -> String {
    format!(
        "UPDATE tally_instances SET epoch = epoch + 1, previous_claimant = claimed_by, \
         handover_seq = last_seq, claimed_by = 'intruder', claimed_epoch = epoch + 1 \
         WHERE instance_id = '{SHARED_ID}'"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_claim_was_taken_stops_acknowledging_and_loses_nothing() {
    // Another process claims the id, as a duplicate whose lock connection had dropped would.
    fenced_and_replayed(
        "claim_taken",
        &take_claim(),
        "Fenced: another process claimed this instance id",
    )
    .await;
}

/// The database goes back to before this instance's last batch (a failover to a replica that
/// missed it, a restore from a backup), the claim kept: the instance finds it at its next
/// batch, writes nothing more and exits 1, and its restart writes the lost batch again from
/// its journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_store_lost_a_batch_exits_and_its_restart_writes_it_again() {
    exits_and_replays("batch_lost", &lose_last_batch()).await;
}

/// The database goes back to before this instance's claim (a failover to a replica that
/// missed it, a restore from a backup): told apart from another claimant, since claims only
/// ever raise the epoch: it exits for a new start rather than wait, fenced, for an operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_store_lost_its_claim_says_so_exits_and_loses_nothing() {
    exits_and_replays(
        "claim_lost",
        // The row as it was before the claim (by the same journal: its previous start).
        &format!(
            "UPDATE tally_instances SET epoch = epoch - 1, claimed_epoch = claimed_epoch - 1 \
             WHERE instance_id = '{SHARED_ID}'"
        ),
    )
    .await;
}

/// An instance (`ack=journal`) whose store the statements `sabotage` take back in time, after
/// [`two_batches`]: at its next batch it says so, writes nothing more and exits 1 by itself,
/// for its supervisor to start it again; the new start writes every increment acknowledged,
/// the lost batch's included.
async fn exits_and_replays(name: &str, sabotage: &str) {
    let Some(mut sabotaged) = sabotaged(name, "journal", sabotage).await else {
        return;
    };
    let (direct, address) = (&sabotaged.direct, sabotaged.tally.address.clone());
    let at_sabotage = direct.value("k").await;
    // Until its next batch is refused, the instance does not know: what it acknowledges
    // meanwhile is journaled. Then it refuses, and goes.
    let mut acked_after = 0;
    for _ in 0..500 {
        let answer = sabotaged
            .client
            .post(format!("{address}/increment"))
            .json(&json!({ "key": "k", "value": 1 }))
            .send()
            .await;
        match answer.map(|a| a.status().as_u16()) {
            Ok(202) => acked_after += 1,
            _ => break,
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = sabotaged.tally.wait_exit(Duration::from_secs(30)).await;
    let log = sabotaged.tally.log();
    assert_eq!(status.code(), Some(1), "exits 1 by itself:\n{log}");
    assert!(
        log.contains("Fenced: the store has gone back in time")
            && log.contains("to exit 1 for the supervisor to start tally again"),
        "the log says what happened:\n{log}"
    );
    let direct = &sabotaged.direct;
    assert_eq!(
        direct.value("k").await,
        at_sabotage,
        "nothing written after the loss was found"
    );

    // The supervisor starts it again; that start says why, once, for the alert the run that
    // found it was too short-lived to raise.
    let went_back = sabotaged.config.data_dir.join("went-back");
    assert!(went_back.exists(), "the run notes why it ended");
    let mut again = Tally::start(&sabotaged.config).await;
    assert!(
        again
            .metric("tally_store_went_back_timestamp_seconds")
            .await
            > 0.0
    );
    assert!(
        again
            .log()
            .contains("The last run ended because the store had gone back in time"),
        "the new start says why the last run ended:\n{}",
        again.log()
    );
    assert!(!went_back.exists(), "reported once");
    let status = again.terminate().await;
    assert!(status.success(), "{status}");
    assert_eq!(direct.value("k").await, Some(5 + acked_after));
    shout(&format!(
        "fencing postgres ({name}): the instance exited 1 by itself; its new start wrote the \
         {acked_after} increments acknowledged before it knew, and any lost batch, from its journal"
    ));
}

/// A tally with `--ack ack` on a fresh database, after [`two_batches`] and the statements
/// `sabotage`.
struct Sabotaged {
    _db: PgDatabase,
    _dir: tempfile::TempDir,
    config: TallyConfig,
    direct: Direct,
    client: reqwest::Client,
    tally: Tally,
}

/// [`Sabotaged`]; `None` when no PostgreSQL answers (see `PgDatabase::create`).
async fn sabotaged(name: &str, ack: &'static str, sabotage: &str) -> Option<Sabotaged> {
    let db = PgDatabase::create(name).await?;
    let dir = data_dir();
    let config = with_shared_id(TallyConfig::new(dir.path(), Some(&db), ack, "100ms"));
    let direct = Direct::open(dir.path(), Some(&db)).await;
    let client = reqwest::Client::new();
    let tally = Tally::start(&config).await;
    two_batches(&client, &tally.address, &direct).await;
    pg::client(&db.url)
        .await
        .batch_execute(sabotage)
        .await
        .expect(sabotage);
    Some(Sabotaged {
        _db: db,
        _dir: dir,
        config,
        direct,
        client,
        tally,
    })
}

/// Two batches in the store: +1 to "k", then +4 in one request, so that the last batch is
/// known.
async fn two_batches(client: &reqwest::Client, address: &str, direct: &Direct) {
    assert_eq!(increment(client, address, "k").await, 202);
    direct.wait_for("k", 1, Duration::from_secs(10)).await;
    let four = client
        .post(format!("{address}/increment"))
        .json(&json!({ "key": "k", "value": 4 }))
        .send()
        .await
        .expect("an answer");
    assert_eq!(four.status(), 202);
    direct.wait_for("k", 5, Duration::from_secs(10)).await;
}

/// The database as it was before [`two_batches`]' last one: its seq and its sum.
fn lose_last_batch() -> String {
    format!(
        "UPDATE tally_instances SET last_seq = last_seq - 1 WHERE instance_id = '{SHARED_ID}'; \
         UPDATE counters SET value = value - 4 WHERE key = 'k'"
    )
}

/// Without a journal (`ack=memory`) nothing could write a lost batch again: the instance
/// says so, counts it, and goes on from what the store holds, not fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_journal_an_instance_whose_store_lost_a_batch_says_so_and_goes_on() {
    // Every field bound, so that none (the database, the data directory) drops here.
    let Some(Sabotaged {
        _db,
        _dir,
        config: _config,
        direct,
        client,
        mut tally,
    }) = sabotaged("batch_lost_memory", "memory", &lose_last_batch()).await
    else {
        return;
    };
    let ten = client
        .post(format!("{}/increment", tally.address))
        .json(&json!({ "key": "k", "value": 10 }))
        .send()
        .await
        .expect("an answer");
    assert_eq!(ten.status(), 202);
    // The lost +4 stays lost; the +10 is written after it.
    direct.wait_for("k", 11, Duration::from_secs(10)).await;
    assert_eq!(tally.metric("tally_store_lost_batches_total").await, 1.0);
    let log = tally.log();
    assert!(
        log.contains("The store has gone back in time and lost batches of this instance"),
        "the log says what happened:\n{log}"
    );
    let (status, ready) = readyz(&client, &tally.address).await;
    assert_eq!(status, 200, "not fenced: {ready}");
    let status = tally.terminate().await;
    assert!(status.success(), "{status}");
    shout(
        "fencing postgres (batch_lost, ack=memory): the loss was logged and counted; the instance went on",
    );
}

/// An instance whose claim the statements `sabotage` take under load: it stops
/// acknowledging, answers 503 fenced, says `said` in its log, writes nothing more, and its
/// restart replays what it acknowledged before it knew.
async fn fenced_and_replayed(name: &str, sabotage: &str, said: &str) {
    let Some(Sabotaged {
        _db,
        _dir,
        config,
        direct,
        client,
        mut tally,
    }) = sabotaged(name, "journal", sabotage).await
    else {
        return;
    };
    let at_sabotage = direct.value("k").await;
    // Until its next batch is refused, the instance does not know: what it acknowledges
    // meanwhile is journaled. Then it refuses.
    let mut acked_after = 0;
    let mut refused = None;
    for _ in 0..500 {
        let response = post_one(&client, &tally.address).await;
        match response.status().as_u16() {
            202 => acked_after += 1,
            _ => {
                refused = Some((response.status(), response.text().await.unwrap_or_default()));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, body) = refused.expect("the fenced instance stops acknowledging");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(r#""error":"fenced""#), "{body}");
    let (status, ready) = readyz(&client, &tally.address).await;
    assert_eq!(status, 503);
    assert!(ready.contains("fenced"), "/readyz says why: {ready}");
    assert!(
        tally
            .metric("tally_flush_batches_total{result=\"fenced\"}")
            .await
            >= 1.0
    );
    assert_eq!(
        direct.value("k").await,
        at_sabotage,
        "nothing written after the fence"
    );

    let status = tally.terminate().await;
    assert!(
        !status.success(),
        "a fenced drain is a failed drain: {status}"
    );
    let log = tally.log();
    assert!(log.contains(said), "the log says what happened:\n{log}");
    assert!(
        !log.contains("to exit 1 for the supervisor"),
        "another claimant does not make it exit by itself (a new start would take the id back):\n{log}"
    );

    // The operator fixes the fleet and restarts it: the journal still has what was
    // acknowledged between the fence and its discovery.
    let mut tally = Tally::start(&config).await;
    let status = tally.terminate().await;
    assert!(status.success(), "{status}");
    assert_eq!(direct.value("k").await, Some(5 + acked_after));
    shout(&format!(
        "fencing postgres ({name}): the instance answered 503 fenced and /readyz 503; the \
         {acked_after} increments it acknowledged before it knew were replayed from its journal"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_store_request_waiting_when_the_claim_is_taken_hears_fenced_at_once() {
    let Some(db) = PgDatabase::create("claim_taken_store").await else {
        return;
    };
    let dir = data_dir();
    let mut tally = Tally::start(&with_shared_id(TallyConfig::new(
        dir.path(),
        Some(&db),
        "store",
        "100ms",
    )))
    .await;
    let client = reqwest::Client::new();
    assert_eq!(increment(&client, &tally.address, "k").await, 202);
    pg::client(&db.url)
        .await
        .batch_execute(&take_claim())
        .await
        .expect("take the claim");
    // This request's batch is the one the store refuses: it waits for a commit that will
    // never come, and hears so when the flusher learns it, not at --request-timeout (30 s).
    let started = std::time::Instant::now();
    let response = post_one(&client, &tally.address).await;
    let waited = started.elapsed();
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(r#""error":"fenced""#), "{body}");
    assert!(
        waited < Duration::from_secs(10),
        "answered after {waited:?}"
    );
    let status = tally.terminate().await;
    assert!(
        !status.success(),
        "a fenced drain is a failed drain: {status}"
    );
    shout(&format!(
        "fencing postgres: an ack=store request waiting on a refused batch heard 503 fenced after {waited:.1?}"
    ));
}
