//! Fuzzes the form request-body parsers (`POST /increment` and `POST /increments`):
//! no input may panic, and whatever they accept must be a valid increment.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally::http::body::{Format, Limits, parse_many, parse_one};

const LIMITS: Limits = Limits {
    max_key_bytes: 256,
    max_batch_items: 10_000,
};

fn check(key: &str) {
    assert!(!key.is_empty() && key.len() <= LIMITS.max_key_bytes && !key.contains('\0'));
}

fuzz_target!(|data: &[u8]| {
    if let Ok(item) = parse_one(Format::Form, data, &LIMITS) {
        check(item.key.as_str());
    }
    if let Ok(items) = parse_many(Format::Form, data, &LIMITS) {
        assert!(items.len() <= LIMITS.max_batch_items);
        for item in &items {
            check(item.key.as_str());
        }
    }
});
