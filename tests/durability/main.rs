//! Durability proof: acknowledged increments survive `kill -9`, database outages and poison
//! keys, and are counted exactly once (the design brief's "Proof").
//!
//! Most tests run the real `tally` binary as a child process, so that a crash is a real
//! SIGKILL and every metric belongs to one process; the outage test runs the app in process
//! behind a TCP proxy that it can cut. PostgreSQL tests skip loudly when no server answers
//! (see `tests/common/mod.rs`).
//!
//! Run time on a 2-core machine is bounded by the constants at the top of each module
//! (cycles, load durations, time budgets); the whole binary aims at well under two minutes.

#[path = "../common/app.rs"]
mod app;
#[path = "../common/mod.rs"]
mod common;
#[path = "../common/journal.rs"]
mod journal;
#[path = "../common/metrics.rs"]
mod metrics;
#[path = "../common/pg.rs"]
mod pg;
#[path = "../common/rng.rs"]
mod rng;
#[path = "../common/store.rs"]
mod store;

mod ack;
mod crash;
mod datadir;
mod disk_full;
mod disk_stall;
mod drain;
mod failover;
mod fd_limit;
mod fencing;
mod immutable;
mod memory;
mod outage;
mod owner;
mod password;
mod poison;
mod private_pg;
mod replay;
mod support;
