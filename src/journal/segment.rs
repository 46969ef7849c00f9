//! Segment files: naming, listing, creating preallocated (zero-filled) segments and the
//! spare that becomes the next one, cutting, deleting, and directory fsyncs. No
//! concurrency lives here; [`super::writer`] decides when each of these runs.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use super::{JournalError, io_err};

const PREFIX: &str = "journal-";
const SUFFIX: &str = ".log";
const DIGITS: usize = 20;
/// The next segment while it is being zero-filled. Not a segment name, so [`list`] never
/// sees it; [`install_spare`] renames it into place.
const SPARE: &str = "journal-spare.tmp";
/// Zeros are written in chunks of this size, so preparing a spare can be stopped between
/// chunks and never needs a segment-sized buffer.
const ZERO_CHUNK: usize = 1 << 20;

/// Path of segment number `n` in `dir`.
pub(super) fn path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{PREFIX}{n:0DIGITS$}{SUFFIX}"))
}

/// Path of the spare segment in `dir`.
pub(super) fn spare_path(dir: &Path) -> PathBuf {
    dir.join(SPARE)
}

/// The segment number in a file name, if it is a segment's name.
fn parse_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    if digits.len() != DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Segment numbers present in `dir`, ascending. Other files are ignored.
pub(super) fn list(dir: &Path) -> Result<Vec<u64>, JournalError> {
    let mut numbers = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        if let Some(n) = entry.file_name().to_str().and_then(parse_name) {
            numbers.push(n);
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

/// Creates segment `n` (it must not exist) zero-filled to `len` bytes, makes the zeros
/// durable, then fsyncs the directory, so that records acknowledged from it can be found
/// after a crash and overwriting the zeros later changes data blocks only.
pub(super) fn create(dir: &Path, n: u64, len: u64) -> Result<File, JournalError> {
    let path = path(dir, n);
    let mut file = File::options()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io_err("create segment", &path))?;
    zero_fill(&mut file, len, &AtomicBool::new(false))
        .and_then(|_| file.sync_data())
        .map_err(io_err("preallocate segment", &path))?;
    sync_dir(dir)?;
    Ok(file)
}

/// Creates the spare segment zero-filled to `len` bytes, replacing any spare left behind.
/// Returns `None`, and deletes the partial file, if `stop` was set before it finished.
/// Runs on a helper thread, off the append path.
pub(super) fn prepare_spare(
    dir: &Path,
    len: u64,
    stop: &AtomicBool,
) -> Result<Option<File>, JournalError> {
    let path = spare_path(dir);
    remove_spare(dir)?;
    let mut file = File::options()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io_err("create spare segment", &path))?;
    let finished = zero_fill(&mut file, len, stop)
        .and_then(|finished| file.sync_data().map(|()| finished))
        .map_err(io_err("preallocate spare segment", &path))?;
    if !finished {
        drop(file);
        remove_spare(dir)?;
        return Ok(None);
    }
    Ok(Some(file))
}

/// Turns the prepared spare into segment `n` (rename + directory fsync).
pub(super) fn install_spare(dir: &Path, n: u64) -> Result<(), JournalError> {
    let to = path(dir, n);
    fs::rename(spare_path(dir), &to).map_err(io_err("rename the spare segment to", &to))?;
    sync_dir(dir)
}

/// Deletes the spare, if any. Its creation was never made durable in the directory, so
/// no directory fsync is needed: after a crash it is either gone or deleted on open.
pub(super) fn remove_spare(dir: &Path) -> Result<(), JournalError> {
    let path = spare_path(dir);
    match fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(io_err("delete spare segment", &path)(e))
        }
        _ => Ok(()),
    }
}

/// Writes `len` zero bytes at the start of the empty `file`. Returns false if `stop` was
/// set first. Real zeros, not `fallocate`: a range allocated with `fallocate` is
/// "unwritten" on ext4 and XFS, and the first write into it is a metadata change that
/// every `fdatasync` would have to commit.
fn zero_fill(file: &mut File, len: u64, stop: &AtomicBool) -> io::Result<bool> {
    let zeros = vec![0u8; ZERO_CHUNK.min(usize::try_from(len).unwrap_or(ZERO_CHUNK))];
    let mut left = len;
    while left > 0 {
        if stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let n = zeros.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        file.write_all(&zeros[..n])?;
        left -= n as u64;
    }
    Ok(true)
}

/// Cuts the segment at `path` down to `len` bytes, durably.
pub(super) fn truncate(path: &Path, len: u64) -> Result<(), JournalError> {
    let file = File::options()
        .write(true)
        .open(path)
        .map_err(io_err("open segment to truncate", path))?;
    file.set_len(len)
        .map_err(io_err("truncate segment", path))?;
    file.sync_all()
        .map_err(io_err("sync truncated segment", path))
}

/// Deletes segment `n`; one already gone is fine. The caller fsyncs the directory.
pub(super) fn remove(dir: &Path, n: u64) -> Result<(), JournalError> {
    let path = path(dir, n);
    match fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("delete segment", &path)(e)),
        _ => Ok(()),
    }
}

/// Makes creations and deletions of entries in `dir` durable.
pub(super) fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))
}

/// Makes `dir`'s own entry durable (it may have just been created).
pub(super) fn sync_parent(dir: &Path) -> Result<(), JournalError> {
    match dir.parent() {
        Some(p) if p.as_os_str().is_empty() => sync_dir(Path::new(".")),
        Some(p) => sync_dir(p),
        None => Ok(()),
    }
}
