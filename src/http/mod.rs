//! The HTTP API: every route and layer, listed in one place.
//!
//! A request passes, outermost first: `observe` (the duration metric and the request
//! timeout, in one layer), then (when configured) authorization and the per-client rate
//! limit (`guard`), the body limit, and the handler. Guards that are not configured are
//! not installed, so an open tally pays nothing for them. None of these layers allocates per
//! request. `POST /increment` passes the same layers without the routing ([`hot`]). Connection-level limits (header deadline, connection cap) live in [`serve`];
//! both deadlines share one timer per connection (`deadline`).

pub(crate) mod auth;
pub mod body;
mod counters;
pub(crate) mod deadline;
pub(crate) mod error;
pub(crate) mod guard;
pub mod hot;
mod increment;
pub use increment::{BodyBudget, SMALL_BODY_BYTES};
pub(crate) mod observe;
pub(crate) mod openapi;
mod probes;
pub(crate) mod rate_limit;
mod scrape;
pub mod serve;
pub mod threads;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::aggregate::Aggregator;
use crate::config::Ack;
use crate::flush::FlushHealth;
use crate::journal::Journal;
use crate::store::{Store, StoreError};
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
    /// `--max-body-memory`: room for the request bodies being read.
    pub body_budget: increment::BodyBudget,
    /// Seq of the last batch in the store, published by the flusher; `ack=store` waits on it.
    pub applied: Arc<crate::applied::AppliedSeq>,
    pub health: Arc<FlushHealth>,
    pub metrics: PrometheusHandle,
    /// Cancelled when shutdown begins: `/readyz` answers 503 `shutting_down` (while
    /// `--shutdown-delay` keeps serving) and responses carry `Connection: close`.
    pub draining: tokio_util::sync::CancellationToken,
    /// The runtime that owns the store's connections, and runs the flusher unless the
    /// store [wants a thread of its own](crate::store::Store::wants_own_thread); see
    /// [`AppState::on_store_runtime`].
    pub store_runtime: tokio::runtime::Handle,
}

impl AppState {
    /// Runs a store call made for a request (a read, a ping) on [`Self::store_runtime`]
    /// rather than on the request's serving thread ([`threads`]). A PostgreSQL connection
    /// the pool opened there would be driven by that thread's runtime, which ends before
    /// the final flush while the flusher may hold that connection; and SQLite's blocking
    /// reads would start a blocking pool on every serving thread.
    pub(crate) async fn on_store_runtime<T, F>(
        &self,
        call: impl FnOnce(Arc<dyn Store>) -> F,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        self.store_runtime
            .spawn(call(Arc::clone(&self.store)))
            .await
            .map_err(StoreError::unavailable)?
    }
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
        .route("/healthz", get(probes::healthz))
        .route("/readyz", get(probes::readyz))
        .route("/openapi.json", get(openapi::openapi_json).with_state(doc));
    if options.metrics {
        router = router.route("/metrics", get(scrape::metrics));
    }
    let mut router = router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(options.max_body_bytes));
    if let Some(limiter) = &options.rate_limit {
        router = router.layer(guard::GuardLayer::new(Arc::clone(limiter)));
    }
    if let Some(auth) = &options.auth {
        router = router.layer(guard::GuardLayer::new(Arc::clone(auth)));
    }
    router
        .layer(observe::Observe::new(options.request_timeout))
        .with_state(state)
}

/// What the main listener serves: the [`router`], with `POST /increment` taken off it by
/// the [`hot`] route (the same layers and handler, without the routing).
pub fn app(state: Arc<AppState>, options: &RouterOptions) -> serve::App {
    // The router's order: authorization first, then the rate limit.
    let guards: Vec<Arc<dyn guard::Guard>> = [
        options.auth.clone().map(|a| a as Arc<dyn guard::Guard>),
        options
            .rate_limit
            .clone()
            .map(|r| r as Arc<dyn guard::Guard>),
    ]
    .into_iter()
    .flatten()
    .collect();
    let hot = hot::HotIncrement::new(Arc::clone(&state), guards, options.request_timeout);
    serve::App::new(router(state, options), Some(hot))
}

/// The router of `--metrics-listen`: `/metrics` only, no token.
pub fn metrics_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(scrape::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route; see the README for the API".to_owned())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
