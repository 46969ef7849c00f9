//! The HTTP API: every route and layer, listed in one place.

pub mod body;
mod counters;
pub mod error;
mod health;
mod increment;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
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

/// Builds the router: routes, JSON fallbacks for 404/405, body limit, request metrics.
pub fn router(state: Arc<AppState>, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/increment", post(increment::one))
        .route("/increments", post(increment::many))
        .route("/counters/{key}", get(counters::get))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn(record_duration))
        .with_state(state)
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
            _ => "other",
        });
    let method = request.method().clone();
    let response = next.run(request).await;
    metrics::histogram!(
        m::HTTP_DURATION,
        "route" => route,
        "method" => method.as_str().to_owned(),
        "status" => response.status().as_str().to_owned()
    )
    .record(started.elapsed());
    response
}
