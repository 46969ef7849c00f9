//! Memory under hostile connections (issue 11), on the real binary so that its resident set
//! is tally's alone. Bounds are asserted as ratios of the configured limits, not as sizes
//! of this machine: what matters is that the limits hold, and that memory comes back.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::common::data_dir;
use crate::support::{Tally, TallyConfig};

const MIB: u64 = 1024 * 1024;
const MAX_HEADER_BYTES: u64 = 32 * 1024;
const BODY_MEMORY: u64 = 64 * MIB;

fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// Opens `n` connections that each send `bytes`, as far as the server takes them (it may
/// answer and close first), and keeps them open; returns them and the RSS growth of `pid`
/// over `idle` half a second later.
async fn hold(address: &str, bytes: &[u8], n: u64, pid: u32, idle: u64) -> (Vec<TcpStream>, u64) {
    let mut open = Vec::new();
    for _ in 0..n {
        let Ok(mut stream) = TcpStream::connect(address.trim_start_matches("http://")).await else {
            continue;
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(bytes)).await;
        open.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    (open, rss(pid).saturating_sub(idle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_connections_hold_bounded_memory_and_give_it_back() {
    let dir = data_dir();
    let mut config = TallyConfig::new(dir.path(), None, "memory", "1s");
    config.extra = vec![
        "--max-body-memory".to_owned(),
        BODY_MEMORY.to_string(),
        "--max-header-bytes".to_owned(),
        MAX_HEADER_BYTES.to_string(),
    ];
    let tally = Tally::start(&config).await;
    let client = reqwest::Client::new();
    // Small requests from 8 concurrent clients, so that every worker thread allocates.
    let small_requests = |n: usize| {
        let (client, url) = (client.clone(), format!("{}/healthz", tally.address));
        async move {
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..8 {
                let (client, url) = (client.clone(), url.clone());
                set.spawn(async move {
                    for _ in 0..n / 8 {
                        let _ = client.get(&url).send().await;
                    }
                });
            }
            while set.join_next().await.is_some() {}
        }
    };
    small_requests(200).await;
    let idle = rss(tally.pid());

    // 300 connections each sending a 390 KiB request head that never ends: without the
    // header limit each would be buffered whole (hyper's default allows ~400 KiB).
    const HEADS: u64 = 300;
    let mut head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
    head.resize(390 * 1024, b'a');
    let (open, heads_peak) = hold(&tally.address, &head, HEADS, tally.pid(), idle).await;
    // The flag's documented bound: at most about twice the limit per connection.
    assert!(
        heads_peak < HEADS * 2 * MAX_HEADER_BYTES,
        "{HEADS} oversized heads grew RSS by {} MiB, over {HEADS} × 2 × --max-header-bytes",
        heads_peak / MIB
    );
    drop(open);

    // 100 uploads of 4 MiB − 1 that never complete: without the body budget they would hold
    // 400 MiB until --request-timeout; with it, the budget and no more.
    const BODIES: u64 = 100;
    let body_len = 4 * MIB;
    let mut upload = format!(
        "POST /increments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {body_len}\r\n\r\n["
    )
    .into_bytes();
    upload.resize(upload.len() + body_len as usize - 2, b' ');
    let (open, bodies_peak) = hold(&tally.address, &upload, BODIES, tally.pid(), idle).await;
    assert!(
        bodies_peak < 3 * BODY_MEMORY,
        "{BODIES} stalled 4 MiB uploads grew RSS by {} MiB, over 3 × --max-body-memory \
         ({} MiB); without the budget they hold {} MiB",
        bodies_peak / MIB,
        BODY_MEMORY / MIB,
        BODIES * body_len / MIB
    );
    drop(open);

    // Memory comes back once the process allocates again (as under any traffic).
    // Up to five rounds of traffic: mimalloc frees a thread's pages when that thread
    // allocates again; glibc never gave them back in any number of rounds.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let peak = heads_peak.max(bodies_peak);
    let mut after = u64::MAX;
    for _ in 0..5 {
        small_requests(2000).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        after = rss(tally.pid()).saturating_sub(idle);
        if after * 2 < peak {
            break;
        }
    }
    assert!(
        after * 2 < peak,
        "RSS stayed {} MiB above idle after the connections closed (peak {} MiB): the \
         allocator keeps what a burst took",
        after / MIB,
        peak / MIB
    );
    eprintln!(
        "\n*** hostile memory: {HEADS} oversized heads +{} MiB (bound {} MiB), {BODIES} stalled \
         4 MiB uploads +{} MiB (budget {} MiB), {} MiB above idle after they closed\n",
        heads_peak / MIB,
        HEADS * 2 * MAX_HEADER_BYTES / MIB,
        bodies_peak / MIB,
        BODY_MEMORY / MIB,
        after / MIB
    );
}
