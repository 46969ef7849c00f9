//! API tests: the real router over real HTTP, on real SQLite files and a real PostgreSQL.
//! One test binary, one link step.

#[path = "../common/app.rs"]
mod app;
#[path = "../common/both_stores.rs"]
mod both_stores;
#[path = "../common/mod.rs"]
mod common;
mod helpers;
#[path = "../common/journal.rs"]
mod journal;
#[path = "../common/metrics.rs"]
mod metrics;
#[path = "../common/pg.rs"]
mod pg;
#[path = "../common/requests.rs"]
mod requests;
#[path = "../common/rng.rs"]
mod rng;
#[path = "../common/store.rs"]
mod store;

mod ack_store;
mod backpressure;
mod counters;
mod errors;
mod exactly_once;
mod exposition;
mod health;
mod increment;
mod multi_instance;
mod shutdown;
mod smoke;
