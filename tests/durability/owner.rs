//! A journal's records are replayed only as the instance id, and under the claim, that
//! numbered them (`recovery.rs` in the library). Before, a restart after `kill -9` under
//! another `--instance-id` replayed the journal under that id's batch numbers (counting it
//! twice), and a data directory whose id had meanwhile been run from another data directory
//! replayed only the records numbered above that one's batches (dropping the others).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tally::config::Ack;
use tally::startup::App;
use tally::store::{Applied, Batch, Claim, Claimant, PgStore, Store, StoreError, Stored};
use tempfile::TempDir;

use crate::app::test_config;
use crate::common::{Backend, data_dir};
use crate::pg::{PgDatabase, shout};
use crate::replay::{hold_row, wait_for_lock};
use crate::support::{Direct, Tally, TallyConfig, increment};

/// Increments acknowledged (and left in the journal) before the `kill -9`.
const BEFORE: i64 = 3;
/// Lets whatever the flusher does right after start-up happen before the first increment
/// arrives, so that with a one-hour interval nothing is flushed before the kill.
const SETTLE: Duration = Duration::from_millis(200);

fn as_id(mut config: TallyConfig, id: &str) -> TallyConfig {
    config.extra = vec!["--instance-id".to_owned(), id.to_owned()];
    config
}

/// Acknowledges [`BEFORE`] increments of "k" under `config` (a one-hour flush interval:
/// they stay in the journal only), then kills the process.
async fn leave_in_journal(config: &TallyConfig, direct: &Direct) {
    let client = reqwest::Client::new();
    let mut tally = Tally::start(config).await;
    tokio::time::sleep(SETTLE).await;
    for _ in 0..BEFORE {
        assert_eq!(increment(&client, &tally.address, "k").await, 202);
    }
    assert_eq!(
        direct.value("k").await,
        None,
        "nothing flushed before the kill"
    );
    tally.kill9().await;
}

/// Starts `config` and expects it to refuse, saying `why`.
async fn expect_refusal(config: &TallyConfig, why: &[&str]) -> String {
    let mut tally = Tally::spawn(config);
    let status = tally.wait_exit(Duration::from_secs(30)).await;
    let log = tally.log();
    assert!(!status.success(), "it must not start: {status}\n{log}");
    for part in why {
        assert!(log.contains(part), "the refusal says {part:?}:\n{log}");
    }
    log
}

