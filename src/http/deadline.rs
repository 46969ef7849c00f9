//! Connection and request deadlines without a timer per request: `--request-timeout` and
//! `--header-read-timeout`.
//!
//! The obvious shapes arm a timer per request: `tokio::time::timeout` around every request,
//! and hyper's own `header_read_timeout`, which boxes a new `Sleep` for every request head.
//! Each inserts an entry into tokio's timer wheel and removes it again (the request future
//! is pending at least once, waiting for its body; the connection waits for the next head),
//! which showed up in the `POST /increment` profile, for deadlines of 10 s and 30 s that
//! essentially never pass. Here each *connection* owns one timer instead, re-armed lazily:
//!
//! - The connection is in one of two phases. *Head*: waiting for a complete request head,
//!   since the connection opened or the previous response was produced; it must end within
//!   the header timeout. *Request*: the request's deadline, written by [`Deadline::start`]
//!   (two `Cell` writes), is in force.
//! - The connection's driver ([`drive`]) keeps one `Sleep`. It arms it no later than the
//!   deadline in force and leaves it there while requests come and go: every later deadline
//!   is later than the armed time (the timer is armed at most one header timeout ahead), so
//!   the timer only has to be moved when it fires. Then the driver compares with the deadline
//!   in force: passed, the request is marked expired, or a connection still without a
//!   request head is closed; not yet, the timer is re-armed. A busy connection thus touches
//!   the wheel about once per header timeout, not once per request.
//! - The request's future ([`Deadline::poll_expired`]) sees the mark the next time hyper
//!   polls it, which is at once: the driver polls the connection right after setting it.
//!
//! This relies on two properties of hyper's HTTP/1 server: one request at a time per
//! connection (a pipelined request is read only after the previous response), and the
//! request's future is polled from the connection's own task, so a task-local reaches it
//! without a lock, an `Arc` or a request extension. Where no driver runs (the router served
//! some other way, e.g. in a test through `tower::ServiceExt::oneshot`), [`Deadline`] falls
//! back to a timer of its own, armed only once the request is actually pending.
//!
//! Waits inside a request (the body, a journal fsync, `ack=store` waiting for the flusher)
//! are all inside the request's future, so the deadline bounds them all. One difference from
//! hyper's header timeout: the head phase starts when the previous response is produced, not
//! once it is written, so a client slow to read a response has that much less time for its
//! next head; responses are small, and the header timeout is seconds.

use std::cell::Cell;
use std::future::poll_fn;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use std::time::Duration;

use hyper_util::server::graceful::GracefulConnection;
use tokio::time::{Instant, Sleep};

/// What the accept loop may know of one connection: whether it is idle between requests
/// (and since when), and a way to ask it to shut down. Shared by the connection's driver and
/// the connection registry of [`super::serve`], which asks on shutdown and, at
/// `--max-connections`, asks the connection idle longest.
///
/// The driver reads the request from one atomic on each wake-up and keeps its task's waker
/// here from its first poll (a task's waker does not change). A `Notify` polled on every
/// wake-up, as hyper-util's graceful-shutdown watcher and an earlier version of this did,
/// takes its waiter lock on each poll: twice per wake-up, and a request under `ack=journal`
/// wakes its connection twice (docs/benchmarks.md).
#[derive(Debug, Default)]
pub struct ConnState {
    /// Nanoseconds since [`epoch`] at which the connection became idle after a response;
    /// 0 while it is not idle (a new connection, a request head or a request in flight).
    idle_since: AtomicU64,
    /// Whether the connection was asked to shut down.
    asked: AtomicBool,
    /// The driver's task, woken when something is asked; `None` until its first poll.
    task: Mutex<Option<Waker>>,
}

impl ConnState {
    /// Since when the connection is idle, if it is (in the units of [`epoch`]).
    pub fn idle_since(&self) -> Option<u64> {
        match self.idle_since.load(Ordering::Relaxed) {
            0 => None,
            since => Some(since),
        }
    }

    /// Asks the connection to shut down gracefully: hyper finishes the request in flight
    /// (its response says `Connection: close`) and closes an idle kept-alive connection at
    /// once (a request head still incomplete counts as idle to hyper); a new connection
    /// still gets until its first request or the header timeout.
    pub fn shut_down(&self) {
        // Published before the waker is looked at: either the driver's next look at `asked`
        // (after it stored its waker) sees it, or this sees the waker and wakes it.
        self.asked.store(true, Ordering::Release);
        if let Some(task) = self.task().as_ref() {
            task.wake_by_ref();
        }
    }

