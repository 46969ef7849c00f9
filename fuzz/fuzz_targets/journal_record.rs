//! Fuzzes the journal record decoder (start-up replay reads whatever is on disk): no input
//! may panic, a decoded record must re-encode to exactly the bytes it came from, and
//! decoding a stream record by record must always make progress.
//!
//! The first input byte picks the mode. Odd: the rest is a whole stream, as on disk (the
//! checksum stops almost every mutation, which is what torn and corrupt files look like).
//! Even: the rest is one record *body*, and the target writes a correct `[len][crc]` header
//! in front of it, so the fuzzer explores the body decoder behind a valid checksum.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally::journal::record::{decode, encode};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 1 {
        decode_stream(rest);
    } else {
        let mut framed = Vec::with_capacity(rest.len() + 8);
        framed.extend_from_slice(&u32::try_from(rest.len()).unwrap_or(u32::MAX).to_le_bytes());
        framed.extend_from_slice(&crc32fast::hash(rest).to_le_bytes());
        framed.extend_from_slice(rest);
        decode_stream(&framed);
    }
});

fn decode_stream(mut rest: &[u8]) {
    while let Ok((record, used)) = decode(rest) {
        assert!(used > 0 && used <= rest.len(), "decode must consume what it read");
        let entries: Vec<(&str, i64)> = record
            .entries
            .iter()
            .map(|(k, d)| (k.as_str(), *d))
            .collect();
        let encoded = encode(record.seq, &entries).expect("a decoded record re-encodes");
        assert_eq!(encoded, &rest[..used], "decode/encode round trip");
        rest = &rest[used..];
    }
}
