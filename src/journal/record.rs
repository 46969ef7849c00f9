//! The on-disk record format: encoding (on the caller's thread) and validating decoding.
//!
//! ```text
//! offset  size  field
//! 0       4     len      u32 LE  number of bytes after this 8-byte header (the "body")
//! 4       4     crc      u32 LE  CRC-32 (IEEE, crc32fast) of the body
//! --- body ---
//! 8       1     version  u8      = 1
//! 9       8     seq      u64 LE  batch/generation number the entries belong to
//! 17      4     count    u32 LE  number of entries, >= 1
//! 21      ...   count × [key_len: u32 LE][key: key_len bytes UTF-8][delta: i64 LE]
//! ```
//!
//! ##############################################################################
//! WARNING: this layout is read back from files written by older binaries. NEVER reorder,
//! retype, resize or reinterpret a field. To change the format, bump [`VERSION`], keep
//! decoding version 1, and branch on the version byte.
//! ##############################################################################

use super::{JournalError, ReplayedRecord};

/// Size of the `[len][crc]` header that precedes every body.
pub const HEADER_LEN: usize = 8;
/// Current (and so far only) body format version.
pub const VERSION: u8 = 1;
/// Largest body accepted on encode and on decode. Bounds what a corrupt `len` can make
/// replay allocate.
pub const MAX_RECORD_LEN: usize = 64 << 20;
/// version + seq + count.
const FIXED_BODY_LEN: usize = 1 + 8 + 4;
/// key_len + delta (an entry with an empty key).
const MIN_ENTRY_LEN: usize = 4 + 8;

/// Why a byte string is not a valid record. Produced by [`decode`]; replay cuts or skips
/// what it cannot decode and counts it in `Replay::cut_bytes`, so it is never an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    /// The buffer ends before the record does (the classic torn write at the tail).
    #[error("incomplete record: needs {needed} bytes, {available} available")]
    Incomplete { needed: usize, available: usize },
    /// The length field is below the smallest possible body or above [`MAX_RECORD_LEN`].
    #[error("impossible record length {0}")]
    BadLength(u32),
    /// The body does not match its checksum.
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum { stored: u32, computed: u32 },
    /// The checksum holds but the version byte is unknown (written by a newer binary?).
    #[error("unknown record version {0}")]
    UnknownVersion(u8),
    /// The checksum holds but the body is inconsistent (counts, lengths, UTF-8).
    #[error("malformed record body: {0}")]
    Malformed(&'static str),
}

/// Encodes one record. Cheap; meant to run on the caller's thread.
///
/// # Errors
///
/// [`JournalError::EmptyRecord`] if `entries` is empty, [`JournalError::RecordTooLarge`] if
/// the body would exceed [`MAX_RECORD_LEN`].
pub fn encode(seq: u64, entries: &[(&str, i64)]) -> Result<Vec<u8>, JournalError> {
    let mut buf = Vec::new();
    encode_into(&mut buf, seq, entries)?;
    Ok(buf)
}

/// Appends one encoded record to `buf` and returns its length; on an error `buf` is left
/// as it was. The journal encodes straight into its shared group buffer with this, so an
/// append allocates nothing of its own.
///
/// # Errors
///
/// As [`encode`].
pub fn encode_into<E: Entry>(
    buf: &mut Vec<u8>,
    seq: u64,
    entries: &[E],
) -> Result<usize, JournalError> {
    if entries.is_empty() {
        return Err(JournalError::EmptyRecord);
    }
    let body_len = entries.iter().fold(FIXED_BODY_LEN, |acc, entry| {
        acc.saturating_add(MIN_ENTRY_LEN + entry.key().len())
    });
    if body_len > MAX_RECORD_LEN {
        return Err(JournalError::RecordTooLarge {
            len: body_len,
            max: MAX_RECORD_LEN,
        });
    }
    let as_u32 = |n: usize| u32::try_from(n).expect("bounded by MAX_RECORD_LEN < u32::MAX");

    let start = buf.len();
    buf.reserve(HEADER_LEN + body_len);
    buf.extend_from_slice(&as_u32(body_len).to_le_bytes());
    buf.extend_from_slice(&[0; 4]); // crc, filled in below
    buf.push(VERSION);
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&as_u32(entries.len()).to_le_bytes());
    for entry in entries {
        let key = entry.key();
        buf.extend_from_slice(&as_u32(key.len()).to_le_bytes());
        buf.extend_from_slice(key.as_bytes());
        buf.extend_from_slice(&entry.delta().to_le_bytes());
    }
    let record = &mut buf[start..];
    debug_assert_eq!(record.len(), HEADER_LEN + body_len);
    let crc = crc32fast::hash(&record[HEADER_LEN..]);
    record[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(record.len())
}