    fn task(&self) -> std::sync::MutexGuard<'_, Option<Waker>> {
        self.task.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_idle(&self, at: Option<Instant>) {
        let since = at.map_or(0, |at| {
            u64::try_from(at.duration_since(epoch()).as_nanos()).map_or(u64::MAX, |n| n.max(1))
        });
        self.idle_since.store(since, Ordering::Relaxed);
    }
}

/// The zero point of [`ConnState`]'s idle times.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

tokio::task_local! {
    /// The deadline of the request in flight on this task's connection.
    static CLOCK: ConnClock;
}

/// One connection's deadlines, shared by its driver and its request in flight.
struct ConnClock {
    /// Since when the connection waits for a request head; `None` while serving a request.
    head_since: Cell<Option<Instant>>,
    /// When the request in flight must be answered; `None` between requests, and for
    /// requests of a router without [`super::observe::Observe`].
    deadline: Cell<Option<Instant>>,
    /// Set by the driver once `deadline` has passed.
    expired: Cell<bool>,
    /// Shared with the accept loop; also says whether the connection is idle.
    shared: std::sync::Arc<ConnState>,
}

/// Runs `connection` (one hyper HTTP/1 connection) with one timer for all of its deadlines,
/// and shuts it down gracefully when [`ConnState::shut_down`] asks.
/// `None` when it was closed for not sending a complete request head within
/// `header_timeout` (dropping hyper's connection closes the socket). Must be the whole of its
/// task (as `tokio::spawn(drive(..))`): the timer and the [`ConnState`] keep the waker it was
/// first polled with.
pub async fn drive<C: GracefulConnection>(
    connection: C,
    header_timeout: Duration,
    idle_timeout: Duration,
    shared: std::sync::Arc<ConnState>,
) -> Option<C::Output> {
    let asks = std::sync::Arc::clone(&shared);
    let clock = ConnClock {
        shared,
        head_since: Cell::new(Some(Instant::now())),
        deadline: Cell::new(None),
        expired: Cell::new(false),
    };
    CLOCK
        .scope(clock, async move {
            let mut connection = pin!(connection);
            // A `Sleep` enters the timer wheel when first polled or reset, not when built.
            let mut timer = pin!(tokio::time::sleep_until(Instant::now()));
            let mut armed: Option<Instant> = None;
            let (mut registered, mut shutting_down) = (false, false);
            poll_fn(|cx| {
                if !registered {
                    *asks.task() = Some(cx.waker().clone());
                    registered = true;
                }
                loop {
                    if let Poll::Ready(output) = connection.as_mut().poll(cx) {
                        return Poll::Ready(Some(output));
                    }
                    if !shutting_down && asks.asked.load(Ordering::Acquire) {
                        // Asked after the poll above, so that a request the client had
                        // already sent is read and answered (with `Connection: close`) rather
                        // than dropped with an idle connection. At the cap that is the race of
                        // a longest-idle connection whose next request was on its way.
                        shutting_down = true;
                        connection.as_mut().graceful_shutdown();
                        continue;
                    }
                    let (head_since, idle, deadline, expired) = CLOCK.with(|clock| {
                        (
                            clock.head_since.get(),
                            // Idle: no byte of the next head yet, so the idle timeout runs.
                            clock.shared.idle_since().is_some(),
                            clock.deadline.get(),
                            clock.expired.get(),
                        )
                    });
                    let next = match (deadline, head_since) {
                        // Marked; the request answers when hyper next polls it.
                        (Some(_), _) if expired => return Poll::Pending,
                        (Some(deadline), _) => deadline,
                        (None, Some(since)) if idle => since + idle_timeout,
                        (None, Some(since)) => since + header_timeout,
                        // A request without a deadline of its own.
                        (None, None) => return Poll::Pending,
                    };
                    if armed.is_none_or(|at| at > next) {
                        // Never further ahead than one header timeout, so that the next head
                        // phase's deadline is not earlier than the armed time.
                        let at = next.min(Instant::now() + header_timeout);
                        timer.as_mut().reset(at);
                        armed = Some(at);
                        // Polled once to hand it this task's waker.
                        if timer.as_mut().poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                    } else if !timer.is_elapsed() {
                        // Armed and holding this task's waker (a task's waker does not
                        // change): it wakes the task when it fires. Polling it again on
                        // every wake-up would only re-register the same waker.
                        return Poll::Pending;
                    }
                    armed = None;
                    if Instant::now() >= next {
                        if deadline.is_none() {
                            return Poll::Ready(None);
                        }
                        CLOCK.with(|clock| clock.expired.set(true));
                    }
                    // Poll the connection again: it answers the expired request, or the
                    // loop re-arms the timer for the deadline in force.
                }
            })
            .await
        })
        .await
}

