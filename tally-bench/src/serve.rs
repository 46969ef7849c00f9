//! The two baselines, each run by tally-bench as its own process.
//!
//! - `noop`: the HTTP stack tally uses (axum 0.8 on hyper 1 and tokio, served by tally's own
//!   accept loop `tally::http::serve` with tally's default connection options: header-read
//!   deadline, connection cap), a route that reads the body and answers 202. The ceiling: no
//!   server on this stack does less.
//! - `noop-axum`: the same route served by plain `axum::serve` (no header deadline), to show
//!   what tally's hardened accept loop costs.
//! - `noop-axum-deferred`: `noop-axum` whose every reply waits until a thread of its own
//!   releases it, in groups, as `ack=journal` holds each reply until its group's fsync; no
//!   disk, no parsing, nothing else of tally's. What a reply that another thread releases
//!   costs on axum's multi-thread runtime (tally serves on one runtime per core instead,
//!   `tally::http::threads`): the reference to read `ack=journal` against (see [`Gate`]).
//! - `sync`: the naive design done as well as it can be: parse the JSON body like tally,
//!   then one `INSERT .. ON CONFLICT DO UPDATE SET value = value + $2` per request through a
//!   deadpool-postgres pool with a prepared statement, 202 after the commit.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::task::{Poll, Waker};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use deadpool_postgres::Pool;
use tokio::net::TcpListener;

const SYNC_UPSERT: &str = "INSERT INTO counters (key, value) VALUES ($1, $2) \
     ON CONFLICT (key) DO UPDATE SET value = counters.value + EXCLUDED.value";

async fn healthz() -> &'static str {
    "ok"
}

async fn serve(listen: SocketAddr, app: Router) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("server failed")
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Replies held until a thread of their own releases them, group by group: the shape of
/// tally's journal (`tally::journal`: a waker left under one lock, a thread woken only while
/// it sleeps, a group taken whole and its waiters woken once it is released) without the
/// record, the file or the fsync. `hold` stands in for the fsync's time: the thread sleeps
/// that long (no CPU) with the group taken, so that the next one gathers meanwhile. The thread
/// runs under `SCHED_BATCH`, as the journal writer does.
struct Gate {
    queue: Mutex<GateQueue>,
    wake: Condvar,
    /// Groups `0..released` have been released.
    released: AtomicU64,
    hold: Duration,
}

#[derive(Default)]
struct GateQueue {
    wakers: Vec<Waker>,
    /// The group the waiters queued now belong to.
    group: u64,
    /// The thread waits on `wake`: the next waiter notifies it.
    idle: bool,
}

