//! Reading the segments back on open, and cutting what a crash left half-written.

use std::collections::BTreeMap;
use std::path::Path;

use super::{Closed, JournalError, ReplayedRecord, record, writer};

/// What [`replay`] may change in the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Repair {
    /// Cut a bad tail off the last segment, delete empty segments (on open).
    Yes,
    /// Change nothing (a journal read by a tool, perhaps while its tally runs).
    No,
}

/// Replays segments `numbers` (ascending) of `dir`, handing each record to `on_record` as
/// it is read (one segment's bytes are in memory at a time, never every record). Returns
/// the bytes cut or skipped and, for every segment kept, its highest seq and size. The
/// rest of a segment after a bad record is skipped; with [`Repair::Yes`] a bad tail of the
/// last segment is truncated off and empty segments are deleted.
pub(super) fn replay(
    dir: &Path,
    numbers: &[u64],
    repair: Repair,
    on_record: &mut dyn FnMut(ReplayedRecord),
) -> Result<(u64, BTreeMap<u64, Closed>), JournalError> {
    let mut cut_bytes = 0;
    let mut kept = BTreeMap::new();
    let mut deleted_any = false;
    let repairing = repair == Repair::Yes;
    for (i, &n) in numbers.iter().enumerate() {
        let is_last = i + 1 == numbers.len();
        let path = writer::path(dir, n);
        let data = match writer::read(&path) {
            Ok(data) => data,
            // Read alongside a running tally, which deletes a segment once the store has
            // all of it (trim, close): nothing of it is owed any more.
            Err(JournalError::Io { source, .. })
                if !repairing && source.kind() == std::io::ErrorKind::NotFound =>
            {
                continue;
            }
            Err(e) => return Err(e),
        };

        let mut offset = 0;
        let mut max_seq = 0;
        let mut bytes = data.len() as u64;
        while offset < data.len() {
            match record::decode(&data[offset..]) {
                Ok((rec, used)) => {
                    max_seq = max_seq.max(rec.seq);
                    on_record(rec);
                    offset += used;
                }
                // Zeros the writer wrote ahead of its records (a crash left them): the end
                // of the records, not damage. The last segment is cut back to its records.
                Err(_) if data[offset..].iter().all(|&b| b == 0) => {
                    if is_last && repairing {
                        writer::truncate(&path, offset as u64)?;
                        bytes = offset as u64;
                    }
                    break;
                }
                Err(reason) => {
                    // After a torn record this counts the zeros written ahead too: which of
                    // the final zero bytes were the record's cannot be told.
                    let cut = data.len() - offset;
                    cut_bytes += cut as u64;
                    if is_last && repairing {
                        tracing::warn!(
                            segment = %path.display(), offset, bytes_cut = cut, %reason,
                            "Cutting a torn or corrupt tail off the last journal segment."
                        );
                        writer::truncate(&path, offset as u64)?;
                        bytes = offset as u64;
                    } else if is_last {
                        tracing::warn!(
                            segment = %path.display(), offset, bytes_skipped = cut, %reason,
                            "A torn or corrupt tail ends the last journal segment; left as it is."
                        );
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
        if repairing && offset == 0 && (is_last || data.iter().all(|&b| b == 0)) {
            writer::remove(dir, n)?;
            deleted_any = true;
            continue;
        }
        kept.insert(n, Closed { max_seq, bytes });
    }
    if deleted_any {
        writer::sync_dir(dir)?;
    }
    Ok((cut_bytes, kept))
}
