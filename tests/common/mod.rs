//! Test support shared by every integration test binary, one file per concern so that each
//! binary includes exactly the parts it uses (an unused helper is then a compile warning,
//! not dead weight):
//!
//! | file | what | included by |
//! |---|---|---|
//! | `mod.rs` | temp data directories, [`Backend`] | all |
//! | `pg.rs` | a fresh PostgreSQL database per test | api, durability, store_contract |
//! | `both_stores.rs` | `on_both_stores!`: one test per store | api, store_contract |
//! | `store.rs` | reading every counter with plain SQL | api, durability, store_contract |
//! | `journal.rs` | the journal's segment files in a data directory | api, durability |
//! | `app.rs` | `TestApp`: the app in process on port 0 | api, durability, hardening |
//! | `requests.rs` | `TestApp`'s increment/read requests | api |
//! | `metrics.rs` | scraping `/metrics` | api, durability, hardening, store_contract |
//! | `rng.rs` | a seeded generator for test traffic | api, durability |
//!
//! A binary includes them as modules of its root, `#[path = "../common/pg.rs"] mod pg;`,
//! and they refer to each other as `crate::common`, `crate::pg`, and so on.

use tempfile::TempDir;

/// Which store a test app runs on.
#[derive(Debug, Clone)]
pub enum Backend {
    Sqlite,
    #[allow(dead_code, reason = "the hardening tests run on SQLite only")]
    Postgres(String),
}

/// A temp data directory.
pub fn data_dir() -> TempDir {
    tempfile::tempdir().expect("temp dir")
}
