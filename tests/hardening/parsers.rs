//! The request-body parsers and the journal record decoder under arbitrary bytes: the
//! stable-toolchain counterpart of the cargo-fuzz targets in `fuzz/`, and the regression
//! tests for what fuzzing found.

use proptest::prelude::*;
use tally::http::body::{Format, Limits, parse_many, parse_one};
use tally::journal::record;

const LIMITS: Limits = Limits {
    max_key_bytes: 256,
    max_batch_items: 10_000,
};

const FORMATS: [Format; 3] = [Format::Json, Format::Form, Format::Ndjson];

/// Feeds `bytes` to every parser; none may panic, and what they accept must be valid.
fn parse_everything(bytes: &[u8]) {
    for format in FORMATS {
        if let Ok(item) = parse_one(format, bytes, &LIMITS) {
            check_key(item.key.as_str());
        }
        if let Ok(items) = parse_many(format, bytes, &LIMITS) {
            assert!(items.len() <= LIMITS.max_batch_items);
            for item in items {
                check_key(item.key.as_str());
            }
        }
    }
    if let Ok((record, used)) = record::decode(bytes) {
        assert!(used <= bytes.len());
        assert!(!record.entries.is_empty());
    }
}

fn check_key(key: &str) {
    assert!(!key.is_empty() && key.len() <= LIMITS.max_key_bytes && !key.contains('\0'));
}

/// Inputs that reached the parsers' edges while fuzzing, kept as regressions.
const REGRESSIONS: &[&[u8]] = &[
    b"",
    b"\n\n\n",
    b"[]",
    b"[{}]",
    b"{\"key\":\"\\u0000\",\"value\":1}",
    b"{\"key\":\"\\ud800\",\"value\":1}",
    b"{\"key\":\"a\",\"value\":-9223372036854775808}",
    b"{\"key\":\"a\",\"value\":9223372036854775808}",
    b"{\"key\":\"a\",\"value\":1e3}",
    b"key=%00&value=1",
    b"key=%FF&value=1",
    b"key=a&value=1&key=b",
    b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    b"\xff\xff\xff\xff\x00\x00\x00\x00",
    b"\x0d\x00\x00\x00\x00\x00\x00\x00\x01",
];

#[test]
fn known_edge_inputs_are_refused_or_parsed_without_panicking() {
    for input in REGRESSIONS {
        parse_everything(input);
    }
}

#[test]
fn crashers_found_by_fuzzing_stay_fixed() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return; // no crasher was ever found
    };
    for entry in entries {
        let path = entry.expect("dir entry").path();
        let bytes = std::fs::read(&path).expect("read crasher");
        parse_everything(&bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_a_parser(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        parse_everything(&bytes);
    }

    #[test]
    fn json_shaped_input_never_panics_a_parser(
        key in ".{0,300}",
        value in prop_oneof![
            any::<i64>().prop_map(|v| v.to_string()),
            any::<f64>().prop_map(|v| v.to_string()),
            "[a-z\"{}\\[\\],:0-9.eE+-]{0,20}",
        ],
        lines in 0usize..4,
    ) {
        let object = format!("{{\"key\":{},\"value\":{value}}}", serde_json::Value::from(key.clone()));
        parse_everything(object.as_bytes());
        parse_everything(format!("[{object},{object}]").as_bytes());
        parse_everything(vec![object.as_str(); lines].join("\n").as_bytes());
        let form = format!("key={}&value={value}", key.replace('&', "%26"));
        parse_everything(form.as_bytes());
    }
}
