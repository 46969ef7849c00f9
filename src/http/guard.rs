//! The optional request guards (authorization, per-client rate limit) as one small tower
//! layer.
//!
//! Both guards decide from the request alone, without awaiting anything, so they need no
//! async middleware: `axum::middleware::from_fn` would clone the inner service into a box
//! and box a future for every request. [`GuardLayer`] calls [`Guard::check`] and either
//! answers at once or returns the route's own future, with no allocation of its own. A guard
//! that is not configured is not installed at all.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use tower::{Layer, Service};

use super::error::ApiError;

/// A synchronous check in front of the routes.
pub trait Guard: Send + Sync + 'static {
    /// `Ok` lets the request through (the guard may annotate it, e.g. with the
    /// authenticated subject).
    ///
    /// # Errors
    ///
    /// The refusal the request gets as its answer.
    fn check(&self, request: &mut Request) -> Result<(), ApiError>;
}

/// Installs a [`Guard`] in front of every route.
pub struct GuardLayer<G> {
    guard: Arc<G>,
}

impl<G> GuardLayer<G> {
    pub fn new(guard: Arc<G>) -> Self {
        Self { guard }
    }
}

impl<G> Clone for GuardLayer<G> {
    fn clone(&self) -> Self {
        Self {
            guard: Arc::clone(&self.guard),
        }
    }
}

impl<G, S> Layer<S> for GuardLayer<G> {
    type Service = GuardService<G, S>;

    fn layer(&self, inner: S) -> Self::Service {
        GuardService {
            guard: Arc::clone(&self.guard),
            inner,
        }
    }
}

/// The service of [`GuardLayer`].
pub struct GuardService<G, S> {
    guard: Arc<G>,
    inner: S,
}

impl<G, S: Clone> Clone for GuardService<G, S> {
    fn clone(&self) -> Self {
        Self {
            guard: Arc::clone(&self.guard),
            inner: self.inner.clone(),
        }
    }
}

impl<G, S> Service<Request> for GuardService<G, S>
where
    G: Guard,
    S: Service<Request, Response = Response, Error = Infallible>,
    S::Future: Unpin,
{
    type Response = Response;
    type Error = Infallible;
    type Future = GuardFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        match self.guard.check(&mut request) {
            Ok(()) => GuardFuture::Passed(self.inner.call(request)),
            Err(refusal) => GuardFuture::Refused(Some(refusal.into_response())),
        }
    }
}

/// The future of [`GuardService`]: the route's, or the refusal.
pub enum GuardFuture<F> {
    Passed(F),
    Refused(Option<Response>),
}

impl<F> Future for GuardFuture<F>
where
    F: Future<Output = Result<Response, Infallible>> + Unpin,
{
    type Output = Result<Response, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut *self {
            Self::Passed(inner) => Pin::new(inner).poll(cx),
            Self::Refused(refusal) => match refusal.take() {
                Some(response) => Poll::Ready(Ok(response)),
                // Polled again after completing: a caller bug; answer as a server error
                // rather than panic.
                None => Poll::Ready(Ok(ApiError::Internal(anyhow::anyhow!(
                    "guard future polled after completion"
                ))
                .into_response())),
            },
        }
    }
}
