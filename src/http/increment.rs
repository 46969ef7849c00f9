//! `POST /increment` and `POST /increments`: validate, add, make durable at the configured
//! ack level, answer 202.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::AppState;
use super::body::{self, Format, Wire};
use super::error::{ApiError, ErrorBody};
use crate::config::Ack;
use crate::key::Increment;
use crate::metrics::Metrics;

/// The request's Content-Type, the one header these handlers read. Extracted on its own
/// because axum's `HeaderMap` extractor clones every header of every request.
pub struct ContentType(Option<HeaderValue>);

impl ContentType {
    fn as_str(&self) -> Option<&str> {
        self.0.as_ref().and_then(|v| v.to_str().ok())
    }
}

impl ContentType {
    pub(super) fn of(parts: &Parts) -> Self {
        // A `HeaderValue` shares the bytes hyper read: cloning it does not allocate.
        Self(parts.headers.get(header::CONTENT_TYPE).cloned())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for ContentType {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self::of(parts))
    }
}

/// Refuses a request whose `Content-Length` is over `--max-body-bytes` before its body is
/// touched: hyper answers `Expect: 100-continue` when the body is first read, so a client
/// that asked first gets `413` at once instead of `100 Continue` and a refusal after
/// sending it all. Declared before the body in the handlers' arguments, it runs first.
///
/// It also reserves the body's room in the [`BodyBudget`] (`--max-body-memory`); the handler
/// drops it once the body is parsed.
pub struct BodyWithinLimit {
    _room: Option<OwnedSemaphorePermit>,
}

impl FromRequestParts<Arc<AppState>> for BodyWithinLimit {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        Self::check(parts, state)
    }
}

impl BodyWithinLimit {
    pub(super) fn check(parts: &Parts, state: &AppState) -> Result<Self, ApiError> {
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let max = state.limits.max_body_bytes;
        match declared {
            Some(length) if length > max as u64 => Err(ApiError::TooLarge(format!(
                "request body of {length} bytes is larger than the limit of {max} (--max-body-bytes)",
            ))),
            // Within the limit, so it fits a usize; a body of unknown length may reach it.
            Some(length) => state.body_budget.reserve(length as usize),
            None => state.body_budget.reserve(max),
        }
        .map(|room| Self { _room: room })
    }
}

/// Bodies up to this size are not counted against `--max-body-memory`: every increment is
/// far below it, so the hot path takes no shared lock, and what such bodies can hold is
/// bounded by `--max-connections` × this (64 MiB at the defaults).
pub const SMALL_BODY_BYTES: usize = 16 * 1024;

/// The room all request bodies being read may take at once (`--max-body-memory`). A body
/// is buffered whole before it is parsed, so without it the bound would be
/// `--max-connections` × `--max-body-bytes` (16 GiB at the defaults) for as long as
/// `--request-timeout`: 60 clients each sending 4 MiB − 1 of a body held 260 MB. A request
/// that finds no room is answered `503 overloaded` with `Retry-After` at once, before its
/// body is read, rather than queued holding its connection.
///
/// A tokio `Semaphore` of KiB permits, because `acquire_many` counts in `u32`.
pub struct BodyBudget {
    permits: Arc<Semaphore>,
    limit: usize,
    /// Seconds since `epoch` of the last "budget exhausted" warning (one per minute at most).
    warned_at: AtomicU64,
    epoch: std::time::Instant,
}

impl BodyBudget {
    /// A budget of `limit` bytes (rounded down to whole KiB).
    pub fn new(limit: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new((limit / 1024).min(Semaphore::MAX_PERMITS))),
            limit,
            warned_at: AtomicU64::new(u64::MAX),
            epoch: std::time::Instant::now(),
        }
    }

    /// Reserves room for a body of `len` bytes; `None` for a small one (nothing to hold).
    ///
    /// # Errors
    ///
    /// `ApiError::BodiesFull` when the budget has no room for it now.
    pub fn reserve(&self, len: usize) -> Result<Option<OwnedSemaphorePermit>, ApiError> {
        if len <= SMALL_BODY_BYTES {
            return Ok(None);
        }
        let kib = u32::try_from(len.div_ceil(1024)).unwrap_or(u32::MAX);
        match Arc::clone(&self.permits).try_acquire_many_owned(kib) {
            Ok(permit) => Ok(Some(permit)),
            Err(_) => {
                self.warn_full();
                Err(ApiError::BodiesFull { limit: self.limit })
            }
        }
    }

    fn warn_full(&self) {
        let now = self.epoch.elapsed().as_secs();
        let last = self.warned_at.load(Ordering::Relaxed);
        if (last == u64::MAX || now >= last + 60)
            && self
                .warned_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                limit_bytes = self.limit,
                "Request bodies being read fill --max-body-memory; refusing large bodies with \
                 503 until some finish (logged at most once a minute; counted in \
                 tally_rejected_total{{reason=\"overloaded\"}})."
            );
        }
    }
}

