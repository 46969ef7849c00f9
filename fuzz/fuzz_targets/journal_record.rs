//! Fuzzes the journal record decoder (start-up replay reads whatever is on disk): no input
//! may panic, a decoded record must re-encode to exactly the bytes it came from, and
//! decoding a stream record by record must always make progress.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally::journal::record::{decode, encode};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
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
});
