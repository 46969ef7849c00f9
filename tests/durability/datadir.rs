//! The data directory is tally's own: what it creates is private whatever the umask, and it
//! never follows a symbolic link planted there (another local user could otherwise read or
//! inject journal records, or have tally truncate or overwrite a file of theirs).

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::time::Duration;

use crate::common::data_dir;
use crate::support::{Tally, TallyConfig};

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_private_even_under_umask_000() {
    let parent = data_dir();
    let dir = parent.path().join("data");
    let mut config = TallyConfig::new(&dir, None, "journal", "100ms");
    config.wrapper = vec![
        "sh".to_owned(),
        "-c".to_owned(),
        r#"umask 000; exec "$0" "$@""#.to_owned(),
    ];
    let mut tally = Tally::start(&config).await;
    let status = reqwest::Client::new()
        .post(format!("{}/increment", tally.address))
        .json(&serde_json::json!({ "key": "k", "value": 1 }))
        .send()
        .await
        .map_or(0, |r| r.status().as_u16());
    assert_eq!(status, 202);
    let segment = std::fs::read_dir(dir.join("journal"))
        .expect("journal directory")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "log"))
        .expect("a journal segment");
    // (The data directory itself is made by the test harness, for the child's log.)
    for (path, want) in [
        (dir.join("journal"), 0o700),
        (segment, 0o600),
        (dir.join("journal/journal.lock"), 0o600),
        (dir.join("lock"), 0o600),
        (dir.join("instance-id"), 0o600),
        (dir.join("tally.db"), 0o600),
    ] {
        assert_eq!(mode(&path), want, "{} under umask 000", path.display());
    }
    assert!(tally.terminate().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlinked_journal_segment_is_refused_and_its_target_left_alone() {
    let dir = data_dir();
    let outside = data_dir();
    let target = outside.path().join("precious.txt");
    std::fs::write(&target, "not a journal").expect("write the outside file");
    std::fs::create_dir_all(dir.path().join("journal")).expect("journal dir");
    let link = dir.path().join("journal/journal-00000000000000000001.log");
    symlink(&target, &link).expect("plant the link");

    let config = TallyConfig::new(dir.path(), None, "journal", "100ms");
    let mut tally = Tally::spawn(&config);
    let status = tally.wait_exit(Duration::from_secs(30)).await;
    assert!(!status.success(), "tally must not start: {status}");
    let log = tally.log();
    assert!(
        log.contains("is a symbolic link") && log.contains("journal-00000000000000000001.log"),
        "the refusal names the entry:\n{log}"
    );
    assert_eq!(
        std::fs::read_to_string(&target).expect("the outside file"),
        "not a journal",
        "the link's target is neither read as a journal nor cut"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlinked_instance_id_temp_file_does_not_redirect_the_write() {
    let dir = data_dir();
    let outside = data_dir();
    let target = outside.path().join("precious.txt");
    std::fs::write(&target, "keep me").expect("write the outside file");
    symlink(&target, dir.path().join("instance-id.tmp")).expect("plant the link");

    let config = TallyConfig::new(dir.path(), None, "journal", "100ms");
    let mut tally = Tally::start(&config).await;
    assert!(tally.terminate().await.success());
    assert_eq!(
        std::fs::read_to_string(&target).expect("the outside file"),
        "keep me",
        "the link's target is not overwritten"
    );
    let id = std::fs::read_to_string(dir.path().join("instance-id")).expect("instance id");
    assert_eq!(id.trim().len(), 36, "a generated uuid: {id:?}");
    assert!(
        !std::fs::symlink_metadata(dir.path().join("instance-id"))
            .expect("instance id")
            .file_type()
            .is_symlink()
    );
}

/// A PostgreSQL password read from `--database-password-file` is used and never shown: the
/// start-up line names the file, not its content. (The test server trusts every local
/// connection, so what this shows is that tally starts with it and keeps it out of the log;
/// `password.rs` logs in to a server that asks for it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_file_is_read_and_never_logged() {
    let Some(db) = crate::pg::PgDatabase::create("password_file").await else {
        return;
    };
    let dir = data_dir();
    let secrets = data_dir();
    let file = secrets.path().join("pgpass");
    std::fs::write(&file, "s3cret-from-a-file\n").expect("write the password file");
    let mut config = TallyConfig::new(dir.path(), Some(&db), "journal", "100ms");
    config.extra = vec![
        "--database-password-file".to_owned(),
        file.display().to_string(),
    ];
    let mut tally = Tally::start(&config).await;
    assert!(tally.terminate().await.success());
    let log = tally.log();
    assert!(log.contains("database-password-file="), "{log}");
    assert!(
        !log.contains("s3cret-from-a-file"),
        "the password is in the log:\n{log}"
    );
}
