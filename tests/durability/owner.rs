//! A journal's records are replayed only as the instance id, and under the claim, that
//! numbered them (`crate::recovery` in the library). Both cases below counted increments
//! twice or dropped them before: a restart after `kill -9` under another `--instance-id`
//! replayed the journal under that id's batch numbers, and a data directory whose id had
//! meanwhile been run from another data directory replayed only the records numbered above
//! that one's batches.

use std::time::Duration;

use crate::common::data_dir;
use crate::pg::{PgDatabase, shout};
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

/// Data directory A runs as id "shared" and is killed with increments in its journal; B,
/// another data directory, then runs as "shared" and stores increments of its own under the
/// batch numbers A's journal holds. A's restart must refuse: replaying would drop A's
/// records (or count some twice). Nothing of B's is touched; A's journal stays as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_journal_is_not_replayed_after_another_data_directory_ran_as_its_id() {
    let Some(db) = PgDatabase::create("owner_other_dir").await else {
        return;
    };
    let (dir_a, dir_b) = (data_dir(), data_dir());
    let config_a = as_id(
        TallyConfig::new(dir_a.path(), Some(&db), "journal", "1h"),
        "shared",
    );
    let config_b = as_id(
        TallyConfig::new(dir_b.path(), Some(&db), "journal", "1h"),
        "shared",
    );
    let direct = Direct::open(dir_a.path(), Some(&db)).await;
    leave_in_journal(&config_a, &direct).await;

    let client = reqwest::Client::new();
    let mut b = Tally::start(&config_b).await;
    for _ in 0..5 {
        assert_eq!(increment(&client, &b.address, "b").await, 202);
    }
    assert!(b.terminate().await.success());
    assert_eq!(direct.value("b").await, Some(5));

    let journal = dir_a.path().join("journal");
    // The records of every segment, without the zeros a segment is filled with ahead of
    // them (an open cuts those off the last one).
    let records = |dir: &std::path::Path| {
        let mut names: Vec<_> = std::fs::read_dir(dir)
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
            .collect::<Vec<u8>>()
    };
    let held = records(&journal);
    assert!(!held.is_empty(), "A's journal holds its records");
    expect_refusal(
        &config_a,
        &[
            r#"instance id "shared" was claimed by another tally"#,
            "3 acknowledged requests",
            "nothing was claimed",
        ],
    )
    .await;
    assert_eq!(direct.value("k").await, None, "nothing of A's replayed");
    assert_eq!(direct.value("b").await, Some(5), "B's increments untouched");
    assert!(records(&journal) == held, "A's journal kept as it was");

    // B can still run as the id: the refused start claimed nothing.
    let mut b = Tally::start(&config_b).await;
    assert_eq!(increment(&client, &b.address, "b").await, 202);
    assert!(b.terminate().await.success());
    assert_eq!(direct.value("b").await, Some(6));
    shout(
        "owner postgres: a journal whose instance id another data directory had run as since \
         was refused, claiming nothing and keeping the journal",
    );
}
