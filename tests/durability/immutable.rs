//! A journal segment that cannot be deleted when tally starts: marked immutable with
//! `chattr +i`, which only root can do, so the test runs as root (and skips loudly
//! otherwise; `TALLY_REQUIRE_DISK_STALL=1`, which `.ci/run` sets as root for the tests that
//! need root, makes that a failure). Replay reads it, the store gets its records, and the
//! trim after replay cannot delete it: tally must start anyway, count the segment in
//! `tally_journal_bytes` and the failure in `tally_journal_trim_failures_total`, and delete
//! it once it can, on the flusher's next tick even with no traffic. (Before, the failed trim
//! aborted the start.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::data_dir;
use crate::journal::{journal_files_bytes, journal_segments};
use crate::pg::shout;
use crate::support::{
    Tally, TallyConfig, assert_batches_stored_once, eventually, increment, send_batches,
};

/// `chattr` on `file`, or why not.
fn chattr(flag: &str, file: &Path) -> Result<(), String> {
    let out = std::process::Command::new("chattr")
        .args([flag, &file.to_string_lossy()])
        .output()
        .map_err(|e| format!("cannot run chattr: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// Takes the immutable flag off again on drop, so that the temporary directory can go.
struct Immutable(PathBuf);

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = chattr("-i", &self.0);
    }
}

/// Marks `file` immutable, or says loudly why not (a panic with `TALLY_REQUIRE_DISK_STALL=1`).
fn immutable(file: &Path) -> Option<Immutable> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let why = if unsafe { libc::geteuid() } != 0 {
        "not running as root (chattr +i needs it)".to_owned()
    } else {
        match chattr("+i", file) {
            Ok(()) => return Some(Immutable(file.to_owned())),
            Err(why) => why,
        }
    };
    if std::env::var("TALLY_REQUIRE_DISK_STALL").is_ok_and(|v| v == "1") {
        panic!("TALLY_REQUIRE_DISK_STALL=1, but no file can be made immutable here: {why}");
    }
    shout(&format!(
        "SKIPPED immutable segment test: {why}. Run the tests as root."
    ));
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tally_starts_with_a_journal_segment_it_cannot_delete_and_deletes_it_once_it_can() {
    let dir = data_dir();
    // No flush during the first run (60 s), so every segment is still there at the crash.
    let mut config = TallyConfig::new(dir.path(), None, "journal", "60s");
    config.extra = vec!["--journal-segment-bytes".to_owned(), "1048576".to_owned()];
    let mut tally = Tally::start(&config).await;
    let client = reqwest::Client::new();
    send_batches(&client, &tally.address).await;
    tally.kill9().await;
    let mut segments = journal_segments(dir.path());
    segments.sort();
    assert!(segments.len() > 1, "the batches closed a segment");
    let oldest = dir.path().join("journal").join(&segments[0]);
    let oldest_bytes = std::fs::metadata(&oldest)
        .expect("the oldest segment")
        .len();
    let Some(guard) = immutable(&oldest) else {
        return;
    };

    config.flush_interval = "200ms";
    let tally = Tally::start(&config).await;
    let address = tally.address.clone();
    assert!(
        tally.metric("tally_journal_trim_failures_total").await >= 1.0,
        "the trim after replay failed"
    );
    assert_eq!(tally.metric("tally_journal_trim_failing").await, 1.0);
    let counted = tally.metric("tally_journal_bytes").await as u64;
    assert!(
        counted >= oldest_bytes && oldest.exists(),
        "the segment stays, and counts: {counted} bytes against its {oldest_bytes}"
    );

    // Mended while no increments come: the flusher's tick retries the deletion.
    drop(guard);
    let (tally_ref, data, name) = (&tally, dir.path(), &segments[0]);
    eventually(
        Duration::from_secs(10),
        "the segment is deleted with no traffic, and the gauge follows",
        || async move {
            !journal_segments(data).contains(name)
                && tally_ref.metric("tally_journal_bytes").await as u64 == journal_files_bytes(data)
        },
    )
    .await;
    assert_eq!(tally.metric("tally_journal_trim_failing").await, 0.0);
    assert_eq!(increment(&client, &address, "after").await, 202);
    let mut tally = tally;
    let status = tally.terminate().await;
    assert!(status.success(), "SIGTERM drains and exits 0: {status}");
    let log = tally.log();
    assert!(
        log.contains("Cannot delete journal segments the store has every record of"),
        "the failure is logged"
    );
    assert!(
        log.contains("Deleted the journal segments that could not be deleted before"),
        "the recovery is logged"
    );
    assert_batches_stored_once(dir.path(), None, 1).await;
    shout(&format!(
        "immutable journal segment at start: tally started, counted its {oldest_bytes} bytes, \
         deleted it on the next tick once it could, with no traffic"
    ));
}
