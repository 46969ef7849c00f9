//! Versioned schema migrations, applied at start-up.
//!
//! Hand-written because it is twenty lines: each backend applies, in one transaction per
//! step, the migrations whose version is above the highest one recorded in
//! `tally_migrations`. Migration crates that cover both rusqlite and tokio-postgres exist
//! (refinery), but would add a macro-based build step for two SQL files.

/// A schema step: its version (strictly increasing) and its SQL.
pub(super) struct Migration {
    pub version: i64,
    pub sql: &'static str,
}

pub(super) const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        sql: include_str!("../../migrations/sqlite/0001_init.sql"),
    },
    Migration {
        version: 2,
        sql: include_str!("../../migrations/sqlite/0002_fencing.sql"),
    },
    Migration {
        version: 3,
        sql: include_str!("../../migrations/sqlite/0003_without_rowid.sql"),
    },
    Migration {
        version: 4,
        sql: include_str!("../../migrations/sqlite/0004_claimant.sql"),
    },
];

pub(super) const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        sql: include_str!("../../migrations/postgres/0001_init.sql"),
    },
    Migration {
        version: 2,
        sql: include_str!("../../migrations/postgres/0002_fencing.sql"),
    },
    Migration {
        version: 3,
        sql: include_str!("../../migrations/postgres/0003_fillfactor.sql"),
    },
    Migration {
        version: 4,
        sql: include_str!("../../migrations/postgres/0004_claimant.sql"),
    },
];

/// The bookkeeping table, the same SQL on both backends.
pub(super) const CREATE_TABLE: &str =
    "CREATE TABLE IF NOT EXISTS tally_migrations (version BIGINT PRIMARY KEY, applied_at TEXT)";
