//! The HTTP API: every route and layer, listed in one place.
//!
//! A request passes, outermost first: the duration metric, the request timeout, then (when
//! configured) authorization and the per-client rate limit, the body limit, and the
//! handler. Guards that are not configured are not installed, so an open tally pays
//! nothing for them. Connection-level limits (header deadline, connection cap) live in
//! [`serve`].

pub mod auth;
pub mod body;
mod counters;
pub mod error;
mod health;
mod increment;
pub mod openapi;
pub mod rate_limit;
pub mod serve;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics::SharedString;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;

use crate::aggregate::Aggregator;
use crate::config::Ack;
use crate::flush::FlushHealth;
use crate::journal::Journal;
use crate::metrics as m;
use crate::store::Store;
use error::ApiError;

/// What every handler shares. Built once by `startup`.
pub struct AppState {
    pub aggregator: Arc<Aggregator>,
    pub store: Arc<dyn Store>,
    /// The journal appended to before acknowledging; `Some` exactly when `ack=journal`.
    pub journal: Option<Arc<Journal>>,
    pub instance_id: Arc<str>,
    pub ack: Ack,
    pub limits: body::Limits,
    /// Seq of the last batch in the store, published by the flusher; `ack=store` waits on it.
    pub applied: watch::Receiver<u64>,
    pub health: Arc<FlushHealth>,
    pub metrics: PrometheusHandle,
}

/// How the router is put together: limits and the optional guards.
#[derive(Clone)]
pub struct RouterOptions {
    /// `--max-body-bytes`.
    pub max_body_bytes: usize,
    /// `--request-timeout`: past it the request is answered `503 timeout`.
    pub request_timeout: Duration,
    /// Bearer-token authorization; `None` when no credential is configured.
    pub auth: Option<Arc<auth::Auth>>,
    /// Per-client rate limiting; `None` when off.
    pub rate_limit: Option<Arc<rate_limit::RateLimiter>>,
    /// Serve `/metrics` on this router (false when `--metrics-listen` moves it).
    pub metrics: bool,
    /// `--max-key-bytes`, for the API description.
    pub max_key_bytes: usize,
}

/// Builds the router: routes, JSON fallbacks for 404/405, and the layers listed in the
/// module doc.
pub fn router(state: Arc<AppState>, options: &RouterOptions) -> Router {
    let doc = openapi::Document::new(&openapi::DocOptions {
        max_key_bytes: options.max_key_bytes,
        auth: options.auth.is_some(),
        rate_limit: options.rate_limit.is_some(),
        metrics_here: options.metrics,
    });
    let mut router = Router::new()
        .route("/increment", post(increment::one))
        .route("/increments", post(increment::many))
        .route("/counters/{key}", get(counters::get))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/openapi.json", get(openapi::openapi_json).with_state(doc));
    if options.metrics {
        router = router.route("/metrics", get(health::metrics));
    }
    let mut router = router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(options.max_body_bytes));
    if let Some(limiter) = &options.rate_limit {
        router = router.layer(middleware::from_fn_with_state(
            Arc::clone(limiter),
            rate_limit::limit,
        ));
    }
    if let Some(auth) = &options.auth {
        router = router.layer(middleware::from_fn_with_state(
            Arc::clone(auth),
            auth::require,
        ));
    }
    router
        .layer(middleware::from_fn_with_state(
            options.request_timeout,
            request_timeout,
        ))
        .layer(middleware::from_fn(record_duration))
        .with_state(state)
}

/// The router of `--metrics-listen`: `/metrics` only, no token.
pub fn metrics_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(health::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Answers `503 timeout` (JSON, like every error) when the request, body included, takes
/// longer than `--request-timeout`. tower-http's `TimeoutLayer` would answer with an empty
/// body.
async fn request_timeout(State(limit): State<Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout.into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route; see the README for the API".to_owned())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Records each request's duration by route template (never the raw path: keys would make
/// unbounded label values), method and status.
async fn record_duration(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| match p.as_str() {
            "/increment" => "/increment",
            "/increments" => "/increments",
            "/counters/{key}" => "/counters/{key}",
            "/healthz" => "/healthz",
            "/readyz" => "/readyz",
            "/metrics" => "/metrics",
            "/openapi.json" => "/openapi.json",
            _ => "other",
        });
    let method = match *request.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        _ => "other",
    };
    let response = next.run(request).await;
    metrics::histogram!(
        m::HTTP_DURATION,
        "route" => route,
        "method" => method,
        "status" => status_label(response.status())
    )
    .record(started.elapsed());
    response
}

/// The status as a label value. The common codes are static strings, so the hot path does
/// not allocate for its metrics.
fn status_label(status: StatusCode) -> SharedString {
    let code: &'static str = match status.as_u16() {
        200 => "200",
        202 => "202",
        400 => "400",
        401 => "401",
        404 => "404",
        405 => "405",
        413 => "413",
        415 => "415",
        422 => "422",
        429 => "429",
        500 => "500",
        503 => "503",
        _ => return SharedString::from(status.as_str().to_owned()),
    };
    SharedString::from(code)
}
