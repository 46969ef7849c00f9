//! The HTTP/1.1 server: an accept loop over hyper, with a cap on connections and a deadline
//! for request headers.
//!
//! Why not `axum::serve`: it builds hyper's connection without a timer, so hyper's
//! `header_read_timeout` never fires, and it offers no hook to set one. A client that opens
//! a connection and sends a header byte every few seconds (slow loris) would hold it
//! forever. This loop is axum::serve's, plus:
//!
//! - **Header deadline** (`--header-read-timeout`): a connection that has not sent a complete
//!   request head that long after it opened, or after the first byte of a request on a
//!   kept-alive connection, is closed. **Idle deadline** (`--idle-timeout`): a kept-alive
//!   connection with no byte of a next request that long after its previous response is
//!   closed; longer than a proxy's upstream keep-alive, so that the proxy closes first. Both
//!   are kept by the connection's timer (`deadline`) rather than hyper's
//!   `header_read_timeout`, which boxes and arms a new timer for every request head.
//! - **HTTP/1.1 only**: hyper-util's auto (HTTP/1 + h2c) builder first sniffs the protocol
//!   with no deadline at all, and HTTP/2 has no header-read deadline; tally's clients and
//!   load balancers speak HTTP/1.1.
//! - **Connection cap** (`--max-connections`): a semaphore permit is taken *before*
//!   `accept` and held by the connection's task. At the cap, a new client takes the slot of
//!   the connection that has been idle longest between requests (as nginx does): that one is
//!   asked to shut down as on SIGTERM, which closes it at once, or, if its client's next
//!   request came in meanwhile, after answering that one with `Connection: close`; a
//!   keep-alive client handles either by reconnecting (`tally_http_connections_yielded_total`
//!   counts them). When no connection is idle
//!   (every one is mid-request or mid-head), that client waits, accepted, for a slot to
//!   free, and the ones after it wait in the listen backlog. A semaphore here,
//!   rather than tower's `ConcurrencyLimit`, because that one counts requests in flight:
//!   idle keep-alive and slow-loris connections have none, yet each holds a socket, a file
//!   descriptor and buffers. Only a cap at accept bounds those.
//! - **Serving threads**: each accepted connection runs on one of [`ServingThreads`]
//!   (`--http-threads`) from then to its close, when [`ServeOptions::threads`] names them;
//!   the accept loop, the cap and the registry stay here, shared by all of them.
//! - **Request deadline**: the same timer watches the deadline of the request in flight
//!   (`--request-timeout`, set by `observe`).
//! - The peer address goes into each request as `ConnectInfo<SocketAddr>`, but only when
//!   something reads it (the rate limiter), so the default path inserts nothing.
//!
//! Shutdown: when `stop` is cancelled the listener closes, idle kept-alive connections are
//! closed, requests in flight finish (hyper's graceful shutdown, asked of each connection
//! through its `ConnState`), and a connection that has not sent its first request yet gets
//! until the header timeout; [`serve`] returns once every connection task has ended (a
//! panicked one included). The caller bounds that wait.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::response::Response;
use axum::routing::future::RouteFuture;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tower::Service;

use super::deadline::{self, ConnState};
use super::hot::{HotFuture, HotIncrement};
use super::threads::ServingThreads;

/// What one listener serves: a router, and optionally the hot route ([`super::hot`]),
/// recognised before the router.
#[derive(Clone)]
pub struct App {
    router: Router,
    increment: Option<Arc<HotIncrement>>,
}

impl App {
    pub fn new(router: Router, increment: Option<HotIncrement>) -> Self {
        Self {
            router,
            increment: increment.map(Arc::new),
        }
    }
}

impl From<Router> for App {
    fn from(router: Router) -> Self {
        Self::new(router, None)
    }
}

/// Connection-level limits of one listener.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Time a client has to send a complete request head (`--header-read-timeout`).
    pub header_read_timeout: Duration,
    /// Time a kept-alive connection may wait for its next request (`--idle-timeout`).
    pub idle_timeout: Duration,
    /// Largest request head, in bytes (`--max-header-bytes`, at least 8192).
    pub max_header_bytes: usize,
    /// Most connections open at once (`--max-connections`).
    pub max_connections: usize,
    /// Put the peer address into every request (needed by the rate limiter).
    pub connect_info: bool,
    /// Cancelled when shutdown begins (`--shutdown-delay`): from then on every response
    /// carries `Connection: close`, so that proxies drop their kept-alive connections to
    /// this instance before its listener closes, rather than send a request into a closing
    /// one.
    pub draining: CancellationToken,
    /// Where connections run: on these threads ([`super::threads`]), or, when `None`, as
    /// tasks of the runtime that runs [`serve`].
    pub threads: Option<Arc<ServingThreads>>,
}

