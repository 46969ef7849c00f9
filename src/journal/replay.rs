//! Reading the segments back on open, and cutting what a crash left half-written.

use std::collections::BTreeMap;
use std::path::Path;

use super::{JournalError, Replay, record, writer};

/// Replays segments `numbers` (ascending) of `dir`. Returns the records and, for every
/// segment kept, its highest seq. A bad tail of the last segment is truncated off; the
/// rest of an older segment after a bad record is skipped; empty segments are deleted.
pub(super) fn replay(
    dir: &Path,
    numbers: &[u64],
) -> Result<(Replay, BTreeMap<u64, u64>), JournalError> {
    let mut out = Replay::default();
    let mut kept = BTreeMap::new();
    let mut deleted_any = false;
    for (i, &n) in numbers.iter().enumerate() {
        let is_last = i + 1 == numbers.len();
        let path = writer::path(dir, n);
        let data = writer::read(&path)?;

        let mut offset = 0;
        let mut max_seq = 0;
        while offset < data.len() {
            match record::decode(&data[offset..]) {
                Ok((rec, used)) => {
                    max_seq = max_seq.max(rec.seq);
                    out.records.push(rec);
                    offset += used;
                }
                // Zeros the writer wrote ahead of its records (a crash left them): the end
                // of the records, not damage. The last segment is cut back to its records.
                Err(_) if data[offset..].iter().all(|&b| b == 0) => {
                    if is_last {
                        writer::truncate(&path, offset as u64)?;
                    }
                    break;
                }
                Err(reason) => {
                    // After a torn record this counts the zeros written ahead too: which of
                    // the final zero bytes were the record's cannot be told.
                    let cut = data.len() - offset;
                    out.cut_bytes += cut as u64;
                    if is_last {
                        tracing::warn!(
                            segment = %path.display(), offset, bytes_cut = cut, %reason,
                            "Cutting a torn or corrupt tail off the last journal segment."
                        );
                        writer::truncate(&path, offset as u64)?;
                    } else {
                        tracing::error!(
                            segment = %path.display(), offset, bytes_skipped = cut, %reason,
                            "Corrupt record inside an older journal segment; skipping the rest of that segment."
                        );
                    }
                    break;
                }
            }
        }
        // Nothing left in the file (it was empty or zeros, or all of it was a cut tail): drop it.
        if offset == 0 && (is_last || data.iter().all(|&b| b == 0)) {
            writer::remove(dir, n)?;
            deleted_any = true;
            continue;
        }
        out.max_seq = out.max_seq.max(max_seq);
        kept.insert(n, max_seq);
    }
    if deleted_any {
        writer::sync_dir(dir)?;
    }
    Ok((out, kept))
}
