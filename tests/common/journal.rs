//! Looking at a data directory's journal from outside.

use std::path::Path;

/// The journal's segment files left in `data_dir` (none if it has no journal).
pub fn journal_segments(data_dir: &Path) -> Vec<String> {
    std::fs::read_dir(data_dir.join("journal"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.ends_with(".log"))
                .collect()
        })
        .unwrap_or_default()
}

/// What the journal's segment files in `data_dir` take on disk, in bytes.
#[allow(
    dead_code,
    reason = "used by the durability tests only; the api tests include this file too"
)]
pub fn journal_files_bytes(data_dir: &Path) -> u64 {
    journal_segments(data_dir)
        .iter()
        .map(|name| {
            let path = data_dir.join("journal").join(name);
            std::fs::metadata(path).map_or(0, |m| m.len())
        })
        .sum()
}