/// How long to pause after `accept` fails for lack of resources (EMFILE, ENOMEM): long
/// enough for connections to close, short enough not to be noticed. axum::serve uses 1s.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `app` on `listener` until `stop` is cancelled and every connection has closed.
pub async fn serve(
    listener: TcpListener,
    app: impl Into<App>,
    options: ServeOptions,
    stop: CancellationToken,
) {
    let app = app.into();
    // Permits = open connections; taken before accept, released when the task ends. Never
    // closed, so `acquire_owned` cannot fail.
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let registry = Arc::new(Registry::default());
    let mut builder = hyper::server::conn::http1::Builder::new();
    // No hyper timer and no `header_read_timeout`: the header deadline is the connection
    // driver's (see the module doc).
    builder.keep_alive(true);
    // The read buffer's cap: a request head larger than this gets 431 before it is held.
    builder.max_buf_size(options.max_header_bytes);
    let mut accept_failing = AcceptFailures::default();
    loop {
        let (permit, accepted) = match Arc::clone(&slots).try_acquire_owned() {
            Ok(permit) => (permit, None),
            // At the cap: a slot that frees, or a client, for whom the longest-idle
            // connection makes room.
            Err(_) => tokio::select! {
                permit = Arc::clone(&slots).acquire_owned() => {
                    (permit.expect("the connection semaphore is never closed"), None)
                }
                accepted = listener.accept() => {
                    if accepted.is_ok() {
                        registry.close_oldest_idle();
                    }
                    tokio::select! {
                        permit = Arc::clone(&slots).acquire_owned() => {
                            (permit.expect("the connection semaphore is never closed"), Some(accepted))
                        }
                        () = stop.cancelled() => break,
                    }
                }
                () = stop.cancelled() => break,
            },
        };
        let accepted = match accepted {
            Some(accepted) => accepted,
            None => tokio::select! {
                accepted = listener.accept() => accepted,
                () = stop.cancelled() => break,
            },
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                if let Some(cause) = lack_of_resources(&e) {
                    accept_failing.failed(&e, cause);
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                } else if !is_connection_error(&e) {
                    // A network error of the new connection, which accept(2) passes on
                    // (ENETDOWN, EPROTO, EHOSTUNREACH, EPERM from a firewall, …): retried,
                    // as the man page says; the pause keeps an error that persists from
                    // spinning.
                    tracing::debug!(error = %e, "Cannot accept a connection; retrying.");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
                continue;
            }
        };
        accept_failing.accepted();
        // Responses are written in one go; Nagle's algorithm would only add latency.
        let _ = stream.set_nodelay(true);
        let service = ConnectionService {
            app: app.clone(),
            peer: options.connect_info.then_some(peer),
            draining: options.draining.clone(),
        };
        let connection = Connection {
            builder: builder.clone(),
            service,
            peer,
            slot: Registered::new(permit, &registry),
            timeouts: (options.header_read_timeout, options.idle_timeout),
        };
        match &options.threads {
            None => {
                tokio::spawn(connection.run(stream));
            }
            Some(threads) => {
                // The socket moves to the chosen thread's reactor: out of this runtime's,
                // into that one's once the task runs there.
                let stream = match stream.into_std() {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "Cannot hand a connection to a serving thread; closed.");
                        continue;
                    }
                };
                let (thread, open) = threads.pick();
                thread.spawn(async move {
                    let _open = open;
                    match tokio::net::TcpStream::from_std(stream) {
                        Ok(stream) => connection.run(stream).await,
                        Err(e) => {
                            tracing::warn!(%peer, error = %e, "Cannot register a connection with its serving thread; closed.");
                        }
                    }
                });
            }
        }
    }
    drop(listener);
    registry.shut_down().await;
}

/// An accepted connection, registered and holding its slot, until its task runs it.
struct Connection {
    builder: hyper::server::conn::http1::Builder,
    service: ConnectionService,
    peer: SocketAddr,
    slot: Registered,
    /// The header-read and idle timeouts.
    timeouts: (Duration, Duration),
}

