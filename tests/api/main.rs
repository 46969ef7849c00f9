//! API tests: the real router over real HTTP, on real SQLite files and a real PostgreSQL.
//! One test binary, one link step.

#[path = "../common/mod.rs"]
mod common;
mod helpers;

mod ack_store;
mod backpressure;
mod counters;
mod errors;
mod exactly_once;
mod health;
mod increment;
mod metrics;
mod multi_instance;
mod shutdown;
mod smoke;
