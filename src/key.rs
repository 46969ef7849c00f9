//! The validated forms of what a client sends: a [`Key`] and an [`Increment`].
//!
//! Request fields are parsed into these types once, at the edge; nothing further in reads a
//! raw `&str` key again.

use std::fmt;

/// Default upper bound on a key's length in bytes. Long enough for structured names such as
/// `tenant:metric:dimension`, short enough that a pending key stays cheap in memory and in
/// the database index.
pub const DEFAULT_MAX_KEY_BYTES: usize = 256;

/// The most `--max-key-bytes` may allow. PostgreSQL's B-tree index on `counters.key` refuses
/// an entry past about 2,700 bytes (a third of its 8 KiB page), and a batch holding such a
/// key could then never be written: the flusher would retry it for ever while every later
/// delta waited behind it. 2 KiB keeps clear of that on every backend.
pub const MAX_KEY_BYTES_LIMIT: usize = 2048;

/// A counter key: non-empty UTF-8, at most the configured number of bytes, without NUL.
///
/// NUL is refused because PostgreSQL `text` cannot store it: one such key would make the
/// store reject a whole batch.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(Box<str>);

/// Why a key was refused. Validation errors happen in normal operation, so they are a plain
/// enum, cheap to build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key is the empty string.
    #[error("key must not be empty")]
    Empty,
    /// The key is longer than the configured limit.
    #[error("key is {len} bytes long; the limit is {max} bytes")]
    TooLong { len: usize, max: usize },
    /// The key contains a NUL character, which PostgreSQL text cannot hold.
    #[error("key must not contain the NUL character (\\u0000)")]
    Nul,
}

impl Key {
    /// Validates `raw` as a key of at most `max_bytes` bytes.
    ///
    /// # Errors
    ///
    /// [`KeyError`] names the rule the key breaks.
    pub fn parse(raw: impl Into<String> + AsRef<str>, max_bytes: usize) -> Result<Self, KeyError> {
        let s = raw.as_ref();
        if s.is_empty() {
            return Err(KeyError::Empty);
        }
        if s.len() > max_bytes {
            return Err(KeyError::TooLong {
                len: s.len(),
                max: max_bytes,
            });
        }
        if s.contains('\0') {
            return Err(KeyError::Nul);
        }
        Ok(Self(raw.into().into_boxed_str()))
    }

    /// The key as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// "Add `delta` to `key`": one accepted item of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Increment {
    pub key: Key,
    pub delta: i64,
}

impl crate::journal::Entry for Increment {
    fn key(&self) -> &str {
        self.key.as_str()
    }

    fn delta(&self) -> i64 {
        self.delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_keys_up_to_the_limit() {
        assert_eq!(
            Key::parse("abc", 3).map(|k| k.to_string()),
            Ok("abc".to_owned())
        );
        assert_eq!(
            Key::parse("é", 2).map(|k| k.to_string()),
            Ok("é".to_owned())
        );
    }

    #[test]
    fn refuses_empty_long_and_nul_keys() {
        let cases = [
            ("", KeyError::Empty),
            ("abcd", KeyError::TooLong { len: 4, max: 3 }),
            ("é√", KeyError::TooLong { len: 5, max: 3 }),
            ("a\0", KeyError::Nul),
        ];
        for (raw, want) in cases {
            assert_eq!(Key::parse(raw, 3), Err(want), "key {raw:?}");
        }
    }
}