async fn a_journal_is_not_replayed_as_another_instance_id(db: Option<&PgDatabase>) {
    let dir = data_dir();
    let config = TallyConfig::new(dir.path(), db, "journal", "1h");
    let backend = config.backend();
    let direct = Direct::open(dir.path(), db).await;
    leave_in_journal(&as_id(config.clone(), "first"), &direct).await;

    expect_refusal(
        &as_id(config.clone(), "second"),
        &[
            r#"written as instance id "first""#,
            r#"this process runs as "second""#,
            "3 acknowledged requests",
        ],
    )
    .await;
    assert_eq!(
        direct.value("k").await,
        None,
        "the refused start wrote nothing"
    );

    // As the log says: start it as the id that wrote the journal, stop it cleanly, and the
    // id can change.
    let mut tally = Tally::start(&as_id(config.clone(), "first")).await;
    assert!(tally.terminate().await.success());
    assert_eq!(direct.value("k").await, Some(BEFORE));
    let mut tally = Tally::start(&as_id(config, "second")).await;
    assert!(tally.terminate().await.success());
    assert_eq!(direct.value("k").await, Some(BEFORE), "counted once");
    shout(&format!(
        "owner {backend}: a journal left by kill -9 was refused under another --instance-id, \
         and replayed once under its own"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_journal_is_not_replayed_as_another_instance_id() {
    a_journal_is_not_replayed_as_another_instance_id(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_journal_is_not_replayed_as_another_instance_id() {
    let Some(db) = PgDatabase::create("owner_other_id").await else {
        return;
    };
    a_journal_is_not_replayed_as_another_instance_id(Some(&db)).await;
}

/// The journal directory's records, without the zeros a segment is filled with ahead of
/// them (an open cuts those off the last one).
fn journal_records(data_dir: &Path) -> Vec<u8> {
    let mut names: Vec<_> = std::fs::read_dir(data_dir.join("journal"))
        .expect("journal directory")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    names.sort();
    names
        .iter()
        .flat_map(|p| {
            let mut bytes = std::fs::read(p).expect("read a segment");
            bytes.truncate(bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1));
            bytes
        })
        .collect()
}

/// Two data directories that run as the same id, "shared", on `db`: A with flush interval
/// `a_interval`, B with an hour.
fn shared_pair(
    db: &PgDatabase,
    a_interval: &'static str,
) -> ([TempDir; 2], TallyConfig, TallyConfig) {
    let dirs = [data_dir(), data_dir()];
    let a = TallyConfig::new(dirs[0].path(), Some(db), "journal", a_interval);
    let b = TallyConfig::new(dirs[1].path(), Some(db), "journal", "1h");
    (dirs, as_id(a, "shared"), as_id(b, "shared"))
}

/// Runs a tally on `config` that acknowledges `n` increments of `key`, and stops cleanly.
async fn run_and_stop(config: &TallyConfig, key: &str, n: i64) {
    let client = reqwest::Client::new();
    let mut tally = Tally::start(config).await;
    for _ in 0..n {
        assert_eq!(increment(&client, &tally.address, key).await, 202);
    }
    assert!(tally.terminate().await.success());
}

/// Data directory A, as id "shared", stores 2 increments of "k", acknowledges 3 of "late"
/// that stay in its journal only, and is killed. Data directory B then runs as "shared" and
/// stores 5 of "b", numbering its batch like A's unstored one. A's restart must store "late"
/// exactly once: the store's handover seq tells it that "k" is in and "late" is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_records_acknowledged_after_another_data_directory_took_the_id_are_stored_once() {
    let Some(db) = PgDatabase::create("owner_rebase").await else {
        return;
    };
    let ([dir_a, _dir_b], a, b) = shared_pair(&db, "1h");
    let direct = Direct::open(dir_a.path(), Some(&db)).await;
    let client = reqwest::Client::new();

    // A 2 s flush interval: "k" is flushed, and "late", sent right after, is not yet.
    let mut first = a.clone();
    first.flush_interval = "2s";
    let mut tally = Tally::start(&first).await;
    for _ in 0..2 {
        assert_eq!(increment(&client, &tally.address, "k").await, 202);
    }
    direct.wait_for("k", 2, Duration::from_secs(10)).await;
    for _ in 0..BEFORE {
        assert_eq!(increment(&client, &tally.address, "late").await, 202);
    }
    tally.kill9().await;
    assert_eq!(
        direct.value("late").await,
        None,
        "not flushed before the kill"
    );

    run_and_stop(&b, "b", 5).await;
    assert_eq!(direct.value("b").await, Some(5));

    let mut tally = Tally::start(&a).await;
    let log = tally.log();
    assert!(
        log.contains(
            "writing this journal's records that were not in the store then as one new batch"
        ),
        "{log}"
    );
    assert!(tally.terminate().await.success());
    let all = [("k", 2), ("late", BEFORE), ("b", 5)];
    for (key, value) in all {
        assert_eq!(direct.value(key).await, Some(value), "{key}");
    }
    // Neither directory counts anything again, and both still run as the id.
    run_and_stop(&a, "k", 0).await;
    run_and_stop(&b, "b", 1).await;
    run_and_stop(&a, "k", 1).await;
    for (key, value) in [("k", 3), ("late", BEFORE), ("b", 6)] {
        assert_eq!(direct.value(key).await, Some(value), "{key}");
    }
    shout(
        "owner postgres: increments a killed data directory acknowledged after its last batch \
         were stored once after another data directory had run as its id",
    );
}

/// A's journal holds only records already in the store (the active segment keeps them
/// after `kill -9`) when B takes the id: A's restart starts, and counts nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_journal_whose_records_are_all_stored_starts_after_another_took_the_id() {
    let Some(db) = PgDatabase::create("owner_all_stored").await else {
        return;
    };
    let ([dir_a, _dir_b], a, b) = shared_pair(&db, "100ms");
    let direct = Direct::open(dir_a.path(), Some(&db)).await;
    let client = reqwest::Client::new();
    let mut tally = Tally::start(&a).await;
    for _ in 0..BEFORE {
        assert_eq!(increment(&client, &tally.address, "k").await, 202);
    }
    direct.wait_for("k", BEFORE, Duration::from_secs(10)).await;
    tally.kill9().await;
    assert!(
        !journal_records(dir_a.path()).is_empty(),
        "A's journal holds its records"
    );

    run_and_stop(&b, "b", 5).await;
    run_and_stop(&a, "k", 1).await;
    assert_eq!(direct.value("k").await, Some(BEFORE + 1));
    assert_eq!(direct.value("b").await, Some(5));
    shout(
        "owner postgres: a journal holding only stored records started after another data \
         directory had run as its id, and counted nothing twice",
    );
}

/// The claim passed from A to B and on to C: which of A's records the store has can no
/// longer be told. A refuses to start, claims nothing (C still runs as the id) and keeps
/// its journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_journal_is_refused_when_the_id_passed_through_two_other_journals() {
    let Some(db) = PgDatabase::create("owner_refused").await else {
        return;
    };
    let dirs = [data_dir(), data_dir(), data_dir()];
    let [a, b, c] = dirs.each_ref().map(|d| {
        as_id(
            TallyConfig::new(d.path(), Some(&db), "journal", "1h"),
            "shared",
        )
    });
    let direct = Direct::open(dirs[0].path(), Some(&db)).await;
    leave_in_journal(&a, &direct).await;
    run_and_stop(&b, "b", 5).await;
    run_and_stop(&c, "c", 5).await;

    let held = journal_records(dirs[0].path());
    assert!(!held.is_empty(), "A's journal holds its records");
    expect_refusal(
        &a,
        &[
            r#"instance id "shared" was claimed by another tally"#,
            "3 acknowledged requests",
            "passed through more than one other journal",
            "move that journal directory aside",
        ],
    )
    .await;
    assert_eq!(direct.value("k").await, None, "nothing of A's replayed");
    assert!(
        journal_records(dirs[0].path()) == held,
        "A's journal kept as it was"
    );
    run_and_stop(&c, "c", 1).await;
    assert_eq!(direct.value("c").await, Some(6), "C still runs as the id");
    for (key, value) in [("b", 5), ("k", 0)] {
        assert_eq!(direct.value(key).await.unwrap_or(0), value, "{key}");
    }
    shout("owner postgres: a journal whose id passed through two other journals was refused");
}

/// A crash while the rebased batch is being written (it waits on a row the test holds):
/// the next start finishes it, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_crash_in_the_middle_of_a_rebase_stores_the_records_once() {
    let Some(db) = PgDatabase::create("owner_rebase_crash").await else {
        return;
    };
    let ([dir_a, _dir_b], a, b) = shared_pair(&db, "1h");
    let direct = Direct::open(dir_a.path(), Some(&db)).await;
    let monitor = crate::pg::client(&db.url).await;
    leave_in_journal(&a, &direct).await;
    run_and_stop(&b, "b", 5).await;

    let blocker = hold_row(&db, "k").await;
    let mut tally = Tally::spawn(&a);
    wait_for_lock(&monitor, "the rebased batch waits on the held row").await;
    tally.kill9().await;
    assert_eq!(direct.value("k").await, None, "not written before the kill");
    // The dead process's transaction was sent whole: it may still commit now, and the next
    // start must count it once either way.
    blocker.batch_execute("ROLLBACK").await.expect("release");

    run_and_stop(&a, "k", 0).await;
    assert_eq!(direct.value("k").await, Some(BEFORE));
    run_and_stop(&a, "k", 0).await;
    assert_eq!(direct.value("k").await, Some(BEFORE), "once");
    assert_eq!(direct.value("b").await, Some(5));
    shout(
        "owner postgres: a rebase killed while its batch was being written finished once at the next start",
    );
}

