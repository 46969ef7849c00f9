//! Poison keys (invariant 7): a delta whose sum leaves the 64-bit range must not wedge the
//! flusher. It goes to `tally_dead_letters` with a reason, in the same transaction as the
//! healthy keys of its batch, which flush; later batches flush as usual.

use std::time::Duration;

use serde_json::json;

use crate::common::data_dir;
use crate::pg::{PgDatabase, shout};
use crate::support::{Direct, Tally, TallyConfig, eventually};

/// 2^62: stored once it is fine, added a second time the sum is 2^63, one past `i64::MAX`.
const HALF: i64 = i64::MAX / 2 + 1;
/// Longest wait for a flush that should take one 100 ms interval.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

async fn post(client: &reqwest::Client, tally: &Tally, path: &str, body: serde_json::Value) {
    let response = client
        .post(format!("{}{path}", tally.address))
        .json(&body)
        .send()
        .await
        .expect("request sent");
    assert_eq!(response.status(), 202, "POST {path} {body}");
}

async fn wait_for_values(direct: &Direct, expected: &[(&str, i64)], what: &str) {
    eventually(FLUSH_TIMEOUT, what, || async move {
        for (key, value) in expected {
            if direct.value(key).await != Some(*value) {
                return false;
            }
        }
        true
    })
    .await;
}

async fn a_poison_key_goes_to_dead_letters_and_the_rest_flushes(db: Option<&PgDatabase>) {
    let dir = data_dir();
    let config = TallyConfig::new(dir.path(), db, "journal", "100ms");
    let backend = config.backend();
    let mut tally = Tally::start(&config).await;
    let direct = Direct::open(dir.path(), db).await;
    let client = reqwest::Client::new();

    post(
        &client,
        &tally,
        "/increment",
        json!({"key": "poison", "value": HALF}),
    )
    .await;
    wait_for_values(
        &direct,
        &[("poison", HALF)],
        "the first half of the poison key flushed",
    )
    .await;

    // One request is added to one generation, so these three deltas share one batch.
    post(
        &client,
        &tally,
        "/increments",
        json!([
            {"key": "healthy-a", "value": 1},
            {"key": "poison", "value": HALF},
            {"key": "healthy-b", "value": 2},
        ]),
    )
    .await;
    wait_for_values(
        &direct,
        &[("healthy-a", 1), ("healthy-b", 2)],
        "the healthy keys of the poisoned batch flushed",
    )
    .await;
    assert_eq!(
        direct.value("poison").await,
        Some(HALF),
        "the overflowing delta must not reach the counter"
    );
    let dead = direct.dead_letters().await;
    assert_eq!(dead.len(), 1, "one dead letter: {dead:?}");
    assert_eq!(
        (dead[0].key.as_str(), dead[0].delta),
        ("poison", HALF),
        "the dead letter keeps the key and its delta"
    );
    assert!(
        !dead[0].reason.trim().is_empty(),
        "the dead letter says why"
    );
    assert_eq!(
        tally.metric("tally_dead_letters_total").await,
        1.0,
        "tally_dead_letters_total counts the dead letter"
    );

    // The flusher goes on: later deltas, the poison key's included, flush.
    post(
        &client,
        &tally,
        "/increment",
        json!({"key": "healthy-a", "value": 10}),
    )
    .await;
    post(
        &client,
        &tally,
        "/increment",
        json!({"key": "poison", "value": -1}),
    )
    .await;
    wait_for_values(
        &direct,
        &[("healthy-a", 11), ("poison", HALF - 1)],
        "increments after the poisoned batch flushed",
    )
    .await;

    let status = tally.terminate().await;
    assert!(
        status.success(),
        "clean exit after a poisoned batch, got {status}"
    );
    assert_eq!(
        direct.dead_letters().await.len(),
        1,
        "still exactly one dead letter"
    );
    shout(&format!(
        "poison {backend}: overflowing delta dead-lettered ({:?}); healthy keys of its batch and later batches flushed",
        dead[0].reason
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_poison_key_is_dead_lettered_while_its_batch_and_later_ones_flush() {
    a_poison_key_goes_to_dead_letters_and_the_rest_flushes(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_poison_key_is_dead_lettered_while_its_batch_and_later_ones_flush() {
    let Some(db) = PgDatabase::create("poison").await else {
        return;
    };
    a_poison_key_goes_to_dead_letters_and_the_rest_flushes(Some(&db)).await;
}

/// A journal generation whose acknowledged deltas for a key sum past 64 bits (the delta
/// that kept the running sum in range was added but never journaled: its group's fsync
/// failed, or the crash came first) must not stop the instance from starting: the key's
/// deltas go to `tally_dead_letters`, in pieces that add up to the sum, and the rest of the
/// generation is stored.
async fn a_journal_generation_past_64_bits_is_set_aside_at_replay(db: Option<&PgDatabase>) {
    let dir = data_dir();
    let config = TallyConfig::new(dir.path(), db, "journal", "1h");
    let backend = config.backend();
    {
        let (journal, _) = tally::journal::Journal::open(
            &dir.path().join("journal"),
            tally::journal::JournalOptions::default(),
        )
        .expect("open a journal");
        for entries in [[("big", i64::MAX), ("fine", 1)], [("big", 10), ("fine", 2)]] {
            journal.append(1, &entries).await.expect("append");
        }
    }
    let mut tally = Tally::start(&config).await;
    let direct = Direct::open(dir.path(), db).await;
    assert_eq!(
        direct.value("fine").await,
        Some(3),
        "the rest of the batch is stored"
    );
    assert_eq!(direct.value("big").await, None);
    let dead = direct.dead_letters().await;
    let mut pieces: Vec<i64> = dead.iter().map(|d| d.delta).collect();
    pieces.sort_unstable();
    assert_eq!(pieces, [10, i64::MAX], "{dead:?}");
    assert!(
        dead.iter()
            .all(|d| d.key == "big" && d.reason.contains("beyond 64 bits")),
        "{dead:?}"
    );
    assert_eq!(tally.metric("tally_dead_letters_total").await, 2.0);
    assert!(tally.terminate().await.success());
    shout(&format!(
        "poison {backend}: a journal generation summing past 64 bits for a key was set aside \
         at replay ({pieces:?}); the instance started"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_journal_generation_past_64_bits_is_set_aside_at_replay() {
    a_journal_generation_past_64_bits_is_set_aside_at_replay(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_journal_generation_past_64_bits_is_set_aside_at_replay() {
    let Some(db) = PgDatabase::create("replay_past_64_bits").await else {
        return;
    };
    a_journal_generation_past_64_bits_is_set_aside_at_replay(Some(&db)).await;
}
