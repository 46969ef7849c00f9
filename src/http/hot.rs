//! `POST /increment`, the route nearly every request takes, served without the router.
//!
//! Through axum's `Router` a request pays for what this one route does not need: the path
//! lookup and its `MatchedPath` and URL-parameter extensions, two boxed services cloned per
//! request (the route's and its method router's), a `Oneshot` and the body-limit layer's
//! extension, each of them polled again when the request waits for the journal. Here the
//! connection's service ([`super::serve`]) recognises the route by method and path and
//! calls the same pieces directly: the `Observe` future of `http::observe` (duration metric
//! and request deadline, labelled `/increment`), the guards in the router's order
//! (authorization, then the rate limit), the same extractors' checks and the same handler
//! body. Every other request, `/increment` with another method included, goes to the router
//! as before, so 404, 405 and their metrics are unchanged.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::time::Instant;

use super::AppState;
use super::error::ApiError;
use super::guard::Guard;
use super::increment::{self, BodyWithinLimit, ContentType};
use super::observe::ObserveFuture;
use crate::metrics::http;

/// The future of one hot request.
pub type HotFuture =
    ObserveFuture<Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>>;

/// `POST /increment` with its layers; see the module doc.
pub struct HotIncrement {
    state: Arc<AppState>,
    /// In the order the router applies them.
    guards: Vec<Arc<dyn Guard>>,
    timeout: Duration,
    route: usize,
}

impl HotIncrement {
    pub(super) fn new(
        state: Arc<AppState>,
        guards: Vec<Arc<dyn Guard>>,
        timeout: Duration,
    ) -> Self {
        Self {
            state,
            guards,
            timeout,
            route: http::index(http::ROUTES, "/increment"),
        }
    }

    /// Whether `request` is one for this route.
    pub fn serves<B>(request: &axum::http::Request<B>) -> bool {
        request.method() == Method::POST && request.uri().path() == "/increment"
    }

    /// Answers `request` (one that [`Self::serves`]).
    pub fn call(&self, mut request: Request) -> HotFuture {
        let started = Instant::now();
        let post = http::index(http::METHODS, "POST");
        let refused = self.guards.iter().find_map(|g| g.check(&mut request).err());
        let answer: Pin<Box<dyn Future<Output = _> + Send>> = match refused {
            Some(refusal) => Box::pin(std::future::ready(Ok(refusal.into_response()))),
            None => {
                let state = Arc::clone(&self.state);
                Box::pin(async move { Ok(accept(&state, request).await.into_response()) })
            }
        };
        ObserveFuture::new(answer, started, self.timeout, self.route, post)
    }
}

/// What the router's handler does with its extractors, without them.
async fn accept(state: &AppState, request: Request) -> Result<axum::http::StatusCode, ApiError> {
    let (parts, body) = request.into_parts();
    let content_type = ContentType::of(&parts);
    let room = BodyWithinLimit::check(&parts, state)?;
    // The header values share hyper's read buffer. Dropped here, before any wait, they
    // leave hyper the only owner of that buffer, so it reads the next request into it
    // again; held across the journal's wait, they made hyper allocate a new buffer for its
    // keep-alive read and the old one was freed later, often on another worker.
    drop(parts);
    let body = read(body, state.limits.max_body_bytes).await;
    increment::accept_one(state, content_type, room, body).await
}

/// The whole body, at most `max` bytes; the errors are the router's body extractor's.
async fn read(body: Body, max: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(ApiError::body_too_large()),
        Err(e) => Err(ApiError::body_unreadable(&e)),
    }
}
