//! `GET /openapi.json`: the OpenAPI 3.1 description of the running API.
//!
//! Generated from the code, so it cannot drift: each handler carries a `#[utoipa::path]`
//! annotation next to its signature, and the request, response and error bodies derive
//! `ToSchema` from the very structs the handlers (de)serialize. [`document`] then fits the
//! description to this instance's configuration: the key length limit, the bearer scheme
//! and `401` when authorization is on, `429` when rate limiting is on, the `503` request
//! timeout on every operation, and `/metrics` only where it is served.
//!
//! The document is rendered once at start-up; serving it is a clone of a shared buffer.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use serde_json::{Value, json};
use utoipa::OpenApi;

use super::body::Wire;
use super::counters::Counter;
use super::error::{ERROR_CODES, ErrorBody};
use super::increment::Accepted;
use super::probes::Status;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tally",
        description = "A counter service: POST deltas, tally sums them in memory and writes \
                       the sums to its database in batches. Every error is JSON \
                       `{\"error\": code, \"message\": text}`.",
        license(name = "See the repository")
    ),
    paths(
        super::increment::one,
        super::increment::many,
        super::counters::get,
        super::probes::healthz,
        super::probes::readyz,
        super::scrape::metrics,
        openapi_json,
    ),
    components(schemas(Wire, Accepted, Counter, ErrorBody, Status)),
    tags(
        (name = "ingest", description = "Adding to counters."),
        (name = "read", description = "Reading counters."),
        (name = "operations", description = "Health, readiness, metrics and this document."),
    )
)]
struct ApiDoc;

/// What of the configuration shows in the API description.
#[derive(Debug, Clone, Copy)]
pub struct DocOptions {
    /// `--max-key-bytes`.
    pub max_key_bytes: usize,
    /// A bearer token is required (`--auth-token` or a JWT key).
    pub auth: bool,
    /// Per-client rate limiting is on.
    pub rate_limit: bool,
    /// `/metrics` is served on the main listener (no `--metrics-listen`).
    pub metrics_here: bool,
}

/// The OpenAPI document of an instance configured as `options` describes.
pub fn document(options: &DocOptions) -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_else(|e| {
        // Serializing a tree of strings and maps cannot fail; keep serving regardless.
        tracing::error!(error = %e, "Cannot render the OpenAPI document.");
        json!({})
    });
    if !options.metrics_here
        && let Some(paths) = doc["paths"].as_object_mut()
    {
        paths.remove("/metrics");
    }
    // The key limit is a flag; the annotations carry the default.
    let max_key = json!(options.max_key_bytes);
    doc["components"]["schemas"]["Increment"]["properties"]["key"]["maxLength"] = max_key.clone();
    if let Some(params) = doc["paths"]["/counters/{key}"]["get"]["parameters"].as_array_mut() {
        for param in params {
            param["schema"]["maxLength"] = max_key.clone();
        }
    }
    doc["components"]["schemas"]["ErrorBody"]["properties"]["error"]["enum"] = json!(ERROR_CODES);
    if options.auth {
        doc["components"]["securitySchemes"] = json!({
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "The static token (--auth-token) or a JWT signed with the \
                                configured key (--jwt-secret, --jwt-public-key)."
            }
        });
        doc["security"] = json!([{ "bearer": [] }]);
    }
    add_common_responses(&mut doc, options);
    doc
}

/// Adds the answers any operation can give, depending on the configuration.
fn add_common_responses(doc: &mut Value, options: &DocOptions) {
    let error = |description: &str, header: Option<(&str, &str)>| {
        let mut response = json!({
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
        });
        if let Some((name, text)) = header {
            response["headers"] = json!({
                name: {"description": text, "schema": {"type": "string"}}
            });
        }
        response
    };
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let open = super::auth::is_open(path);
        let Some(operations) = item.as_object_mut() else {
            continue;
        };
        for operation in operations.values_mut() {
            let Some(responses) = operation["responses"].as_object_mut() else {
                continue;
            };
            responses.entry("503").or_insert_with(|| {
                error(
                    "The request did not finish within --request-timeout (`timeout`).",
                    None,
                )
            });
            if open {
                continue;
            }
            if options.auth {
                responses.insert(
                    "401".to_owned(),
                    error(
                        "No valid bearer token (`unauthorized`).",
                        Some(("WWW-Authenticate", "`Bearer realm=\"tally\"`, with `error=\"invalid_token\"` when a token was refused.")),
                    ),
                );
            }
            if options.rate_limit {
                responses.insert(
                    "429".to_owned(),
                    error(
                        "This client is over its rate limit (`rate_limited`).",
                        Some((
                            "Retry-After",
                            "Seconds until the next request would be allowed.",
                        )),
                    ),
                );
            }
        }
    }
}

/// The rendered document, shared by every request.
#[derive(Clone)]
pub struct Document(pub Bytes);

impl Document {
    /// Renders `document(options)` once.
    pub fn new(options: &DocOptions) -> Self {
        Self(Bytes::from(document(options).to_string()))
    }
}

/// This document: the OpenAPI description of the API.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 document.", body = Object,
        content_type = "application/json"))
)]
pub async fn openapi_json(State(doc): State<Document>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], doc.0)
}