/// A real store whose `apply` commits and then never answers: the start that calls it stops
/// there, as a start killed right after that commit would.
struct CommitsThenHangs(Arc<dyn Store>);

#[async_trait]
impl Store for CommitsThenHangs {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    async fn claim(&self, instance_id: &str, by: Claimant<'_>) -> Result<Claim, StoreError> {
        self.0.claim(instance_id, by).await
    }

    async fn apply(&self, batch: Batch<'_>) -> Result<Applied, StoreError> {
        self.0.apply(batch).await?;
        std::future::pending().await
    }

    async fn probe(&self, entries: &[(&str, i64)]) -> Result<(), StoreError> {
        self.0.probe(entries).await
    }

    async fn read(&self, key: &str, instance_id: &str) -> Result<Stored, StoreError> {
        self.0.read(key, instance_id).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.0.ping().await
    }
}

/// A's rebased batch commits, and A dies before it can note that; B then takes the id
/// again. A's next start must see, from the handover seq, that the batch it numbered is in,
/// and write nothing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_rebase_committed_before_a_crash_is_not_written_again_after_the_id_moved_on() {
    let Some(db) = PgDatabase::create("owner_rebase_committed").await else {
        return;
    };
    let ([dir_a, _dir_b], a, b) = shared_pair(&db, "1h");
    let direct = Direct::open(dir_a.path(), Some(&db)).await;
    leave_in_journal(&a, &direct).await;
    run_and_stop(&b, "b", 5).await;

    let mut config = test_config(dir_a.path(), &Backend::Postgres(db.url.clone()));
    config.store.instance_id = Some("shared".to_owned());
    config.journal.ack = Ack::Journal;
    config.flush.interval = Duration::from_secs(3600);
    let inner = PgStore::connect(&db.url, 2).await.expect("connect");
    let store: Arc<dyn Store> = Arc::new(CommitsThenHangs(Arc::new(inner)));
    let start = App::build_with_store(config, store);
    assert!(
        tokio::time::timeout(Duration::from_secs(10), start)
            .await
            .is_err(),
        "the start stops after the commit"
    );
    assert_eq!(
        direct.value("k").await,
        Some(BEFORE),
        "the rebased batch is in"
    );

    run_and_stop(&b, "b", 1).await;
    run_and_stop(&a, "k", 0).await;
    assert_eq!(direct.value("k").await, Some(BEFORE), "written once");
    assert_eq!(direct.value("b").await, Some(6));
    shout(
        "owner postgres: a rebased batch committed just before a crash was not written again \
         after the id had moved on to another data directory",
    );
}