/// One `(key, delta)` entry of a record, as the caller holds it: a pair, or the service's
/// own parsed increment, so that appending needs no list of pairs built per request.
pub trait Entry {
    fn key(&self) -> &str;
    fn delta(&self) -> i64;
}

impl Entry for (&str, i64) {
    fn key(&self) -> &str {
        self.0
    }

    fn delta(&self) -> i64 {
        self.1
    }
}

/// Decodes the record at the start of `buf`, returning it and the number of bytes it took.
/// Never panics, whatever `buf` holds.
///
/// # Errors
///
/// A [`Corruption`] saying why `buf` does not start with a complete, valid record.
pub fn decode(buf: &[u8]) -> Result<(ReplayedRecord, usize), Corruption> {
    let mut header = Reader(buf);
    let (Some(len), Some(stored)) = (header.u32(), header.u32()) else {
        return Err(Corruption::Incomplete {
            needed: HEADER_LEN,
            available: buf.len(),
        });
    };
    let body_len = len as usize;
    if !(FIXED_BODY_LEN + MIN_ENTRY_LEN..=MAX_RECORD_LEN).contains(&body_len) {
        return Err(Corruption::BadLength(len));
    }
    let Some(body) = header.take(body_len) else {
        return Err(Corruption::Incomplete {
            needed: HEADER_LEN + body_len,
            available: buf.len(),
        });
    };
    let computed = crc32fast::hash(body);
    if computed != stored {
        return Err(Corruption::BadChecksum { stored, computed });
    }

    let mut r = Reader(body);
    let version = r.u8().ok_or(Corruption::Malformed("no version"))?;
    if version != VERSION {
        return Err(Corruption::UnknownVersion(version));
    }
    let seq = r.u64().ok_or(Corruption::Malformed("no seq"))?;
    let count = r.u32().ok_or(Corruption::Malformed("no count"))? as usize;
    if count == 0 || count > r.0.len() / MIN_ENTRY_LEN {
        return Err(Corruption::Malformed("entry count does not fit the body"));
    }
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        let key_len = r.u32().ok_or(Corruption::Malformed("no key length"))? as usize;
        let key = r
            .take(key_len)
            .ok_or(Corruption::Malformed("key overruns the body"))?;
        let key =
            std::str::from_utf8(key).map_err(|_| Corruption::Malformed("key is not UTF-8"))?;
        let delta = r.i64().ok_or(Corruption::Malformed("no delta"))?;
        entries.push((key.to_owned(), delta));
    }
    if !r.0.is_empty() {
        return Err(Corruption::Malformed("trailing bytes after the last entry"));
    }
    Ok((ReplayedRecord { seq, entries }, HEADER_LEN + body_len))
}

