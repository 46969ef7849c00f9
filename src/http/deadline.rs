//! `--request-timeout` without a timer per request.
//!
//! The obvious shape, `tokio::time::timeout` around every request, inserts an entry into
//! tokio's timer wheel and removes it again for each of them (the request future is pending
//! at least once, waiting for its body), which showed up in the `POST /increment` profile
//! at 30 s timeouts that essentially never fire. Here each *connection* owns one timer
//! instead, re-armed lazily:
//!
//! - A request writes its deadline into its connection's [`ConnClock`] (two `Cell` writes).
//! - The connection's driver ([`drive`]) keeps one `Sleep`. It arms it at the deadline of
//!   the request in flight and leaves it there while later requests come and go: deadlines
//!   only grow, so an armed time is never later than the current request's deadline. When
//!   it fires, the driver compares with the deadline in force: passed, the request is marked
//!   expired; not yet, the timer is re-armed. A busy connection thus touches the wheel about
//!   once per timeout period, not once per request.
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
//! are all inside the request's future, so the deadline bounds them all, as before.

use std::cell::Cell;
use std::future::poll_fn;
use std::pin::{Pin, pin};
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

tokio::task_local! {
    /// The deadline of the request in flight on this task's connection.
    static CLOCK: ConnClock;
}

/// One connection's request deadline, shared by its driver and its request in flight.
#[derive(Default)]
struct ConnClock {
    /// When the request in flight must be answered; `None` between requests.
    deadline: Cell<Option<Instant>>,
    /// Set by the driver once `deadline` has passed.
    expired: Cell<bool>,
}

/// Runs `connection` (one hyper HTTP/1 connection) with one deadline timer for all of its
/// requests.
pub async fn drive<F: Future>(connection: F) -> F::Output {
    CLOCK
        .scope(ConnClock::default(), async move {
            let mut connection = pin!(connection);
            // A `Sleep` enters the timer wheel when first polled or reset, not when built.
            let mut timer = pin!(tokio::time::sleep_until(Instant::now()));
            let mut armed: Option<Instant> = None;
            poll_fn(|cx| {
                loop {
                    if let Poll::Ready(output) = connection.as_mut().poll(cx) {
                        return Poll::Ready(output);
                    }
                    let (deadline, expired) =
                        CLOCK.with(|clock| (clock.deadline.get(), clock.expired.get()));
                    let Some(deadline) = deadline else {
                        // Idle: a timer armed earlier may still fire; that only costs a
                        // spurious poll.
                        return Poll::Pending;
                    };
                    if expired {
                        // Marked; the request answers when hyper next polls it.
                        return Poll::Pending;
                    }
                    if armed.is_none_or(|at| at > deadline) {
                        timer.as_mut().reset(deadline);
                        armed = Some(deadline);
                    }
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    armed = None;
                    if Instant::now() >= deadline {
                        CLOCK.with(|clock| clock.expired.set(true));
                    }
                    // Poll the connection again: it answers the expired request, or the
                    // loop re-arms the timer at the later deadline.
                }
            })
            .await
        })
        .await
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

    /// The connection's timer is armed at the first request's deadline and never moved while
    /// requests finish in time; a later request that stalls must still get its 503, which
    /// takes the re-arm path (the timer fires at the first request's deadline first).
    #[tokio::test]
    async fn a_later_request_on_a_kept_alive_connection_still_times_out() {
        let router = Router::new()
            .route("/echo", post(|_: Bytes| async { StatusCode::ACCEPTED }))
            .layer(Observe::new(Duration::from_millis(300)));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            router,
            ServeOptions {
                header_read_timeout: Duration::from_secs(10),
                max_connections: 4,
                connect_info: false,
            },
            stop.clone(),
        ));
        let mut stream = TcpStream::connect(address).await.expect("connect");
        let request = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}";
        for _ in 0..3 {
            stream.write_all(request).await.expect("write");
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
}
