//! Hardening tests: authorization, per-client rate limits, connection limits and timeouts,
//! the OpenAPI document, and the request/journal parsers under arbitrary input. The real
//! router over real HTTP (and raw TCP where a client must misbehave), on real SQLite files.
//! One test binary, one link step.

#[path = "../common/app.rs"]
mod app;
#[path = "../common/mod.rs"]
mod common;
#[path = "../common/metrics.rs"]
mod metrics;

mod auth;
mod cli;
mod limits;
mod openapi;
mod parsers;
mod rate_limit;
mod support;