/// A bounds-checked little-endian cursor: every read returns `None` instead of panicking.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
    fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }
    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }
    fn i64(&mut self) -> Option<i64> {
        self.array().map(i64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entries_strategy() -> impl Strategy<Value = Vec<(String, i64)>> {
        prop::collection::vec((".{0,40}", any::<i64>()), 1..20)
    }

    fn encode_owned(seq: u64, entries: &[(String, i64)]) -> Vec<u8> {
        let borrowed: Vec<(&str, i64)> = entries.iter().map(|(k, d)| (k.as_str(), *d)).collect();
        encode(seq, &borrowed).expect("small record encodes")
    }

    proptest! {
        #[test]
        fn round_trip(seq in any::<u64>(), entries in entries_strategy()) {
            let buf = encode_owned(seq, &entries);
            let (rec, used) = decode(&buf).expect("own encoding decodes");
            prop_assert_eq!(used, buf.len());
            prop_assert_eq!(rec.seq, seq);
            prop_assert_eq!(rec.entries, entries);
        }

        #[test]
        fn any_flipped_byte_is_rejected(
            seq in any::<u64>(),
            entries in entries_strategy(),
            pos in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let mut buf = encode_owned(seq, &entries);
            let i = pos.index(buf.len());
            buf[i] ^= flip;
            prop_assert!(decode(&buf).is_err(), "flip at {} accepted", i);
        }

        #[test]
        fn any_truncation_is_incomplete(
            seq in any::<u64>(),
            entries in entries_strategy(),
            pos in any::<prop::sample::Index>(),
        ) {
            let buf = encode_owned(seq, &entries);
            let cut = pos.index(buf.len());
            let is_incomplete = matches!(decode(&buf[..cut]), Err(Corruption::Incomplete { .. }));
            prop_assert!(is_incomplete);
        }

        #[test]
        fn arbitrary_bytes_never_panic(buf in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&buf);
        }

        #[test]
        fn valid_crc_over_garbage_body_never_panics(body in prop::collection::vec(any::<u8>(), 0..200)) {
            // Bypasses the checksum so the body parser itself gets fuzzed.
            let buf = frame(&body);
            if let Ok((rec, used)) = decode(&buf) {
                prop_assert_eq!(used, buf.len());
                prop_assert!(!rec.entries.is_empty());
            }
        }
    }

    /// Wraps `body` in a header with a correct length and checksum.
    fn frame(body: &[u8]) -> Vec<u8> {
        let mut buf = u32::try_from(body.len())
            .expect("small")
            .to_le_bytes()
            .to_vec();
        buf.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
        buf.extend_from_slice(body);
        buf
    }

    #[test]
    fn checksummed_but_inconsistent_bodies_are_malformed() {
        let good = encode(5, &[("key", 9)]).expect("encodes");
        let body = &good[HEADER_LEN..];
        let reframe = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut b = body.to_vec();
            edit(&mut b);
            decode(&frame(&b)).expect_err("must be rejected")
        };
        assert_eq!(decode(&frame(body)).expect("valid").0.seq, 5);
        assert_eq!(reframe(&|b| b[0] = 2), Corruption::UnknownVersion(2));
        let malformed = |c| matches!(c, Corruption::Malformed(_));
        assert!(malformed(reframe(&|b| b.push(0))), "trailing byte");
        assert!(malformed(reframe(
            &|b| b[9..13].copy_from_slice(&u32::MAX.to_le_bytes())
        )));
        assert!(malformed(reframe(
            &|b| b[9..13].copy_from_slice(&0u32.to_le_bytes())
        )));
        assert!(malformed(reframe(
            &|b| b[13..17].copy_from_slice(&4u32.to_le_bytes())
        )));
        assert!(malformed(reframe(&|b| b[17] = 0xFF)), "invalid UTF-8");
    }

    #[test]
    fn rejects_empty_and_oversized() {
        assert!(matches!(encode(1, &[]), Err(JournalError::EmptyRecord)));
        let huge = "k".repeat(MAX_RECORD_LEN);
        assert!(matches!(
            encode(1, &[(huge.as_str(), 1)]),
            Err(JournalError::RecordTooLarge { .. })
        ));
    }

    #[test]
    fn huge_length_field_is_rejected_without_allocating() {
        let mut buf = encode(1, &[("k", 1)]).expect("encodes");
        buf[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode(&buf).expect_err("must be rejected"),
            Corruption::BadLength(u32::MAX)
        );
    }

    #[test]
    fn two_records_back_to_back() {
        let mut buf = encode(7, &[("a", -1)]).expect("encodes");
        buf.extend(encode(8, &[("b", 2), ("", 0)]).expect("encodes"));
        let (first, n) = decode(&buf).expect("first");
        let (second, m) = decode(&buf[n..]).expect("second");
        assert_eq!((first.seq, second.seq), (7, 8));
        assert_eq!(
            second.entries,
            vec![("b".to_owned(), 2), (String::new(), 0)]
        );
        assert_eq!(n + m, buf.len());
    }
}
