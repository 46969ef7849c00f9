//! The two baselines, each run by tally-bench as its own process.
//!
//! - `noop`: the HTTP stack tally uses (axum 0.8 on hyper 1 and tokio, served by tally's own
//!   accept loop `tally::http::serve` with tally's default connection options: header-read
//!   deadline, connection cap), a route that reads the body and answers 202. The ceiling: no
//!   server on this stack does less.
//! - `noop-axum`: the same route served by plain `axum::serve` (no header deadline), to show
//!   what tally's hardened accept loop costs.
//! - `sync`: the naive design done as well as it can be: parse the JSON body like tally,
//!   then one `INSERT .. ON CONFLICT DO UPDATE SET value = value + $2` per request through a
//!   deadpool-postgres pool with a prepared statement, 202 after the commit.

use std::net::SocketAddr;
use std::sync::Arc;

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

/// `tally-bench serve-noop`: on tally's accept loop, or on `axum::serve` with `plain_axum`.
pub async fn noop(listen: SocketAddr, plain_axum: bool) -> anyhow::Result<()> {
    async fn accept(_body: Bytes) -> StatusCode {
        StatusCode::ACCEPTED
    }
    let app = Router::new()
        .route("/increment", post(accept))
        .route("/increments", post(accept))
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