/// A request head has been read: the head phase ends. Called by the connection's service.
pub fn head_received() {
    let _ = CLOCK.try_with(|clock| clock.head_since.set(None));
}

/// The response is produced: the connection is idle until the next request's first byte.
/// Called by the connection's service. Returns whether the connection closes after this
/// response (it was asked to shut down while the request was in flight), which the
/// response then says with `Connection: close`.
pub fn response_produced() -> bool {
    CLOCK
        .try_with(|clock| {
            let now = Instant::now();
            clock.head_since.set(Some(now));
            clock.shared.set_idle(Some(now));
            clock.shared.asked.load(Ordering::Acquire)
        })
        .unwrap_or(false)
}

/// Bytes came in: on an idle connection, a request head has started, and the header
/// timeout runs from now. Called by the connection's socket ([`Watched`]).
fn bytes_received() {
    let _ = CLOCK.try_with(|clock| {
        if clock.shared.idle_since().is_some() {
            clock.head_since.set(Some(Instant::now()));
            clock.shared.set_idle(None);
        }
    });
}

/// A connection's socket that tells its clock when bytes come in, so that an idle
/// kept-alive connection gets `--idle-timeout` and a started request head
/// `--header-read-timeout`. Must be read from the task that runs [`drive`].
pub struct Watched<T>(pub T);

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.0).poll_read(cx, buf);
        if buf.filled().len() > before {
            bytes_received();
        }
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// The deadline of one request.
pub struct Deadline {
    at: Instant,
    /// `None`: the connection's driver watches the deadline. `Some`: no driver; a timer of
    /// our own, created on the first pending poll.
    own: Option<Option<Pin<Box<Sleep>>>>,
    /// Still registered with the connection's clock.
    registered: bool,
}

impl Deadline {
    /// Starts the deadline of a request that must be answered by `at`.
    pub fn start(at: Instant) -> Self {
        let on_connection = CLOCK
            .try_with(|clock| {
                clock.deadline.set(Some(at));
                clock.expired.set(false);
            })
            .is_ok();
        Self {
            at,
            own: (!on_connection).then_some(None),
            registered: on_connection,
        }
    }

