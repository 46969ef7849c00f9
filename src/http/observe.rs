//! The one layer every request passes first: it records the request's duration by route,
//! method and status, and answers `503 timeout` (JSON, like every error) when the request,
//! body included, is not answered within `--request-timeout`.
//!
//! A hand-written tower `Layer` rather than two `axum::middleware::from_fn`: each of those
//! clones the inner service into a box and boxes its future for every request, and the
//! pair was a visible share of the cost of `POST /increment`. This one adds no allocation:
//! its future is a plain struct around the route's, the metric handle comes from a fixed
//! table ([`crate::metrics::Metrics::record_request`]), and the deadline is watched by the
//! connection's timer ([`super::deadline`]). tower-http's `TimeoutLayer` would answer with
//! an empty body and arm a timer per request.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use tokio::time::Instant;
use tower::{Layer, Service};

use super::deadline::Deadline;
use super::error::ApiError;
use crate::metrics::{Metrics, http};

/// Duration metric + request deadline; see the module doc.
#[derive(Debug, Clone, Copy)]
pub struct Observe {
    timeout: Duration,
}

impl Observe {
    /// Answers requests not done within `timeout` with `503 timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl<S> Layer<S> for Observe {
    type Service = ObserveService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ObserveService {
            inner,
            timeout: self.timeout,
        }
    }
}

/// The service of [`Observe`].
#[derive(Debug, Clone)]
pub struct ObserveService<S> {
    inner: S,
    timeout: Duration,
}

impl<S> Service<Request> for ObserveService<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
    S::Future: Unpin,
{
    type Response = Response;
    type Error = Infallible;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let started = Instant::now();
        // The route template, never the raw path: keys would make unbounded label values.
        let route = request
            .extensions()
            .get::<MatchedPath>()
            .map_or(http::index(http::ROUTES, "unmatched"), |path| {
                http::index(http::ROUTES, path.as_str())
            });
        let method = match *request.method() {
            Method::GET => 0,
            Method::POST => 1,
            _ => 2,
        };
        ObserveFuture::new(
            self.inner.call(request),
            started,
            self.timeout,
            route,
            method,
        )
    }
}

/// The future of [`ObserveService`].
pub struct ObserveFuture<F> {
    inner: F,
    deadline: Deadline,
    started: Instant,
    route: usize,
    method: usize,
}

impl<F> ObserveFuture<F> {
    /// Watches `inner`, a request of `route` and `method` (indexes into [`http::ROUTES`] and
    /// [`http::METHODS`]) that came at `started` and must be answered within `timeout`.
    pub fn new(inner: F, started: Instant, timeout: Duration, route: usize, method: usize) -> Self {
        Self {
            inner,
            deadline: Deadline::start(started + timeout),
            started,
            route,
            method,
        }
    }
}

impl<F> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Response, Infallible>> + Unpin,
{
    type Output = Result<Response, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let response = match Pin::new(&mut this.inner).poll(cx) {
            Poll::Ready(Ok(response)) => response,
            Poll::Ready(Err(never)) => match never {},
            Poll::Pending if this.deadline.poll_expired(cx) => ApiError::Timeout.into_response(),
            Poll::Pending => return Poll::Pending,
        };
        this.deadline.finish();
        Metrics::global().record_request(
            this.route,
            this.method,
            response.status().as_u16(),
            this.started.elapsed().as_secs_f64(),
        );
        Poll::Ready(Ok(response))
    }
}