impl Gate {
    fn start(hold: Duration) -> anyhow::Result<Arc<Self>> {
        let gate = Arc::new(Self {
            queue: Mutex::default(),
            wake: Condvar::new(),
            released: AtomicU64::new(0),
            hold,
        });
        let releaser = Arc::clone(&gate);
        std::thread::Builder::new()
            .name("noop-gate".into())
            .spawn(move || {
                // The journal writer's policy, so that the two differ only in their work.
                tally::sched::yield_to_requests();
                releaser.run();
            })
            .context("cannot start the gate thread")?;
        Ok(gate)
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, GateQueue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The releasing thread: takes each group whole, holds it, releases it.
    fn run(&self) {
        loop {
            let mut queue = self.queue();
            while queue.wakers.is_empty() {
                queue.idle = true;
                queue = self
                    .wake
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            let wakers = std::mem::take(&mut queue.wakers);
            let group = queue.group;
            queue.group += 1;
            drop(queue);
            if !self.hold.is_zero() {
                std::thread::sleep(self.hold);
            }
            self.released.store(group + 1, Ordering::Release);
            wakers.into_iter().for_each(Waker::wake);
        }
    }

    /// Waits until the group this call joins is released.
    async fn pass(&self) {
        let mut joined: Option<u64> = None;
        poll_fn(|cx| {
            if joined.is_some_and(|g| self.released.load(Ordering::Acquire) > g) {
                return Poll::Ready(());
            }
            let mut queue = self.queue();
            queue.wakers.push(cx.waker().clone());
            joined = Some(queue.group);
            if std::mem::take(&mut queue.idle) {
                drop(queue);
                self.wake.notify_one();
            }
            Poll::Pending
        })
        .await;
    }
}

/// `tally-bench serve-noop`: on tally's accept loop, or on `axum::serve` with `plain_axum`;
/// with `defer`, every reply waits for a [`Gate`] holding each group that long.
pub async fn noop(
    listen: SocketAddr,
    plain_axum: bool,
    defer: Option<Duration>,
) -> anyhow::Result<()> {
    async fn accept(_body: Bytes) -> StatusCode {
        StatusCode::ACCEPTED
    }
    async fn accept_deferred(State(gate): State<Arc<Gate>>, _body: Bytes) -> StatusCode {
        gate.pass().await;
        StatusCode::ACCEPTED
    }
    let app = match defer {
        None => Router::new()
            .route("/increment", post(accept))
            .route("/increments", post(accept)),
        Some(hold) => Router::new()
            .route("/increment", post(accept_deferred))
            .route("/increments", post(accept_deferred))
            .with_state(Gate::start(hold)?),
    }
    .route("/healthz", get(healthz));
    if plain_axum {
        return serve(listen, app).await;
    }
    let defaults = tally::config::Config::defaults();
    let options = tally::http::serve::ServeOptions {
        header_read_timeout: defaults.http.header_read_timeout,
        idle_timeout: defaults.http.idle_timeout,
        max_header_bytes: defaults.limits.max_header_bytes,
        draining: tokio_util::sync::CancellationToken::new(),
        max_connections: defaults.http.max_connections.get(),
        connect_info: false,
        // Connections on serving threads of their own, as in tally.
        threads: Some(std::sync::Arc::new(
            tally::http::threads::ServingThreads::start(
                tally::http::threads::per_cpu(),
                &tally::idle::IdleWorkers::new(),
            )
            .context("cannot start the serving threads")?,
        )),
    };
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tally::http::serve::serve(listener, app, options, stop.clone());
    tokio::pin!(server);
    tokio::select! {
        () = &mut server => {}
        () = shutdown_signal() => {
            stop.cancel();
            server.await;
        }
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct Wire {
    key: String,
    value: i64,
}

/// `tally-bench serve-sync`.
pub async fn sync(listen: SocketAddr, url: &str, pool_size: usize) -> anyhow::Result<()> {
    // tally's own store opens the pool and creates tally's schema, so the correctness check
    // reads both alike; the baseline then bypasses everything else of tally's.
    let pool = tally::store::PgStore::connect(url, pool_size)
        .await
        .context("cannot connect to PostgreSQL")?
        .pool()
        .clone();
    async fn increment(State(pool): State<Arc<Pool>>, body: Bytes) -> StatusCode {
        let Ok(wire) = serde_json::from_slice::<Wire>(&body) else {
            return StatusCode::BAD_REQUEST;
        };
        if wire.key.is_empty() {
            return StatusCode::UNPROCESSABLE_ENTITY;
        }
        let Ok(client) = pool.get().await else {
            return StatusCode::SERVICE_UNAVAILABLE;
        };
        let Ok(statement) = client.prepare_cached(SYNC_UPSERT).await else {
            return StatusCode::SERVICE_UNAVAILABLE;
        };
        match client.execute(&statement, &[&wire.key, &wire.value]).await {
            Ok(_) => StatusCode::ACCEPTED,
            Err(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
    let app = Router::new()
        .route("/increment", post(increment))
        .route("/healthz", get(healthz))
        .with_state(Arc::new(pool));
    serve(listen, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deferred_reply_is_released_with_its_group_and_not_before_the_hold() {
        let hold = Duration::from_millis(50);
        let gate = Gate::start(hold).expect("the gate thread starts");
        let started = std::time::Instant::now();
        let waiters: Vec<_> = (0..200)
            .map(|_| {
                let gate = Arc::clone(&gate);
                tokio::spawn(async move {
                    gate.pass().await;
                    started.elapsed()
                })
            })
            .collect();
        for waiter in waiters {
            let waited = tokio::time::timeout(Duration::from_secs(10), waiter)
                .await
                .expect("every waiter is released")
                .expect("no waiter panics");
            assert!(waited >= hold, "released after {waited:?}, within the hold");
        }
        // All 200 queue within the first group's hold, so they leave in a few groups, not
        // one by one.
        let groups = gate.released.load(Ordering::Acquire);
        assert!(groups <= 20, "200 waiters released in {groups} groups");
    }
}
