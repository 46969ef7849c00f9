//! The HTTP/1.1 server: an accept loop over hyper, with a cap on connections and a deadline
//! for request headers.
//!
//! Why not `axum::serve`: it builds hyper's connection without a timer, so hyper's
//! `header_read_timeout` never fires, and it offers no hook to set one. A client that opens
//! a connection and sends a header byte every few seconds (slow loris) would hold it
//! forever. This loop is axum::serve's, plus:
//!
//! - **Header deadline** (`--header-read-timeout`): hyper's HTTP/1 `header_read_timeout`
//!   with a tokio timer. It runs from the moment hyper starts reading a request head, so it
//!   also closes idle keep-alive connections after that long.
//! - **HTTP/1.1 only**: hyper-util's auto (HTTP/1 + h2c) builder first sniffs the protocol
//!   with no deadline at all, and HTTP/2 has no header-read deadline; tally's clients and
//!   load balancers speak HTTP/1.1.
//! - **Connection cap** (`--max-connections`): a semaphore permit is taken *before*
//!   `accept` and held by the connection's task. At the cap the loop stops accepting and new
//!   connections wait in the kernel's listen backlog until one closes. A semaphore here,
//!   rather than tower's `ConcurrencyLimit`, because that one counts requests in flight:
//!   idle keep-alive and slow-loris connections have none, yet each holds a socket, a file
//!   descriptor and buffers. Only a cap at accept bounds those.
//! - **Request deadline**: each connection task runs one lazily re-armed timer for the
//!   deadlines of its requests (see [`super::deadline`]), instead of one timer per request.
//! - The peer address goes into each request as `ConnectInfo<SocketAddr>`, but only when
//!   something reads it (the rate limiter), so the default path inserts nothing.
//!
//! Shutdown: when `stop` is cancelled the listener closes, idle connections are closed and
//! requests in flight finish (hyper's graceful shutdown); [`serve`] returns once every
//! connection is gone. The caller bounds that wait.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Connection-level limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Time a client has to send a complete request head (`--header-read-timeout`).
    pub header_read_timeout: Duration,
    /// Most connections open at once (`--max-connections`).
    pub max_connections: usize,
    /// Put the peer address into every request (needed by the rate limiter).
    pub connect_info: bool,
}

/// How long to pause after `accept` fails for lack of resources (EMFILE, ENOMEM): long
/// enough for connections to close, short enough not to be noticed. axum::serve uses 1s.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `app` on `listener` until `stop` is cancelled and every connection has closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    options: ServeOptions,
    stop: CancellationToken,
) {
    // Permits = open connections; taken before accept, released when the task ends. Never
    // closed, so `acquire_owned` cannot fail.
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .keep_alive(true);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&slots).acquire_owned() => {
                permit.expect("the connection semaphore is never closed")
            }
            () = stop.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    if !is_connection_error(&e) {
                        tracing::warn!(error = %e, "Cannot accept a connection; pausing.");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        // Responses are written in one go; Nagle's algorithm would only add latency.
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        if options.connect_info {
            let service = app
                .clone()
                .map_request(move |mut request: hyper::Request<Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(peer));
                    request.map(axum::body::Body::new)
                });
            let connection = builder.serve_connection(io, TowerToHyperService::new(service));
            spawn_connection(graceful.watch(connection), peer, permit);
        } else {
            let service = app
                .clone()
                .map_request(|request: hyper::Request<Incoming>| {
                    request.map(axum::body::Body::new)
                });
            let connection = builder.serve_connection(io, TowerToHyperService::new(service));
            spawn_connection(graceful.watch(connection), peer, permit);
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Runs one connection to its end (with its request-deadline timer), then frees its slot.
fn spawn_connection(
    connection: impl Future<Output = hyper::Result<()>> + Send + 'static,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
) {
    tokio::spawn(async move {
        if let Err(e) = super::deadline::drive(connection).await {
            // Header timeouts, resets and malformed requests end up here; they are the
            // client's business, not an operator's.
            tracing::debug!(%peer, error = %e, "Connection ended with an error.");
        }
        drop(permit);
    });
}

/// Errors that concern one connection only (the client gave up during the handshake).
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    )
}
