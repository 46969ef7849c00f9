//! `--database-password-file`, read again for every new PostgreSQL connection.
//!
//! A secret is rotated by rewriting its file: a Kubernetes secret volume, a Vault agent's
//! template, a systemd credential refreshed on reload. PostgreSQL keeps the sessions open
//! when a role's password changes, so the pool goes on working, until it opens a connection
//! (after a database restart, a network fault, a connection discarded after an error): a
//! password read once at start would then be refused on every new connection, every batch
//! would fail and the journal would grow until a restart. So the file is read each time a
//! connection is opened (rare: the pool keeps its connections), and a rotated password is
//! used from the next connection on, with no restart.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use crate::metrics::Metrics;

/// The password in `path`: its first line, without the line end.
///
/// # Errors
///
/// If the file cannot be read, or its first line is empty (PostgreSQL has no empty
/// passwords; a file caught between truncation and write looks like that).
pub fn read(path: &Path) -> io::Result<String> {
    let text = std::fs::read_to_string(path)?;
    match text.lines().next() {
        Some(line) if !line.is_empty() => Ok(line.to_owned()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "its first line is empty",
        )),
    }
}

/// A password file, and the password last read from it.
pub struct PasswordFile {
    path: PathBuf,
    last: Mutex<String>,
}

/// Names the file, never the password.
impl std::fmt::Debug for PasswordFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl PasswordFile {
    /// Reads `path` once, so that a start with an unreadable file fails at once.
    ///
    /// # Errors
    ///
    /// As [`read`].
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self {
            path: path.to_owned(),
            last: Mutex::new(read(path)?),
        })
    }

    /// The password for a connection opened now: the file's first line as it is now. If the
    /// file cannot be read, or its first line has turned empty (a secret being rewritten in
    /// place, caught between truncation and write), the password read before, with a
    /// warning: that one may still be the right one.
    pub fn current(&self) -> String {
        // Read before the lock is taken: a slow file (a secret on a network mount) holds up
        // only the connection that reads it.
        let now = read(&self.path);
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let reads = &Metrics::global().store_password_reads;
        match now {
            Ok(password) if password == *last => reads.unchanged.increment(1),
            Ok(password) => {
                tracing::info!(
                    path = %self.path.display(),
                    "Read a new password from --database-password-file; new PostgreSQL connections use it."
                );
                reads.changed.increment(1);
                *last = password;
            }
            Err(error) => {
                tracing::warn!(
                    path = %self.path.display(),
                    %error,
                    "Cannot read --database-password-file again; the new PostgreSQL connection uses the password read before."
                );
                reads.failed.increment(1);
            }
        }
        last.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_read_takes_the_file_as_it_is_now_and_keeps_the_last_good_password_otherwise() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("password");
        std::fs::write(&path, "first\nignored\n").expect("write the file");
        let file = PasswordFile::open(&path).expect("a readable file");
        assert_eq!(file.current(), "first", "the first line only");

        std::fs::write(&path, "second\r\n").expect("rotate");
        assert_eq!(
            file.current(),
            "second",
            "a rotated password, without CR LF"
        );

        std::fs::write(&path, "").expect("truncate");
        assert_eq!(
            file.current(),
            "second",
            "an emptied file keeps the last one"
        );

        std::fs::remove_file(&path).expect("remove");
        assert_eq!(file.current(), "second", "so does a missing file");

        std::fs::write(&path, "third").expect("write again");
        assert_eq!(file.current(), "third", "and a file back again is read");
    }

    #[test]
    fn a_missing_or_empty_file_fails_the_start() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("password");
        assert!(PasswordFile::open(&path).is_err(), "missing");
        std::fs::write(&path, "\nsecond line\n").expect("write the file");
        let error = PasswordFile::open(&path).expect_err("an empty first line");
        assert!(error.to_string().contains("empty"), "{error}");
    }
}
