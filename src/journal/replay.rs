//! Reading the segments back on open, and cutting what a crash left half-written.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use super::{JournalError, Replay, io_err, record, segment};

/// How the bytes of one segment ended.
enum End {
    /// At the end of the file, or at the zero fill of a preallocated segment.
    Clean,
    /// At a bad record at this offset.
    Bad(record::Corruption),
}

/// Replays segments `numbers` (ascending) of `dir`. Returns the records and, for every
/// segment kept, its highest seq. A bad tail of the last segment is truncated off, and so
/// is its unused zero fill; the rest of an older segment after a bad record is skipped;
/// segments without a record and without damage are deleted.
pub(super) fn replay(
    dir: &Path,
    numbers: &[u64],
) -> Result<(Replay, BTreeMap<u64, u64>), JournalError> {
    let mut out = Replay::default();
    let mut kept = BTreeMap::new();
    let mut deleted_any = false;
    for (i, &n) in numbers.iter().enumerate() {
        let is_last = i + 1 == numbers.len();
        let path = segment::path(dir, n);
        let data = fs::read(&path).map_err(io_err("read segment", &path))?;

        let mut offset = 0;
        let mut max_seq = 0;
        let end = loop {
            let rest = &data[offset..];
            // A record never starts with a zero length, so four zero bytes (or fewer at
            // the very end) begin the zero fill, if everything after them is zero too.
            if rest[..rest.len().min(4)].iter().all(|&b| b == 0) && record::is_zero_fill(rest) {
                break End::Clean;
            }
            match record::decode(rest) {
                Ok((rec, used)) => {
                    max_seq = max_seq.max(rec.seq);
                    out.records.push(rec);
                    offset += used;
                }
                Err(reason) => break End::Bad(reason),
            }
        };
        match &end {
            End::Clean if is_last && offset > 0 && offset < data.len() => {
                // Unused preallocation of a segment that will never be appended to again.
                segment::truncate(&path, offset as u64)?;
            }
            End::Clean => {}
            End::Bad(reason) => {
                // Bytes up to the last non-zero one; zeros after it are the fill of a
                // preallocated segment, not data.
                let data_end = data.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
                let cut = data_end.saturating_sub(offset);
                out.cut_bytes += cut as u64;
                if is_last {
                    tracing::warn!(
                        segment = %path.display(), offset, bytes_cut = cut, %reason,
                        "Cutting a torn or corrupt tail off the last journal segment."
                    );
                    segment::truncate(&path, offset as u64)?;
                } else {
                    tracing::error!(
                        segment = %path.display(), offset, bytes_skipped = cut, %reason,
                        "Corrupt record inside an older journal segment; skipping the rest of that segment."
                    );
                }
            }
        }
        // No record in it: drop the file, unless it is an older segment whose damage is
        // kept for inspection.
        let damaged_older = !is_last && matches!(end, End::Bad(_));
        if offset == 0 && !damaged_older {
            segment::remove(dir, n)?;
            deleted_any = true;
            continue;
        }
        out.max_seq = out.max_seq.max(max_seq);
        kept.insert(n, max_seq);
    }
    if deleted_any {
        segment::sync_dir(dir)?;
    }
    Ok((out, kept))
}
