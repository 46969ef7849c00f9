//! A journal that cannot write (a full disk) under `ack=journal`: no increment is counted
//! that was not answered 202 (or, for the group whose write failed, "unknown outcome"),
//! every other one is refused with `503 journal_unavailable` and `Retry-After`, `/readyz`
//! says why, one log line marks each change of state, and tally takes increments again by
//! itself once the disk has room, without a restart.
//!
//! The full disk is a real one as far as tally can tell: the child runs under a file-size
//! limit (`prlimit --fsize`, a soft `RLIMIT_FSIZE`), so the kernel fails the journal's
//! write with `EFBIG` once its segment reaches the limit, and raising the limit from outside
//! (`prlimit --pid`) is the operator freeing space. No root, no special filesystem.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::data_dir;
use crate::pg::{PgDatabase, shout};
use crate::support::{Direct, Tally, TallyConfig, assert_logged_once, readyz};

/// The journal's "disk": the file-size limit of the child, in bytes. Below the 1 MiB that
/// tally's recovery probe writes, so it cannot recover before the limit is raised.
const DISK_BYTES: u64 = 256 * 1024;
/// Increments per request (one JSON-array request, one journal record of ~2.5 KiB).
const ITEMS: usize = 100;
/// Requests sent before giving up on filling the disk.
const MAX_REQUESTS: usize = 1_000;
/// Requests answered 202 after the recovery.
const AFTER: usize = 20;

/// What became of one request of [`ITEMS`] distinct keys, each incremented by one.
struct Sent {
    keys: Vec<String>,
    status: u16,
    code: String,
    retry_after: bool,
}

async fn send(client: &reqwest::Client, address: &str, n: usize) -> Sent {
    let keys: Vec<String> = (0..ITEMS).map(|i| format!("r{n:04}-k{i:03}")).collect();
    let body: Vec<_> = keys
        .iter()
        .map(|k| json!({ "key": k, "value": 1 }))
        .collect();
    let response = client
        .post(format!("{address}/increments"))
        .json(&body)
        .send()
        .await
        .expect("an answer");
    let status = response.status().as_u16();
    let retry_after = response.headers().contains_key("retry-after");
    let text = response.text().await.unwrap_or_default();
    let code = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_default();
    Sent {
        keys,
        status,
        code,
        retry_after,
    }
}

fn prlimit(args: &[&str]) {
    let status = std::process::Command::new("prlimit")
        .args(args)
        .status()
        .expect("run prlimit (util-linux)");
    assert!(status.success(), "prlimit {args:?} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_increments_without_counting_them_and_recovers_without_a_restart() {
    let Some(db) = PgDatabase::create("disk_full").await else {
        return;
    };
    let dir = data_dir();
    let mut config = TallyConfig::new(dir.path(), Some(&db), "journal", "100ms");
    config.wrapper = vec![
        "prlimit".to_owned(),
        format!("--fsize={DISK_BYTES}:unlimited"),
        "--".to_owned(),
    ];
    let client = reqwest::Client::new();
    let mut tally = Tally::start(&config).await;

    let mut sent: Vec<Sent> = Vec::new();
    while sent.len() < MAX_REQUESTS && !sent.iter().any(|s| s.code == "journal_unavailable") {
        sent.push(send(&client, &tally.address, sent.len()).await);
    }
    let full = sent.iter().filter(|s| s.status != 202).count();
    assert!(full > 0, "the journal never filled {DISK_BYTES} bytes");
    let refused = sent.last().expect("requests were sent");
    assert_eq!(refused.status, 503);
    assert!(
        refused.retry_after,
        "journal_unavailable carries Retry-After"
    );
    for s in sent.iter().filter(|s| s.status != 202) {
        assert!(
            s.code == "unknown_outcome" || s.code == "journal_unavailable",
            "a failed journal answers unknown_outcome or journal_unavailable, not {} {}",
            s.status,
            s.code
        );
        assert_eq!(s.retry_after, s.code == "journal_unavailable", "{}", s.code);
    }
    let (status, ready) = readyz(&client, &tally.address).await;
    assert_eq!(status, 503);
    assert!(
        ready.contains("journal cannot write"),
        "/readyz says why: {ready}"
    );
    assert_eq!(tally.metric("tally_journal_failed").await, 1.0);
    // More requests while the disk stays full, over several of tally's recovery attempts
    // (one a second): refused, never counted; the journal does not flap.
    let full_since = Instant::now();
    while full_since.elapsed() < Duration::from_millis(2_500) {
        let s = send(&client, &tally.address, sent.len()).await;
        assert_eq!((s.status, s.code.as_str()), (503, "journal_unavailable"));
        sent.push(s);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The operator frees space.
    prlimit(&["--pid", &tally.pid().to_string(), "--fsize=unlimited"]);
    let freed = Instant::now();
    loop {
        let s = send(&client, &tally.address, sent.len()).await;
        let ok = s.status == 202;
        sent.push(s);
        if ok {
            break;
        }
        assert!(
            freed.elapsed() < Duration::from_secs(15),
            "no increment taken within 15 s of the disk having room"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovered_after = freed.elapsed();
    for _ in 0..AFTER {
        let s = send(&client, &tally.address, sent.len()).await;
        assert_eq!(s.status, 202, "{}", s.code);
        sent.push(s);
    }
    assert_eq!(readyz(&client, &tally.address).await.0, 200, "ready again");
    assert_eq!(tally.metric("tally_journal_failed").await, 0.0);
    let status = tally.terminate().await;
    assert!(
        status.success(),
        "SIGTERM drains and exits 0 after a recovery: {status}"
    );

    let log = tally.log();
    assert_logged_once(&log, "Journal write failed", "when the journal fails");
    assert_logged_once(&log, "Journal can write again", "when it recovers");

    let counters: HashMap<String, i64> = Direct::open(dir.path(), Some(&db)).await.counters().await;
    let mut by_code: HashMap<String, usize> = HashMap::new();
    for s in &sent {
        *by_code
            .entry(format!("{} {}", s.status, s.code))
            .or_default() += 1;
        let stored: Vec<Option<i64>> = s.keys.iter().map(|k| counters.get(k).copied()).collect();
        match (s.status, s.code.as_str()) {
            (202, _) => assert!(stored.iter().all(|v| *v == Some(1)), "acknowledged: stored"),
            (_, "unknown_outcome") => assert!(
                stored.iter().all(|v| *v == Some(1)) || stored.iter().all(Option::is_none),
                "unknown outcome: all or nothing, never twice"
            ),
            _ => assert!(stored.iter().all(Option::is_none), "refused: never counted"),
        }
    }
    assert_eq!(
        counters.len(),
        sent.iter()
            .filter(|s| s.keys.iter().any(|k| counters.contains_key(k)))
            .count()
            * ITEMS,
        "no key nobody sent"
    );
    shout(&format!(
        "disk full ack=journal postgres: journal failed at its {DISK_BYTES}-byte limit; answers {by_code:?}; \
         refused requests never counted; taking increments again {recovered_after:.1?} after the limit was \
         raised, without a restart"
    ));
}
