//! API tests: the real router over real HTTP, on real SQLite files and a real PostgreSQL.
//! One test binary, one link step.

#[path = "../common/mod.rs"]
mod common;

mod smoke;
