//! The one property every body-parser target checks, for the format it was given: no input
//! may panic, and whatever the parsers accept must be a valid increment.

use tally::http::body::{Format, Limits, parse_many, parse_one};

const LIMITS: Limits = Limits {
    max_body_bytes: 4 << 20,
    max_key_bytes: 256,
    max_batch_items: 10_000,
};

fn check(key: &str) {
    assert!(!key.is_empty() && key.len() <= LIMITS.max_key_bytes && !key.contains('\0'));
}

/// Feeds `data` to `parse_one` and `parse_many` as `format` and checks what they accept.
pub fn check_body(format: Format, data: &[u8]) {
    if let Ok(item) = parse_one(format, data, &LIMITS) {
        check(item.key.as_str());
    }
    if let Ok(items) = parse_many(format, data, &LIMITS) {
        assert!(items.len() <= LIMITS.max_batch_items);
        for item in &items {
            check(item.key.as_str());
        }
    }
}
