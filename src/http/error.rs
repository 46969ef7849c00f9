//! The one HTTP error type: every failure a client can see, mapped to a status and the JSON
//! body `{"error": "<code>", "message": "<what to fix>"}`.
//!
//! 4xx messages tell the client what to change. 5xx bodies stay generic; the cause chain goes
//! to the log.

use axum::Json;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::aggregate::AddError;
use crate::metrics::Metrics;
use crate::store::StoreError;

/// Seconds a client should wait before retrying a 503.
const RETRY_AFTER_SECONDS: &str = "1";

/// Every error an HTTP client can get from tally.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not well-formed JSON / NDJSON. 400.
    #[error("{0}")]
    Malformed(String),
    /// The body is well-formed but a field is missing, has the wrong type or an invalid
    /// value. 422.
    #[error("{0}")]
    Invalid(String),
    /// The Content-Type is missing or not one this route reads. 415.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The body or the batch is larger than the configured limit. 413.
    #[error("{0}")]
    TooLarge(String),
    /// No such key or route. 404.
    #[error("{0}")]
    NotFound(String),
    /// The route exists but not with this method. 405.
    #[error("this route does not accept that method")]
    MethodNotAllowed,
    /// Pending-key cap reached: back-pressure. 503 with `Retry-After`.
    #[error(transparent)]
    Shedding(AddError),
    /// Request bodies being read fill `--max-body-memory`: this one is refused before it
    /// is read. 503 `overloaded` with `Retry-After`.
    #[error("request bodies being read fill the memory allowed for them ({limit} bytes)")]
    BodiesFull { limit: usize },
    /// The store cannot be read right now. 503 with `Retry-After`.
    #[error("the store is unavailable")]
    StoreUnavailable(#[source] StoreError),
    /// Another process claimed this instance's id, or the store lost its claim or batches
    /// (see `StoreError::WentBack`, `StoreError::LostBatches`): it writes nothing more, so it accepts
    /// nothing. 503 with `Retry-After` (a retry through the load balancer reaches another
    /// instance; `/readyz` takes this one out).
    #[error("this instance was fenced off")]
    Fenced,
    /// `ack=journal` and the journal cannot write (a full disk, an I/O error): nothing was
    /// added. 503 with `Retry-After`; tally recovers by itself once the disk takes writes.
    #[error("the journal cannot write")]
    JournalUnavailable(#[source] crate::journal::JournalError),
    /// The delta was added in memory but the journal failed to make it durable: it may or
    /// may not be counted. 503 without `Retry-After`, like [`ApiError::Timeout`], so that a
    /// careful client does not retry blindly.
    #[error("the increment could not be made durable")]
    NotDurable(#[source] crate::journal::JournalError),
    /// The instance is shutting down and can no longer confirm this request. 503.
    #[error("tally is shutting down")]
    ShuttingDown,
    /// Authorization is configured and the request carries no valid bearer token. 401 with
    /// `WWW-Authenticate: Bearer` (RFC 6750: with `error="invalid_token"` when a token was
    /// sent but refused).
    #[error("{message}")]
    Unauthorized {
        message: String,
        /// A token was presented (and refused), as opposed to missing.
        token_presented: bool,
    },
    /// This client is over its rate limit. 429 with `Retry-After`: whole seconds until the
    /// next request would be let through.
    #[error("rate limit exceeded; retry after {retry_after_seconds}s")]
    RateLimited { retry_after_seconds: u64 },
    /// The request did not finish within `--request-timeout`. 503, without `Retry-After`:
    /// an increment may or may not have been applied, so a blind retry could count twice.
    #[error("the request did not finish in time")]
    Timeout,
    /// Anything else: a bug or a local failure (e.g. the journal's disk). 500.
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

/// The body of every error response.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(example = json!({"error": "invalid_value", "message": "item 0: key must not be empty"}))]
pub struct ErrorBody {
    /// A short, stable code: what went wrong.
    #[schema(value_type = String, example = "invalid_value", pattern = "^[a-z_]+$")]
    pub error: &'static str,
    /// What to fix, for people.
    pub message: String,
}

/// Every `error` code of [`ErrorBody`], for the API description.
pub const ERROR_CODES: &[&str] = &[
    "malformed_body",
    "invalid_value",
    "unsupported_media_type",
    "too_large",
    "not_found",
    "method_not_allowed",
    "overloaded",
    "store_unavailable",
    "shutting_down",
    "fenced",
    "journal_unavailable",
    "unknown_outcome",
    "unauthorized",
    "rate_limited",
    "timeout",
    "not_ready",
    "internal",
];

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Malformed(_) => (StatusCode::BAD_REQUEST, "malformed_body"),
            Self::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_value"),
            Self::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
            }
            Self::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Self::Shedding(_) | Self::BodiesFull { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "overloaded")
            }
            Self::StoreUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            Self::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            Self::Fenced => (StatusCode::SERVICE_UNAVAILABLE, "fenced"),
            Self::JournalUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "journal_unavailable"),
            Self::NotDurable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unknown_outcome"),
            Self::Unauthorized { .. } => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Self::Timeout => (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    /// Maps axum's body rejection: too large (413) or unreadable (400).
    pub fn from_body(rejection: BytesRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Self::body_too_large()
        } else {
            Self::body_unreadable(&rejection.body_text())
        }
    }

    /// 413 for a body that outgrew `--max-body-bytes` while being read.
    pub fn body_too_large() -> Self {
        Self::TooLarge("request body is larger than the limit (--max-body-bytes)".to_owned())
    }

    /// 400 for a body that could not be read (the client broke off, or sent bad chunks).
    pub fn body_unreadable(error: &dyn std::fmt::Display) -> Self {
        Self::Malformed(format!("could not read the request body: {error}"))
    }

    /// Maps axum's path rejection (e.g. a percent-encoded key that is not UTF-8): 400.
    pub fn from_path(rejection: PathRejection) -> Self {
        Self::Malformed(format!("bad path: {}", rejection.body_text()))
    }
}