/// Add a delta to one counter.
///
/// The body is one JSON object or a form. `202` with an empty body once the delta is
/// accepted at the configured durability level (`--ack`).
#[utoipa::path(
    post,
    path = "/increment",
    tag = "ingest",
    request_body(
        description = "One increment, as JSON or as a form (`key=abc&value=5`).",
        content(
            (Wire = "application/json"),
            (Wire = "application/x-www-form-urlencoded"),
        )
    ),
    responses(
        (status = 202, description = "Accepted; empty body."),
        (status = 400, description = "The body is not well-formed JSON.", body = ErrorBody),
        (status = 413, description = "The body is larger than `--max-body-bytes`.", body = ErrorBody),
        (status = 415, description = "Content-Type is neither JSON nor a form.", body = ErrorBody),
        (status = 422, description = "A field is missing, has the wrong type or an invalid value, \
            or adding the value would overflow the key's pending 64-bit sum.", body = ErrorBody),
        (status = 503, description = "Shedding load (pending-key cap), shutting down, fenced off, journal unavailable, timed out or an unknown outcome.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying (absent on `timeout` and `unknown_outcome`)."))),
    )
)]
pub async fn one(
    State(state): State<Arc<AppState>>,
    content_type: ContentType,
    room: BodyWithinLimit,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    accept_one(
        &state,
        content_type,
        room,
        body.map_err(ApiError::from_body),
    )
    .await
}

/// [`one`] once its parts are extracted; the hot route ([`super::hot`]) calls it directly.
#[tracing::instrument(level = "debug", name = "POST /increment", skip_all)]
pub(super) async fn accept_one(
    state: &AppState,
    content_type: ContentType,
    room: BodyWithinLimit,
    body: Result<Bytes, ApiError>,
) -> Result<StatusCode, ApiError> {
    let format = body::format(content_type.as_str(), &[Format::Json, Format::Form])?;
    let body = body?;
    let item = body::parse_one(format, &body, &state.limits)?;
    // Parsed into an owned item: the body's bytes, the Content-Type (both share hyper's
    // read buffer) and the body's room in the budget go now, not after the durability wait
    // below.
    drop((body, content_type, room));
    ingest(state, std::slice::from_ref(&item)).await?;
    Ok(StatusCode::ACCEPTED)
}

/// The answer to `POST /increments`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Accepted {
    /// Number of increments accepted (all of the batch).
    #[schema(minimum = 0)]
    pub accepted: usize,
}

/// Add deltas to many counters, all or none.
///
/// The body is a JSON array of increments or NDJSON (one JSON object per line). Every item
/// is validated before any is applied. `202 {"accepted": N}`.
#[utoipa::path(
    post,
    path = "/increments",
    tag = "ingest",
    request_body(
        description = "A batch of at most `--max-batch-items` increments (default 10,000): a \
                       JSON array, or NDJSON with one increment object per line (blank lines \
                       are skipped).",
        content(
            (Vec<Wire> = "application/json"),
            (Vec<Wire> = "application/x-ndjson",
                example = json!([{"key": "a", "value": 1}, {"key": "b", "value": -2}])),
        )
    ),
    responses(
        (status = 202, description = "Every item accepted.", body = Accepted),
        (status = 400, description = "The body (or an NDJSON line) is not well-formed JSON.", body = ErrorBody),
        (status = 413, description = "The body or the batch is larger than allowed.", body = ErrorBody),
        (status = 415, description = "Content-Type is neither JSON nor NDJSON.", body = ErrorBody),
        (status = 422, description = "An item is invalid, or would overflow its key's pending \
            64-bit sum; nothing was applied.", body = ErrorBody),
        (status = 503, description = "Shedding load (pending-key cap), shutting down, fenced off, journal unavailable, timed out or an unknown outcome.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying (absent on `timeout` and `unknown_outcome`)."))),
    )
)]
#[tracing::instrument(level = "debug", name = "POST /increments", skip_all)]
pub async fn many(
    State(state): State<Arc<AppState>>,
    content_type: ContentType,
    room: BodyWithinLimit,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let format = body::format(content_type.as_str(), &[Format::Json, Format::Ndjson])?;
    let body = body.map_err(ApiError::from_body)?;
    let items = body::parse_many(format, &body, &state.limits)?;
    // Parsed into owned items: the body's bytes and their room in the budget go now, not
    // after the durability wait below.
    drop((body, room));
    if !items.is_empty() {
        ingest(&state, &items).await?;
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            accepted: items.len(),
        }),
    ))
}

/// Adds `items` to the aggregator (all or none), then waits for the configured durability.
async fn ingest(state: &AppState, items: &[Increment]) -> Result<(), ApiError> {
    if state.health.fenced().is_some() {
        return Err(ApiError::Fenced);
    }
    // Nothing is added while the journal cannot write: the client hears so and retries.
    if let Some(failure) = state
        .journal
        .as_ref()
        .filter(|j| j.is_failed())
        .and_then(|j| j.failure())
    {
        return Err(ApiError::JournalUnavailable(failure));
    }
    let seq = match items {
        [one] => state.aggregator.add(&one.key, one.delta)?,
        _ => state.aggregator.add_all(items)?,
    };
    match state.ack {
        Ack::Memory => {}
        Ack::Journal => {
            let journal = state.journal.as_ref().ok_or_else(|| {
                ApiError::Internal(anyhow::anyhow!("ack=journal without a journal"))
            })?;
            // Added, but not durable: the outcome is unknown to the client.
            journal
                .append(seq, items)
                .await
                .map_err(ApiError::NotDurable)?;
        }
        Ack::Store => {
            state.aggregator.request_flush();
            state.applied.wait_for(seq).await.map_err(|_| {
                // The flusher stopped before the batch was applied: fenced off, or shut down.
                match state.health.fenced() {
                    Some(_) => ApiError::Fenced,
                    None => ApiError::ShuttingDown,
                }
            })?;
        }
    }
    Metrics::global().increments.increment(items.len() as u64);
    Ok(())
}