/// After A's last run, the id was claimed by something that records no journal (a tally
/// from before this check sharing the database, or an `UPDATE` by hand): which of A's
/// records are in can no longer be told, so A refuses to start, claiming nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_journal_is_refused_after_a_claim_that_records_no_journal() {
    let Some(db) = PgDatabase::create("owner_unrecorded").await else {
        return;
    };
    let dir = data_dir();
    let a = as_id(
        TallyConfig::new(dir.path(), Some(&db), "journal", "1h"),
        "shared",
    );
    let direct = Direct::open(dir.path(), Some(&db)).await;
    leave_in_journal(&a, &direct).await;
    let admin = crate::pg::client(&db.url).await;
    admin
        .batch_execute("UPDATE tally_instances SET epoch = epoch + 1")
        .await
        .expect("an older tally's claim");
    let before: i64 = admin
        .query_one("SELECT epoch FROM tally_instances", &[])
        .await
        .expect("epoch")
        .get(0);
    expect_refusal(
        &a,
        &[
            "does not record its journal",
            "did not record which journal made it",
            "3 acknowledged requests",
        ],
    )
    .await;
    let after: i64 = admin
        .query_one("SELECT epoch FROM tally_instances", &[])
        .await
        .expect("epoch")
        .get(0);
    assert_eq!(after, before, "the refused start claimed nothing");
    assert_eq!(direct.value("k").await, None);
    shout("owner postgres: a journal was refused after a claim that recorded no journal");
}

/// A journal from before owner records (no `owner.json`) with records in it, after another
/// data directory ran as its id under this version: which of its records are in can no
/// longer be told, so it is refused; while nobody has, it replays as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_journal_without_an_owner_is_refused_after_another_journal_claimed_its_id() {
    let Some(db) = PgDatabase::create("owner_legacy").await else {
        return;
    };
    let ([dir_a, _dir_b], a, b) = shared_pair(&db, "1h");
    let direct = Direct::open(dir_a.path(), Some(&db)).await;
    // What an older tally leaves: records, and no owner.json.
    let write_legacy = |key: &'static str| {
        let journal_dir = dir_a.path().join("journal");
        async move {
            let (journal, _) = tally::journal::Journal::open(
                &journal_dir,
                tally::journal::JournalOptions::default(),
            )
            .expect("open a journal");
            journal.append(1, &[(key, 1)]).await.expect("append");
            drop(journal);
            let _ = std::fs::remove_file(journal_dir.join("owner.json"));
        }
    };
    write_legacy("first").await;
    run_and_stop(&a, "k", 0).await;
    assert_eq!(direct.value("first").await, Some(1), "replayed as before");

    write_legacy("second").await;
    run_and_stop(&b, "b", 1).await;
    expect_refusal(
        &a,
        &["did not record its owner, and another journal has claimed the id since"],
    )
    .await;
    assert_eq!(direct.value("second").await, None);
    shout(
        "owner postgres: a journal without owner.json replayed while its id was unclaimed, and was refused after another journal claimed it",
    );
}