impl Connection {
    /// Runs the connection to its end (under its deadline timer), then frees its slot.
    async fn run(self, stream: tokio::net::TcpStream) {
        let Self {
            builder,
            service,
            peer,
            // Held to the end of the task however it ends, a panic in a handler included:
            // shutdown waits for the registry to empty, and the accept loop for free slots.
            slot,
            timeouts: (header_read_timeout, idle_timeout),
        } = self;
        let shared = Arc::clone(&slot.shared);
        let connection = builder.serve_connection(TokioIo::new(deadline::Watched(stream)), service);
        // Header timeouts, resets and malformed requests are the client's business, not an
        // operator's.
        match deadline::drive(connection, header_read_timeout, idle_timeout, shared).await {
            Some(Ok(())) => {}
            Some(Err(e)) => tracing::debug!(%peer, error = %e, "Connection ended with an error."),
            None => tracing::debug!(%peer, "Idle, or no complete request head in time; closed."),
        }
    }
}

/// One connection's entry in the [`Registry`] and its slot, released when its task ends.
struct Registered {
    id: u64,
    shared: Arc<ConnState>,
    registry: Arc<Registry>,
    _permit: OwnedSemaphorePermit,
}

impl Registered {
    fn new(permit: OwnedSemaphorePermit, registry: &Arc<Registry>) -> Self {
        let (id, shared) = registry.add();
        Self {
            id,
            shared,
            registry: Arc::clone(registry),
            _permit: permit,
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.remove(self.id);
    }
}

/// The service hyper calls for each request of one connection: the app, plus the peer
/// address when asked for, plus the phase changes the header deadline needs. Written out
/// rather than `TowerToHyperService` over `map_request` so that it can mark those phases
/// and take the hot route; like that one it clones the router (an `Arc`) per request, and
/// adds no allocation.
struct ConnectionService {
    app: App,
    /// `Some` when the peer address goes into each request as `ConnectInfo`.
    peer: Option<SocketAddr>,
    /// See [`ServeOptions::draining`].
    draining: CancellationToken,
}

impl hyper::service::Service<hyper::Request<Incoming>> for ConnectionService {
    type Response = Response;
    type Error = Infallible;
    type Future = Exchange;

    fn call(&self, mut request: hyper::Request<Incoming>) -> Self::Future {
        deadline::head_received();
        if let Some(peer) = self.peer {
            request.extensions_mut().insert(ConnectInfo(peer));
        }
        let inner = match &self.app.increment {
            Some(hot) if HotIncrement::serves(&request) => {
                Inner::Hot(hot.call(request.map(Body::new)))
            }
            // `Router` is always ready, so `call` needs no `poll_ready` first.
            _ => Inner::Router(self.app.router.clone().call(request)),
        };
        Exchange {
            inner,
            done: false,
            close: self.draining.is_cancelled(),
        }
    }
}

/// One request's future: the router's or the hot route's, and the start of the next head
/// phase once it is answered.
struct Exchange {
    inner: Inner,
    done: bool,
    /// Answer with `Connection: close` (shutdown had begun when the request came; one that
    /// begins while it is in flight is seen when the response is produced).
    close: bool,
}

impl Future for Exchange {
    type Output = Result<Response, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let mut response = std::task::ready!(match &mut this.inner {
            Inner::Router(inner) => Pin::new(inner).poll(cx),
            Inner::Hot(inner) => Pin::new(inner).poll(cx),
        });
        this.done = true;
        let closing = deadline::response_produced();
        if (this.close || closing)
            && let Ok(response) = &mut response
        {
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        Poll::Ready(response)
    }
}

/// Who answers a request. Unboxed: the enum lives inside the connection's task either way,
/// and a box would cost the router's requests an allocation each.
#[allow(clippy::large_enum_variant)]
enum Inner {
    Router(RouteFuture<Infallible>),
    Hot(HotFuture),
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if !self.done {
            // Dropped unanswered (the connection is going away): back to waiting for a head.
            let _ = deadline::response_produced();
        }
    }
}

