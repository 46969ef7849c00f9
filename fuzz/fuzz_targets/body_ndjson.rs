//! Fuzzes the ndjson request-body parsers (`POST /increment` and `POST /increments`):
//! no input may panic, and whatever they accept must be a valid increment.
#![no_main]

#[path = "common/body.rs"]
mod body;

use libfuzzer_sys::fuzz_target;
use tally::http::body::Format;

fuzz_target!(|data: &[u8]| body::check_body(Format::Ndjson, data));
