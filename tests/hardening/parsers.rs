//! The request-body parsers and the journal record decoder under arbitrary bytes: the
//! stable-toolchain counterpart of the cargo-fuzz targets in `fuzz/`, and the regression
//! tests for what fuzzing found.

use proptest::prelude::*;
use tally::http::body::{Format, Limits, parse_many, parse_one};
use tally::journal::record;

const LIMITS: Limits = Limits {
    max_body_bytes: 4 << 20,
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

/// Puts a correct `[len][crc]` header in front of `body`, so the decoder gets past the
/// checksum and has to make sense of the body itself.
fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 8);
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Decodes a stream record by record; a decoded record must re-encode to its own bytes.
fn decode_stream(mut rest: &[u8]) -> usize {
    let mut records = 0;
    while let Ok((record, used)) = record::decode(rest) {
        assert!(used > 0 && used <= rest.len());
        let entries: Vec<(&str, i64)> = record
            .entries
            .iter()
            .map(|(k, d)| (k.as_str(), *d))
            .collect();
        let encoded = record::encode(record.seq, &entries).expect("a decoded record re-encodes");
        assert_eq!(encoded, &rest[..used], "decode/encode round trip");
        rest = &rest[used..];
        records += 1;
    }
    records
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
fn the_fuzzing_seeds_of_the_journal_decoder_are_valid_records() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/journal_record");
    let mut seeds = 0;
    for entry in std::fs::read_dir(&dir).expect("seed dir") {
        let bytes = std::fs::read(entry.expect("entry").path()).expect("seed");
        let (mode, rest) = bytes.split_first().expect("mode byte");
        let stream = if mode % 2 == 1 {
            rest.to_vec()
        } else {
            framed(rest)
        };
        assert!(decode_stream(&stream) >= 1, "seed decodes");
        seeds += 1;
    }
    assert!(seeds >= 3);
}

#[test]
fn crashers_found_by_fuzzing_stay_fixed() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return; // no crasher was ever found
    };
    for entry in entries {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "md") {
            continue;
        }
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
    fn record_bodies_behind_a_valid_checksum_never_panic_the_decoder(
        body in proptest::collection::vec(any::<u8>(), 0..256),
        version_one in any::<bool>(),
    ) {
        let mut body = body;
        if version_one && !body.is_empty() {
            body[0] = 1;
        }
        decode_stream(&framed(&body));
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
