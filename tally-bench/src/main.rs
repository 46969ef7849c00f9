//! `tally-bench`: the benchmark, in one reproducible command.
//!
//! `cargo run --release --bin tally-bench -- [--quick]` starts every variant (a no-op server,
//! a naive one-upsert-per-request server, and tally at each durability level on SQLite and on
//! PostgreSQL) as a child process on a free port, loads it with `wrk`, stops it, checks that
//! the store holds exactly what was acknowledged, and writes JSON, CSV, a markdown table and
//! SVG charts to `bench/results/<timestamp>/`. It also measures the flusher's capacity
//! against the bare SQL statement and the memory cost of a pending key.
//!
//! The baselines (`serve-noop`, `serve-sync`) live here, as hidden subcommands, so that they
//! run as separate processes like tally does and stay out of the product's code.

mod charts;
mod components;
mod http;
mod pg;
mod procs;
mod report;
mod serve;
mod suite;
mod wrk;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Default administrative connection: where per-run databases are created and dropped.
pub const DEFAULT_PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// tally-bench: run the benchmark (HTTP variants under wrk, flush capacity, memory).
#[derive(Debug, Parser)]
#[command(
    name = "tally-bench",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure the resident memory of N distinct pending keys in an `Aggregator`.
    Memory {
        /// Number of distinct keys to add.
        #[arg(long, default_value_t = 1_000_000)]
        keys: usize,
        /// Print one JSON object instead of prose.
        #[arg(long)]
        json: bool,
    },
    /// Measure flush capacity only: tally's flusher and `PgStore::apply` against the same
    /// statement issued directly.
    FlushCapacity {
        #[arg(long, default_value = DEFAULT_PG_ADMIN_URL)]
        pg_admin_url: String,
        /// Shorter measurements over the 100k keyspace only.
        #[arg(long)]
        quick: bool,
    },
    /// Print the tables of an earlier run from its results.json, as this version reports
    /// them (e.g. with the paired per-run ratios, for a run made before them). Writes
    /// nothing: the run's own files stay as they were measured.
    Report {
        /// The run's directory (holding results.json).
        dir: PathBuf,
    },
    /// Baseline: the same HTTP stack (axum on tokio) answering 202 and doing nothing else.
    #[command(hide = true)]
    ServeNoop {
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Serve with plain `axum::serve` instead of tally's accept loop.
        #[arg(long)]
        plain_axum: bool,
        /// Hold every reply until a thread of its own releases its group, after holding
        /// the group this long (`0s`: release at once); see `noop-axum-deferred`.
        #[arg(long, value_parser = humantime::parse_duration)]
        defer: Option<std::time::Duration>,
    },
    /// Baseline: parse the JSON body and run one upsert per request, 202 after commit.
    #[command(hide = true)]
    ServeSync {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        database_url: String,
        #[arg(long, default_value_t = 16)]
        pool_size: usize,
    },
}

/// Options of the full benchmark (the default command).
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Smoke run: every part, shorter and smaller, in under two minutes. Speeds from it are
    /// not comparable with a full run's; the correctness checks are the same.
    #[arg(long)]
    pub quick: bool,

    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    pub threads: u32,
    /// wrk connections (single-increment workloads). Default 400; 100 with --quick.
    #[arg(long)]
    pub connections: Option<u32>,
    /// wrk connections for the batch-ingest workload.
    #[arg(long, default_value_t = 32)]
    pub batch_connections: u32,
    /// Items per POST /increments request.
    #[arg(long, default_value_t = 1_000)]
    pub batch_items: u32,
    /// Measured duration of one run (whole seconds). Default 10s; 2s with --quick.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Warm-up before each measured run (posts only zeros). Default 2s; 1s with --quick.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub warmup: Option<Duration>,
    /// Runs per variant, interleaved round-robin. Default 3; 1 with --quick.
    #[arg(long)]
    pub runs: Option<u32>,
    /// Workloads to run: hot (1,000 keys), full (100,000 keys), batch (POST /increments).
    #[arg(long, value_delimiter = ',', default_value = "hot,full,batch")]
    pub workloads: Vec<String>,
    /// Only these variants (names as in the results, e.g. noop,sync-pg,tally-memory-pg).
    #[arg(long, value_delimiter = ',')]
    pub variants: Vec<String>,
    /// Also measure the flush-interval curve (tally ack=memory on PostgreSQL, full workload).
    #[arg(long)]
    pub flush_curve: bool,
    /// Flush intervals of the curve.
    #[arg(long, value_delimiter = ',', value_parser = humantime::parse_duration,
          default_value = "500ms,1s,2s,5s,10s")]
    pub curve_intervals: Vec<Duration>,
    /// --flush-max-keys given to tally for the curve: high, so that the interval alone
    /// decides when a batch is written.
    #[arg(long, default_value_t = 1_000_000)]
    pub curve_flush_max_keys: usize,
    /// Skip the component benchmarks (flush capacity, memory per key).
    #[arg(long)]
    pub skip_components: bool,
    /// The tally binary. Default: `tally` next to this executable.
    #[arg(long)]
    pub tally_bin: Option<PathBuf>,
    /// The wrk binary.
    #[arg(long, default_value = "wrk")]
    pub wrk: String,
    /// PostgreSQL administrative URL; a fresh database is created (and dropped) per run.
    #[arg(long, env = "TALLY_BENCH_PG_ADMIN_URL", default_value = DEFAULT_PG_ADMIN_URL)]
    pub pg_admin_url: String,
    /// Connection pool of the `sync` baseline.
    #[arg(long, default_value_t = 16)]
    pub sync_pool_size: usize,
    /// Where to write results. Default: bench/results/YYYY-MM-DDTHH-MM-SSZ (the run's start,
    /// UTC), or bench/results/quick with --quick.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tally-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            None => suite::run(cli.run).await,
            Some(Command::Memory { keys, json }) => components::memory_command(keys, json),
            Some(Command::FlushCapacity {
                pg_admin_url,
                quick,
            }) => {
                let cap = components::flush_capacity(&pg_admin_url, quick, &mut |m| {
                    eprintln!("{m}");
                })
                .await?;
                println!("{}", report::capacity_table(&cap));
                Ok(true)
            }
            Some(Command::Report { dir }) => {
                let results = report::read_results(&dir)?;
                println!("{}", report::table_md(&results));
                Ok(true)
            }
            Some(Command::ServeNoop {
                listen,
                plain_axum,
                defer,
            }) => serve::noop(listen, plain_axum, defer).await.map(|()| true),
            Some(Command::ServeSync {
                listen,
                database_url,
                pool_size,
            }) => serve::sync(listen, &database_url, pool_size)
                .await
                .map(|()| true),
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("tally-bench: a correctness check FAILED (see above).");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("tally-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