/// The open connections, for the accept loop to find the longest-idle one at the cap, and
/// to shut them all down. Touched once when a connection opens and once when it closes;
/// requests only write their connection's own [`ConnState`].
#[derive(Default)]
struct Registry {
    connections: std::sync::Mutex<std::collections::HashMap<u64, Arc<ConnState>>>,
    next_id: std::sync::atomic::AtomicU64,
    /// Notified when the last connection is removed.
    emptied: tokio::sync::Notify,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, Arc<ConnState>>> {
        self.connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn add(&self) -> (u64, Arc<ConnState>) {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let shared = Arc::new(ConnState::default());
        self.lock().insert(id, Arc::clone(&shared));
        (id, shared)
    }

    fn remove(&self, id: u64) {
        let mut connections = self.lock();
        connections.remove(&id);
        if connections.is_empty() {
            drop(connections);
            self.emptied.notify_waiters();
        }
    }

    /// Asks every connection to shut down gracefully (see [`ConnState::shut_down`]) and
    /// returns once all are gone. Called after the accept loop has ended, so no connection
    /// is added meanwhile.
    async fn shut_down(&self) {
        let emptied = self.emptied.notified();
        let mut emptied = std::pin::pin!(emptied);
        // Registered before the last look, so a removal after it cannot be missed.
        emptied.as_mut().enable();
        {
            let connections = self.lock();
            if connections.is_empty() {
                return;
            }
            connections.values().for_each(|c| c.shut_down());
        }
        emptied.await;
    }

    /// Asks the connection idle the longest to shut down, if one is idle: closed at once, or
    /// if its client's next request came in since this look, after answering that request
    /// with `Connection: close` (asked to close only if still idle, it stayed, and the new
    /// client waited for some other slot, up to an idle timeout). A scan of the open
    /// connections, done only at the cap.
    fn close_oldest_idle(&self) {
        let oldest = self
            .lock()
            .values()
            .filter_map(|c| c.idle_since().map(|since| (since, Arc::clone(c))))
            .min_by_key(|(since, _)| *since);
        if let Some((_, connection)) = oldest {
            connection.shut_down();
            crate::metrics::Metrics::global()
                .connections_yielded
                .increment(1);
            tracing::debug!(
                "At --max-connections: closing the longest-idle connection for a new client."
            );
        }
    }
}

/// `accept` failures for lack of resources ([`lack_of_resources`]): each is counted
/// (`tally_http_accept_failures_total`) and logged as a warning at most once per
/// [`ACCEPT_WARN_EVERY`] with the count since the last one (at the limit, failures and
/// accepts alternate as connections close: one line each would flood the log), and once
/// accepts work again after a warning, that is logged too.
#[derive(Default)]
struct AcceptFailures {
    /// When the last warning was logged.
    warned_at: Option<Instant>,
    /// Failures since that warning.
    unwarned: u64,
    /// A warning was logged since the last accept.
    warned_in_run: bool,
}

/// Least time between two warnings of [`AcceptFailures`].
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(60);

impl AcceptFailures {
    /// `accept` failed with `e` for lack of resources, as [`lack_of_resources`] explains.
    fn failed(&mut self, e: &std::io::Error, cause: &str) {
        crate::metrics::Metrics::global()
            .accept_failures
            .increment(1);
        self.unwarned += 1;
        if self
            .warned_at
            .is_some_and(|at| at.elapsed() < ACCEPT_WARN_EVERY)
        {
            tracing::debug!(error = %e, "Still cannot accept connections.");
            return;
        }
        tracing::warn!(
            error = %e,
            failures = self.unwarned,
            "Cannot accept connections, pausing {ACCEPT_BACKOFF:?} after each failure; new \
             clients wait. {cause}. tally_http_accept_failures_total counts the failures."
        );
        self.warned_at = Some(Instant::now());
        self.unwarned = 0;
        self.warned_in_run = true;
    }

    fn accepted(&mut self) {
        if std::mem::take(&mut self.warned_in_run) {
            tracing::info!(
                failures_since_warning = self.unwarned,
                "Accepting connections again."
            );
        }
    }
}

/// Why `accept` failed, if for lack of resources (counted, warned, paused after): then
/// every new client waits until some are freed.
fn lack_of_resources(e: &std::io::Error) -> Option<&'static str> {
    Some(match e.raw_os_error()? {
        libc::EMFILE => {
            "tally is out of file descriptors (EMFILE): raise its open-file limit \
             (LimitNOFILE=, ulimit -n) or lower --max-connections"
        }
        libc::ENFILE => {
            "the host is out of file descriptors (ENFILE): see /proc/sys/fs/file-nr and \
             fs.file-max"
        }
        libc::ENOMEM | libc::ENOBUFS => "the host is out of memory for sockets",
        _ => return None,
    })
}

/// Errors that concern one connection only (the client gave up during the handshake).
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset
    )
}