    /// Whether the deadline has passed; when not, the task is woken once it does.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        match &mut self.own {
            None => CLOCK.try_with(|clock| clock.expired.get()).unwrap_or(false),
            Some(timer) => {
                let at = self.at;
                timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)))
                    .as_mut()
                    .poll(cx)
                    .is_ready()
            }
        }
    }

    /// The request is answered: the connection no longer needs to watch it.
    pub fn finish(&mut self) {
        if std::mem::take(&mut self.registered) {
            // Outside the connection's task (dropped with it) there is nothing to clear.
            let _ = CLOCK.try_with(|clock| {
                clock.deadline.set(None);
                clock.expired.set(false);
            });
        }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        // A request dropped unanswered (the client went away) ends too.
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::Router;
    use axum::body::Bytes;
    use axum::http::StatusCode;
    use axum::routing::post;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_util::sync::CancellationToken;

    use crate::http::observe::Observe;
    use crate::http::serve::{ServeOptions, serve};

    /// Reads one response (head and a body of Content-Length bytes) from `stream`.
    async fn read_response(stream: &mut TcpStream) -> String {
        let mut response = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let n = stream.read(&mut buf).await.expect("read");
            response.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&response).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length: ")
                            .map(str::to_owned)
                    })
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if response.len() >= end + 4 + length {
                    return text;
                }
            }
            assert!(n > 0, "connection closed mid-response: {text}");
        }
    }

    /// Asserts that the server closes `stream` within 5 s without sending anything more.
    async fn assert_closed(stream: &mut TcpStream, what: &str) {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{what}"))
            .unwrap_or(0);
        assert_eq!(n, 0, "closed without another answer ({what})");
    }

    /// Asserts that the server task returns within 5 s.
    async fn assert_returns(server: tokio::task::JoinHandle<()>, what: &str) {
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap_or_else(|_| panic!("{what}"))
            .expect("server task");
    }

    /// Serves a router with a `POST /echo` route and a `POST /panic` route on a free port.
    async fn start(
        request_timeout: Duration,
        header_read_timeout: Duration,
        idle_timeout: Duration,
    ) -> (
        std::net::SocketAddr,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let router = Router::new()
            .route("/echo", post(|_: Bytes| async { StatusCode::ACCEPTED }))
            .route(
                "/panic",
                post(|| async {
                    panic!("a handler bug (expected by the test)");
                    #[allow(unreachable_code)]
                    StatusCode::ACCEPTED
                }),
            )
            .layer(Observe::new(request_timeout));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let stop = CancellationToken::new();
        let options = ServeOptions {
            header_read_timeout,
            idle_timeout,
            max_header_bytes: crate::config::DEFAULT_MAX_HEADER_BYTES,
            draining: CancellationToken::new(),
            max_connections: 4,
            connect_info: false,
            threads: None,
        };
        let server = tokio::spawn(serve(listener, router, options, stop.clone()));
        (address, stop, server)
    }

    const ECHO: &[u8] = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}";

    /// After a response, a kept-alive connection waits for its next request up to the idle
    /// timeout, which is longer than the header timeout; then it is closed.
    #[tokio::test]
    async fn an_idle_kept_alive_connection_stays_for_the_idle_timeout_then_closes() {
        let (address, stop, server) = start(
            Duration::from_secs(30),
            Duration::from_millis(300),
            Duration::from_millis(1_500),
        )
        .await;
        let mut stream = TcpStream::connect(address).await.expect("connect");
        stream.write_all(ECHO).await.expect("write");
        assert!(read_response(&mut stream).await.starts_with("HTTP/1.1 202"));
        // Idle for twice the header timeout: still open.
        tokio::time::sleep(Duration::from_millis(600)).await;
        stream.write_all(ECHO).await.expect("write");
        let text = read_response(&mut stream).await;
        assert!(
            text.starts_with("HTTP/1.1 202"),
            "kept alive past the header timeout: {text}"
        );
        let idle = std::time::Instant::now();
        assert_closed(&mut stream, "the idle connection is closed").await;
        assert!(
            idle.elapsed() >= Duration::from_millis(1_200),
            "closed after the idle timeout, not before: {:?}",
            idle.elapsed()
        );
        stop.cancel();
        server.await.expect("server task");
    }

    /// On shutdown an idle kept-alive connection is closed at once, while a request in
    /// flight (its body still coming) is answered first; then the server returns.
    #[tokio::test]
    async fn shutdown_closes_idle_connections_at_once_and_lets_a_request_in_flight_finish() {
        let long = Duration::from_secs(30);
        let (address, stop, server) = start(long, long, long).await;
        let mut idle = TcpStream::connect(address).await.expect("connect");
        idle.write_all(ECHO).await.expect("write");
        assert!(read_response(&mut idle).await.starts_with("HTTP/1.1 202"));
        let mut busy = TcpStream::connect(address).await.expect("connect");
        let (head_and_half, rest) = ECHO.split_at(ECHO.len() - 1);
        busy.write_all(head_and_half).await.expect("write");
        tokio::time::sleep(Duration::from_millis(200)).await;

        stop.cancel();
        assert_closed(
            &mut idle,
            "the idle connection is closed at once, not after the idle timeout",
        )
        .await;
        assert!(!server.is_finished(), "a request is still in flight");

        busy.write_all(rest)
            .await
            .expect("write the rest of the body");
        let text = read_response(&mut busy).await;
        assert!(text.starts_with("HTTP/1.1 202"), "answered: {text}");
        assert_returns(server, "the server returns once both connections are gone").await;
    }

    /// A connection whose task panicked (a handler bug) is gone from the registry: shutdown
    /// does not wait for it.
    #[tokio::test]
    async fn shutdown_does_not_wait_for_a_connection_whose_task_panicked() {
        let long = Duration::from_secs(30);
        let (address, stop, server) = start(long, long, long).await;
        let mut stream = TcpStream::connect(address).await.expect("connect");
        stream
            .write_all(b"POST /panic HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            .await
            .expect("write");
        assert_closed(&mut stream, "the panicked connection is closed").await;
        stop.cancel();
        assert_returns(
            server,
            "the server returns without waiting for the panicked connection",
        )
        .await;
    }

    /// On a kept-alive connection, a request head that has started must be complete within
    /// the header timeout (slow loris), however long the idle timeout.
    #[tokio::test]
    async fn a_started_head_on_a_kept_alive_connection_gets_the_header_timeout() {
        let (address, stop, server) = start(
            Duration::from_secs(30),
            Duration::from_millis(300),
            Duration::from_secs(30),
        )
        .await;
        let mut stream = TcpStream::connect(address).await.expect("connect");
        stream.write_all(ECHO).await.expect("write");
        assert!(read_response(&mut stream).await.starts_with("HTTP/1.1 202"));
        stream
            .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        assert_closed(
            &mut stream,
            "closed within the header timeout, not the idle timeout",
        )
        .await;
        stop.cancel();
        server.await.expect("server task");
    }

    /// The connection's timer is armed at the first request's deadline and never moved while
    /// requests finish in time; a later request that stalls must still get its 503, which
    /// takes the re-arm path (the timer fires at the first request's deadline first).
    #[tokio::test]
    async fn a_later_request_on_a_kept_alive_connection_still_times_out() {
        let (address, stop, server) = start(
            Duration::from_millis(300),
            Duration::from_secs(10),
            Duration::from_secs(10),
        )
        .await;
        let mut stream = TcpStream::connect(address).await.expect("connect");
        for _ in 0..3 {
            stream.write_all(ECHO).await.expect("write");
            let text = read_response(&mut stream).await;
            assert!(text.starts_with("HTTP/1.1 202"), "{text}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Promise two bytes of body, send one.
        stream
            .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{")
            .await
            .expect("write");
        let text = tokio::time::timeout(Duration::from_secs(5), read_response(&mut stream))
            .await
            .expect("an answer to the stalled request");
        assert!(text.starts_with("HTTP/1.1 503"), "{text}");
        assert!(text.contains(r#""error":"timeout""#), "{text}");
        stop.cancel();
        drop(stream);
        server.await.expect("server task");
    }

    /// At the cap, the connection asked to make room can turn busy between the accept loop's
    /// look and its own: its client's next request arrived meanwhile. It then answers that
    /// request with `Connection: close` and closes, so the new client gets its slot after one
    /// request, not after some connection's idle timeout. The race is provoked on a server
    /// whose only thread a `/block` request holds (until the test lets it go) while the new
    /// client connects and the idle client sends its next request head; freed, the server
    /// sees the new client first (epoll reports readiness in the order it came).
    #[tokio::test]
    async fn at_the_cap_a_connection_that_turned_busy_closes_after_its_request() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("non-blocking");
        let address = listener.local_addr().expect("address");
        let stop = CancellationToken::new();
        let (blocked, blocking_now) = std::sync::mpsc::channel::<()>();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = std::sync::Arc::new(std::sync::Mutex::new(released));
        let server = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let router = Router::new()
                    .route("/echo", post(|_: Bytes| async { StatusCode::ACCEPTED }))
                    .route(
                        "/block",
                        post(move || async move {
                            let _ = blocked.send(());
                            let _ = released
                                .lock()
                                .map(|r| r.recv_timeout(Duration::from_secs(10)));
                            StatusCode::ACCEPTED
                        }),
                    );
                let options = ServeOptions {
                    header_read_timeout: Duration::from_secs(60),
                    idle_timeout: Duration::from_secs(60),
                    max_header_bytes: crate::config::DEFAULT_MAX_HEADER_BYTES,
                    draining: CancellationToken::new(),
                    max_connections: 2,
                    connect_info: false,
                    threads: None,
                };
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on(async move {
                        let listener = TcpListener::from_std(listener).expect("listener");
                        serve(listener, router, options, stop).await;
                    });
            }
        });

        // The first connection is served once, then idle: the longest-idle one.
        let mut first = TcpStream::connect(address).await.expect("connect");
        send(&mut first, ECHO).await;
        assert!(read_response(&mut first).await.starts_with("HTTP/1.1 202"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The second holds the server's thread; the cap is reached.
        let mut blocking = TcpStream::connect(address).await.expect("connect");
        send(
            &mut blocking,
            b"POST /block HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        blocking_now
            .recv_timeout(Duration::from_secs(5))
            .expect("the server thread is held");
        let mut new = TcpStream::connect(address).await.expect("connect");
        // A request head, complete: the request is in flight, waiting for its body.
        send(
            &mut first,
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n",
        )
        .await;
        // Both are in the kernel's hands before the server thread looks again.
        release.send(()).expect("release the server thread");
        assert!(
            read_response(&mut blocking)
                .await
                .starts_with("HTTP/1.1 202")
        );

        send(&mut first, b"{}").await;
        let answer = read_response(&mut first).await;
        assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "told to close: {answer}"
        );
        assert_closed(&mut first, "closed after its answer").await;
        send(&mut new, ECHO).await;
        let served = tokio::time::timeout(Duration::from_secs(5), read_response(&mut new))
            .await
            .expect("the new client is served once that request is answered");
        assert!(served.starts_with("HTTP/1.1 202"), "{served}");

        stop.cancel();
        drop((first, blocking, new));
        server.join().expect("server thread");
    }

    async fn send(stream: &mut TcpStream, bytes: &[u8]) {
        stream.write_all(bytes).await.expect("write");
    }
}
