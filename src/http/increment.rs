//! `POST /increment` and `POST /increments`: validate, add, make durable at the configured
//! ack level, answer 202.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use serde_json::{Value, json};

use super::AppState;
use super::body::{self, Format};
use super::error::ApiError;
use crate::config::Ack;
use crate::key::Increment;
use crate::metrics as m;

fn content_type(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
}

/// `POST /increment`: one JSON object or form. 202, empty body.
#[tracing::instrument(name = "POST /increment", skip_all)]
pub async fn one(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, ApiError> {
    let format = body::format(content_type(&headers), &[Format::Json, Format::Form])?;
    let body = body.map_err(ApiError::from_body)?;
    let item = body::parse_one(format, &body, &state.limits)?;
    ingest(&state, std::slice::from_ref(&item)).await?;
    Ok(StatusCode::ACCEPTED)
}

/// `POST /increments`: a JSON array or NDJSON; all items or none. 202 `{"accepted": N}`.
#[tracing::instrument(name = "POST /increments", skip_all)]
pub async fn many(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let format = body::format(content_type(&headers), &[Format::Json, Format::Ndjson])?;
    let body = body.map_err(ApiError::from_body)?;
    let items = body::parse_many(format, &body, &state.limits)?;
    if !items.is_empty() {
        ingest(&state, &items).await?;
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "accepted": items.len() })),
    ))
}

/// Adds `items` to the aggregator (all or none), then waits for the configured durability.
async fn ingest(state: &AppState, items: &[Increment]) -> Result<(), ApiError> {
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
            let entries: Vec<(&str, i64)> =
                items.iter().map(|i| (i.key.as_str(), i.delta)).collect();
            journal
                .append(seq, &entries)
                .await
                .map_err(|e| ApiError::Internal(e.into()))?;
        }
        Ack::Store => {
            state.aggregator.request_flush();
            let mut applied = state.applied.clone();
            applied
                .wait_for(|&s| s >= seq)
                .await
                .map_err(|_| ApiError::ShuttingDown)?;
        }
    }
    metrics::counter!(m::INCREMENTS).increment(items.len() as u64);
    Ok(())
}