impl From<AddError> for ApiError {
    fn from(e: AddError) -> Self {
        match e {
            AddError::Overflow { .. } => Self::Invalid(e.to_string()),
            AddError::Full { .. } => Self::Shedding(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let extra_header = match &self {
            ApiError::Shedding(_)
            | ApiError::BodiesFull { .. }
            | ApiError::StoreUnavailable(_)
            | ApiError::ShuttingDown
            | ApiError::Fenced
            | ApiError::JournalUnavailable(_) => Some((
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECONDS),
            )),
            ApiError::RateLimited {
                retry_after_seconds,
            } => Some((header::RETRY_AFTER, HeaderValue::from(*retry_after_seconds))),
            ApiError::Unauthorized {
                token_presented, ..
            } => Some((
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(if *token_presented {
                    r#"Bearer realm="tally", error="invalid_token""#
                } else {
                    r#"Bearer realm="tally""#
                }),
            )),
            _ => None,
        };
        if let ApiError::Shedding(_) = &self {
            Metrics::global().shed.increment(1);
        }
        let bodies_full = matches!(self, ApiError::BodiesFull { .. }).then(|| self.to_string());
        let message = if status.is_server_error() {
            // A refusal that follows from the instance's state (load shedding, a store or
            // journal outage, a fence, a shutdown) is logged where the state changes, once:
            // a line per refused request would bury that one.
            if matches!(
                code,
                "overloaded"
                    | "store_unavailable"
                    | "shutting_down"
                    | "fenced"
                    | "journal_unavailable"
            ) {
                tracing::debug!(code, "Request refused.");
            } else {
                tracing::warn!(error = ?anyhow::Error::from(self), code, "Request failed.");
            }
            match code {
                "overloaded" => match bodies_full {
                    Some(full) => {
                        format!("{full} (--max-body-memory); retry after the Retry-After delay")
                    }
                    None => {
                        "too many keys are pending; retry after the Retry-After delay".to_owned()
                    }
                },
                "store_unavailable" => "the store is unavailable; retry later".to_owned(),
                "shutting_down" => "tally is shutting down; retry on another instance".to_owned(),
                "fenced" => "this instance no longer writes as its id (--instance-id): \
                             another process claimed it, or the store went back in time (/readyz \
                             says which); retry on another instance"
                    .to_owned(),
                "journal_unavailable" => "the journal cannot write (e.g. a full disk); nothing \
                                          was counted; retry after the Retry-After delay"
                    .to_owned(),
                "unknown_outcome" => "the increment was taken but could not be made durable \
                                      (journal write failed); it may or may not be counted, so \
                                      do not retry it blindly"
                    .to_owned(),
                "timeout" => "the request did not finish within the request timeout \
                              (--request-timeout); an increment may or may not have been applied"
                    .to_owned(),
                _ => "internal error; see the server log".to_owned(),
            }
        } else {
            self.to_string()
        };
        Metrics::global().rejected(code).increment(1);
        let mut response = (
            status,
            Json(ErrorBody {
                error: code,
                message,
            }),
        )
            .into_response();
        if let Some((name, value)) = extra_header {
            response.headers_mut().insert(name, value);
        }
        response
    }
}
