//! tally — a counter service that sums deltas in memory and writes them to a database in
//! batches, losing no acknowledged update and counting none twice.
//!
//! # Glossary
//!
//! - **delta**: a pending change to one key (`+5`, `-1`), as sent by a client.
//! - **value**: what the store holds for a key; the sum of every delta ever applied to it.
//! - **generation**: the live map of pending deltas that ingest writes into. `seal` freezes it
//!   and starts a fresh one, so flushing never blocks ingest.
//! - **batch**: a sealed generation, sorted by key and numbered `(instance_id, seq)`. The
//!   generation number *is* the batch's seq.
//! - **journal**: the local write-ahead log of accepted deltas (`ack=journal`); made of
//!   **segments**, which are **trimmed** once the store has applied every batch they cover
//!   and **replayed** on start-up.
//!
//! # Map
//!
//! - [`config`]: every flag, its environment variable and its default.
//! - [`fds`]: the open-file limit, raised at start, and the connection cap it allows.
//! - [`startup`]: builds the [`startup::App`] and wires its tasks together.
//! - [`shutdown`]: signals and the drain order.
//! - [`key`]: the validated [`key::Key`] and the [`key::Increment`] it travels in.
//! - [`http`]: routes, body parsers and the JSON error contract.
//! - [`aggregate`]: the sharded map of pending deltas and its generations.
//! - [`flush`]: the task that seals, numbers and applies batches, and retries them.
//! - [`applied`]: the seq of the last batch in the store, which `ack=store` requests wait on.
//! - [`journal`]: group-committed write-ahead log (durability level `ack=journal`).
//! - [`idle`]: tells the journal when every runtime worker is parked.
//! - `relay`: one wake-up per serving thread for the requests waiting on the journal or the
//!   store.
//! - `recovery`: start-up replay of the journal into the store.
//! - [`store`]: the [`store::Store`] contract and its SQLite and PostgreSQL backends.
//! - [`metrics`]: every metric name and its handle, registered once at start.
//! - [`telemetry`]: logging set-up.
//! - [`causes`]: an error and its causes on one line, for log lines and exit messages.
//!
//! # Why these modules are public
//!
//! The library is not a published API. Its modules are public because the crate's other
//! users build on them: the `tally` binary (`config`, `fds`, `startup`, `shutdown`, `telemetry`, `idle`),
//! the `tally-journal` binary (`journal`: `Journal::read`, `Replay`), the
//! integration tests (`store`, `config`, `startup`, `metrics`), the benchmark crate
//! `tally-bench` (`aggregate`, `flush`, `store`, `http::serve`) and the fuzz targets
//! (`http::body`, `journal::record`). What none of them needs stays private (`recovery`, `relay`, and
//! the submodules of `http`, `journal` and `store` that are not named above).

pub mod aggregate;
pub mod applied;
pub mod causes;
pub mod config;
pub mod fds;
pub mod flush;
pub mod http;
pub mod idle;
pub mod journal;
pub mod key;
pub mod metrics;
mod recovery;
mod relay;
pub mod sched;
pub mod shutdown;
pub mod startup;
pub mod store;
pub mod telemetry;
