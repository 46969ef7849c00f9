//! Few file descriptors: tally started under a low open-file limit (`prlimit --nofile`, as
//! a shell's `ulimit -n 1024` or systemd's default `LimitNOFILE=1024:524288` would), with
//! more clients connecting than that limit allows. Connections, journal segments and the
//! store's files share the limit; before tally capped connections by it, the clients took
//! the last descriptors: `accept` failed (new clients waited unanswered) and the journal
//! could not create its next segment.

use std::time::Duration;

use crate::common::data_dir;
use crate::journal::journal_segments;
use crate::metrics::{metric, scrape};
use crate::pg::shout;
use crate::support::{Tally, TallyConfig, assert_batches_stored_once, increment, send_batches};

/// The limit tally runs under, soft and hard, so that it cannot raise it.
const LIMIT: u64 = 160;
/// Descriptors a running tally holds besides its clients' (30–38 counted).
const HELD_BY_TALLY: u64 = 30;
/// Clients that each open a connection and keep it: more than the limit allows.
const CLIENTS: usize = 200;

fn prlimit(soft: u64, hard: u64) -> Vec<String> {
    vec![
        "prlimit".to_owned(),
        format!("--nofile={soft}:{hard}"),
        "--".to_owned(),
    ]
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_low_open_file_limit_connections_are_capped_and_the_journal_keeps_its_files() {
    let dir = data_dir();
    let mut config = TallyConfig::new(dir.path(), None, "journal", "100ms");
    config.wrapper = prlimit(LIMIT, LIMIT);
    // Small segments, so that the batches below need a new one.
    config.extra = vec!["--journal-segment-bytes".to_owned(), "1048576".to_owned()];
    let mut tally = Tally::start(&config).await;
    let cap = tally.metric("tally_http_connections_max").await as u64;
    assert!(
        (16..=LIMIT - HELD_BY_TALLY).contains(&cap),
        "the cap ({cap}) leaves tally's own descriptors out of the limit's {LIMIT}"
    );

    // Each client keeps its connection open (kept alive in its pool) after its increment.
    let mut clients = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        let client = client();
        assert_eq!(
            increment(&client, &tally.address, &format!("held-{i:03}")).await,
            202,
            "client {i} of {CLIENTS} is answered, beyond the limit's {LIMIT} descriptors"
        );
        clients.push(client);
    }
    let open: f64 = scrape(&client(), &tally.address)
        .await
        .lines()
        .filter(|line| line.starts_with("tally_http_connections_open{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        open > 0.0 && open <= cap as f64,
        "{open} connections open, at most the cap {cap}"
    );
    assert!(
        tally.metric("tally_http_connections_yielded_total").await >= (CLIENTS as u64 - cap) as f64,
        "the longest-idle connections made room for the clients beyond the cap"
    );

    // The journal still gets the descriptors for its next segments.
    let segments_before = journal_segments(dir.path());
    send_batches(&client(), &tally.address).await;
    let segments_after = journal_segments(dir.path());
    assert!(
        segments_after.iter().any(|s| !segments_before.contains(s)),
        "the batches started a new segment: {segments_before:?} -> {segments_after:?}"
    );
    let exposition = scrape(&client(), &tally.address).await;
    assert!(
        exposition.contains("\ntally_http_accept_failures_total 0\n"),
        "accept never ran out of descriptors"
    );
    assert_eq!(metric(&exposition, "process_max_fds"), LIMIT as f64);
    let open_fds = metric(&exposition, "process_open_fds");
    assert!(
        open_fds > cap as f64 / 2.0 && open_fds < LIMIT as f64,
        "{open_fds} descriptors open under the limit of {LIMIT}"
    );

    let status = tally.terminate().await;
    assert!(status.success(), "SIGTERM drains and exits 0: {status}");
    let log = tally.log();
    assert!(
        log.contains("capping them there"),
        "the cap is logged at start"
    );
    assert_batches_stored_once(dir.path(), None, CLIENTS).await;
    drop(clients);
    shout(&format!(
        "open-file limit {LIMIT}: {CLIENTS} clients served at a cap of {cap} connections, \
         the journal kept rotating"
    ));
}

/// The `Max open files` soft and hard limits of process `pid`.
fn open_file_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("/proc limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let mut numbers = line
        .split_whitespace()
        .filter_map(|word| word.parse::<u64>().ok());
    let soft = numbers.next().expect("the soft limit");
    let hard = numbers.next().expect("the hard limit");
    (soft, hard)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tally_raises_its_soft_open_file_limit_to_the_hard_one() {
    // At most this process's own hard limit, which prlimit cannot exceed unprivileged.
    let hard = open_file_limits(std::process::id()).1.min(4096);
    let dir = data_dir();
    let mut config = TallyConfig::new(dir.path(), None, "journal", "100ms");
    config.wrapper = prlimit(LIMIT, hard);
    let mut tally = Tally::start(&config).await;
    assert_eq!(open_file_limits(tally.pid()), (hard, hard));
    assert_eq!(tally.metric("process_max_fds").await, hard as f64);
    // Capped by the raised limit, not by the 160 it was started with.
    let cap = tally.metric("tally_http_connections_max").await as u64;
    assert!(
        cap > LIMIT && cap <= hard - HELD_BY_TALLY,
        "cap {cap} under the raised limit {hard}"
    );
    assert_eq!(increment(&client(), &tally.address, "raised").await, 202);
    let status = tally.terminate().await;
    assert!(status.success(), "SIGTERM drains and exits 0: {status}");
    assert!(
        tally.log().contains("Raised the open-file limit"),
        "the raise is logged"
    );
}
