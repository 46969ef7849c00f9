//! The full benchmark: the HTTP matrix (variants × workloads × runs, interleaved), the
//! batch-ingest run, the optional flush-interval curve, then the component benchmarks.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::RunArgs;
use crate::components::{self, Capacity, Memory};
use crate::pg::{self, BenchDb};
use crate::procs::{self, ScratchDir, Server};
use crate::report;
use crate::wrk::{self, Errors, Load, WrkArgs, WrkOutput};

/// Where a tally variant keeps its counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// What is started for a variant.
#[derive(Debug, Clone)]
pub enum Kind {
    Noop,
    /// The no-op route on plain `axum::serve`.
    NoopAxum,
    /// `NoopAxum` whose replies wait for a thread that releases them in groups, each held
    /// [`DEFERRED_HOLD`]: what a reply released by another thread costs on axum's
    /// multi-thread runtime.
    NoopAxumDeferred,
    Sync,
    Tally {
        ack: &'static str,
        backend: Backend,
        flush_interval: Option<Duration>,
        flush_max_keys: Option<usize>,
        guard: Guard,
    },
}

/// The optional request guards a tally variant runs with, to price them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    None,
    /// `--auth-token`: every request carries the static bearer token.
    Token,
    /// `--rate-limit-per-second` far above what the load can reach: the limiter runs on
    /// every request and never refuses one.
    RateLimit,
}

/// How long `noop-axum-deferred`'s thread holds each group before releasing it: about one
/// `fdatasync` on the benchmark machine's idle disk (its median was 0.24 ms, see
/// docs/benchmarks.md). Over 100–500 µs its throughput was level.
pub const DEFERRED_HOLD: &str = "250us";

/// The static token of the `-token` variants.
pub const BENCH_TOKEN: &str = "tally-bench-static-token-0123456789";

#[derive(Debug, Clone)]
pub struct Variant {
    pub name: String,
    pub kind: Kind,
}

impl Variant {
    fn tally(ack: &'static str, backend: Backend) -> Self {
        let store = match backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "pg",
        };
        Self {
            name: format!("tally-{ack}-{store}"),
            kind: Kind::Tally {
                ack,
                backend,
                flush_interval: None,
                flush_max_keys: None,
                guard: Guard::None,
            },
        }
    }

    /// The `ack=memory` SQLite variant with a guard, named `tally-memory-sqlite-<suffix>`.
    fn guarded(guard: Guard, suffix: &str) -> Self {
        let mut v = Self::tally("memory", Backend::Sqlite);
        v.name = format!("{}-{suffix}", v.name);
        if let Kind::Tally { guard: g, .. } = &mut v.kind {
            *g = guard;
        }
        v
    }

    fn uses_postgres(&self) -> bool {
        matches!(
            self.kind,
            Kind::Sync
                | Kind::Tally {
                    backend: Backend::Postgres,
                    ..
                }
        )
    }
}

/// Every variant of the HTTP matrix, in the order they are run within a round.
pub fn all_variants() -> Vec<Variant> {
    let mut v = vec![
        Variant {
            name: "noop".into(),
            kind: Kind::Noop,
        },
        Variant {
            name: "noop-axum".into(),
            kind: Kind::NoopAxum,
        },
        Variant {
            name: "noop-axum-deferred".into(),
            kind: Kind::NoopAxumDeferred,
        },
        Variant {
            name: "sync-pg".into(),
            kind: Kind::Sync,
        },
    ];
    for backend in [Backend::Sqlite, Backend::Postgres] {
        for ack in ["memory", "journal", "store"] {
            v.push(Variant::tally(ack, backend));
        }
    }
    v.push(Variant::guarded(Guard::Token, "token"));
    v.push(Variant::guarded(Guard::RateLimit, "ratelimit"));
    v
}

/// A workload of the matrix.
#[derive(Debug, Clone)]
pub struct Workload {
    pub name: &'static str,
    pub load: Load,
    pub connections: u32,
}

/// The correctness check of one run: the store against what wrk saw acknowledged.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    /// `exact` when every value-1 request was answered before wrk stopped (the store must
    /// equal the count); `bounded` otherwise (the store must lie between the bounds).
    pub mode: String,
    pub expected_min: i64,
    pub expected_max: i64,
    pub stored: i64,
    pub pass: bool,
    pub note: String,
}

/// One measured run. Optional fields (newer ones among them) read as `None` from a
/// results.json written before they existed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunRecord {
    pub workload: String,
    pub variant: String,
    pub run: u32,
    pub threads: u32,
    pub connections: u32,
    pub duration_s: f64,
    pub requests: u64,
    pub requests_per_s: f64,
    /// Increments per second (requests × items per request).
    pub items_per_s: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p90: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_max: f64,
    pub errors: Errors,
    pub check: Option<Check>,
    /// CPU seconds of all PostgreSQL processes during the measured run, per second of run.
    pub pg_cpu_per_s: Option<f64>,
    /// CPU time of the server process (all threads) per request during the measured run.
    pub server_cpu_us_per_request: Option<f64>,
    /// Context switches of the server's threads per request during the measured run.
    pub server_ctx_switches_per_request: Option<f64>,
    /// CPU used on the machine during the run by anything but the server, its PostgreSQL
    /// backends, wrk and tally-bench, in cores: the noise the run suffered.
    pub other_load_cores: f64,
    /// Idle CPU of the machine during the run, in cores: more than a little means the run
    /// was bound by waiting (fsyncs, the database, too few clients), not by CPU. `None` in
    /// runs made before it was measured.
    pub idle_cores: Option<f64>,
    /// Largest `tally_flush_lag_seconds` scraped from /metrics during the run.
    pub flush_lag_max_s: Option<f64>,
    /// Largest time seen between two batch commits (polled from tally_instances.updated_at).
    pub commit_gap_max_s: Option<f64>,
    pub flush_interval_s: Option<f64>,
    /// How long the server took to stop after SIGTERM (tally: final flush included).
    pub stop_s: f64,
}

/// Machine and software the results were measured on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu: String,
    pub memory_gib: f64,
    pub kernel: String,
    pub postgres: String,
    pub wrk: String,
    pub git_rev: String,
}

/// Everything a run of tally-bench produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub started: String,
    pub command: String,
    pub quick: bool,
    pub machine: Machine,
    pub runs: Vec<RunRecord>,
    pub curve: Vec<RunRecord>,
    pub capacity: Option<Capacity>,
    pub memory: Option<Memory>,
    pub elapsed_s: f64,
}

/// Settings resolved from the arguments (quick or full).
struct Plan {
    threads: u32,
    duration: Duration,
    warmup: Duration,
    runs: u32,
    tail: Duration,
    workloads: Vec<Workload>,
    variants: Vec<Variant>,
    batch_variants: Vec<Variant>,
    curve: Vec<Duration>,
}

fn plan(args: &RunArgs) -> anyhow::Result<Plan> {
    let quick = args.quick;
    let duration = args
        .duration
        .unwrap_or(Duration::from_secs(if quick { 2 } else { 10 }));
    let duration = Duration::from_secs(duration.as_secs().max(1));
    let warmup = args
        .warmup
        .unwrap_or(Duration::from_secs(if quick { 1 } else { 2 }));
    let runs = args.runs.unwrap_or(if quick { 1 } else { 3 }).max(1);
    let connections = args.connections.unwrap_or(if quick { 100 } else { 400 });
    // The zero tail: long enough for every connection to cycle through it (see increment.lua).
    let tail = Duration::from_secs_f64((duration.as_secs_f64() / 5.0).clamp(0.4, 2.0));
    let mut workloads = Vec::new();
    for w in &args.workloads {
        workloads.push(match w.as_str() {
            "hot" => Workload {
                name: "hot",
                load: Load::Single { keyspace: 1_000 },
                connections,
            },
            "full" => Workload {
                name: "full",
                load: Load::Single { keyspace: 100_000 },
                connections,
            },
            "batch" => Workload {
                name: "batch",
                load: Load::Batch {
                    keyspace: 100_000,
                    items: args.batch_items,
                },
                connections: args.batch_connections,
            },
            other => anyhow::bail!("unknown workload {other:?}: use hot, full, batch"),
        });
    }
    let selected = |v: &Variant| args.variants.is_empty() || args.variants.contains(&v.name);
    let variants: Vec<Variant> = all_variants().into_iter().filter(selected).collect();
    if !args.variants.is_empty() && variants.len() != args.variants.len() {
        let known: Vec<String> = all_variants().into_iter().map(|v| v.name).collect();
        anyhow::bail!("unknown variant in --variants; known: {}", known.join(", "));
    }
    let batch_names: &[&str] = if quick {
        &["noop-axum", "tally-memory-pg", "tally-journal-sqlite"]
    } else {
        &[
            "noop-axum",
            "tally-memory-sqlite",
            "tally-journal-sqlite",
            "tally-memory-pg",
            "tally-journal-pg",
            "tally-store-pg",
        ]
    };
    let batch_variants = variants
        .iter()
        .filter(|v| batch_names.contains(&v.name.as_str()))
        .cloned()
        .collect();
    let curve = if args.flush_curve {
        args.curve_intervals.clone()
    } else {
        Vec::new()
    };
    Ok(Plan {
        threads: args.threads,
        duration,
        warmup,
        runs,
        tail,
        workloads,
        variants,
        batch_variants,
        curve,
    })
}

/// One step of the schedule.
struct Step {
    workload: Workload,
    variant: Variant,
    run: u32,
    duration: Duration,
    curve: bool,
}

fn schedule(plan: &Plan, quick: bool) -> Vec<Step> {
    let hot_in_quick = [
        "noop-axum",
        "tally-memory-pg",
        "tally-journal-pg",
        "tally-memory-sqlite",
    ];
    let mut steps = Vec::new();
    for workload in &plan.workloads {
        let variants = if workload.name == "batch" {
            &plan.batch_variants
        } else {
            &plan.variants
        };
        // Interleaved: round r runs every variant once, so drift hits all alike.
        for run in 1..=plan.runs {
            for variant in variants {
                if quick && workload.name == "hot" && !hot_in_quick.contains(&variant.name.as_str())
                {
                    continue;
                }
                // The guards' price is a hot-path figure; the other workloads skip them.
                let guarded =
                    matches!(variant.kind, Kind::Tally { guard, .. } if guard != Guard::None);
                if guarded && workload.name != "hot" {
                    continue;
                }
                steps.push(Step {
                    workload: workload.clone(),
                    variant: variant.clone(),
                    run,
                    duration: plan.duration,
                    curve: false,
                });
            }
        }
    }
    for &interval in &plan.curve {
        let mut variant = Variant::tally("memory", Backend::Postgres);
        variant.name = format!(
            "tally-memory-pg-flush-{}",
            humantime::format_duration(interval)
        );
        variant.kind = Kind::Tally {
            ack: "memory",
            backend: Backend::Postgres,
            flush_interval: Some(interval),
            flush_max_keys: None,
            guard: Guard::None,
        };
        let secs = plan
            .duration
            .as_secs()
            .max((interval.as_secs_f64() * 3.0).ceil() as u64);
        steps.push(Step {
            workload: Workload {
                name: "full",
                load: Load::Single { keyspace: 100_000 },
                connections: plan
                    .workloads
                    .iter()
                    .find(|w| w.name != "batch")
                    .map_or(400, |w| w.connections),
            },
            variant,
            run: 1,
            duration: Duration::from_secs(secs),
            curve: true,
        });
    }
    steps
}

/// Shared state of the run.
struct Ctx {
    args: RunArgs,
    tally_bin: PathBuf,
    self_bin: PathBuf,
    scripts: (PathBuf, PathBuf),
    logs: PathBuf,
    plan: Plan,
}

/// Runs everything and writes the results; `Ok(false)` if a correctness check failed.
pub async fn run(args: RunArgs) -> anyhow::Result<bool> {
    let started_at = Instant::now();
    let started = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    wrk::check_installed(&args.wrk).await?;
    let tally_bin = procs::tally_bin(args.tally_bin.as_deref())?;
    let self_bin = std::env::current_exe().context("cannot locate this executable")?;
    let plan = plan(&args)?;
    let out = match &args.out {
        Some(p) => p.clone(),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("bench/results")
            .join(if args.quick {
                "quick".to_owned()
            } else {
                started.replace(':', "-")
            }),
    };
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let scripts = wrk::write_scripts(&logs)?;
    let ctx = Ctx {
        args: args.clone(),
        tally_bin,
        self_bin,
        scripts,
        logs,
        plan,
    };
    let steps = schedule(&ctx.plan, args.quick);
    let machine = machine(&args).await;
    eprintln!(
        "tally-bench: {} runs of {}s (+{}s warm-up), wrk -t{} ; {} on {} cores; results in {}",
        steps.len(),
        ctx.plan.duration.as_secs(),
        ctx.plan.warmup.as_secs(),
        ctx.plan.threads,
        machine.cpu,
        machine.nproc,
        out.display()
    );

    let mut progress = Progress::new(&steps, &ctx.plan, !args.skip_components, args.quick);
    let mut runs = Vec::new();
    let mut curve = Vec::new();
    let mut ok = true;
    for (i, step) in steps.iter().enumerate() {
        progress.announce(i, step);
        let began = Instant::now();
        let record = run_step(&ctx, step, i).await.with_context(|| {
            format!(
                "{} / {} run {}",
                step.workload.name, step.variant.name, step.run
            )
        })?;
        progress.finished(i, began.elapsed());
        eprintln!("{}", describe(&record));
        if record.check.as_ref().is_some_and(|c| !c.pass) {
            ok = false;
        }
        if step.curve {
            curve.push(record);
        } else {
            runs.push(record);
        }
    }

    let (capacity, memory) = if args.skip_components {
        (None, None)
    } else {
        progress.component("memory per pending key (1M distinct keys in an Aggregator)");
        let memory = components::memory_child(&ctx.self_bin, 1_000_000).await?;
        eprintln!(
            "        {:.1} bytes per key beyond the key's {:.1} bytes",
            memory.overhead_bytes_per_key, memory.key_bytes_per_key
        );
        progress.component("flush capacity (flusher vs PgStore::apply vs direct statement)");
        let capacity = components::flush_capacity(&args.pg_admin_url, args.quick, &mut |m| {
            eprintln!("        {m}");
        })
        .await?;
        (Some(capacity), Some(memory))
    };

    let results = Results {
        started,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        quick: args.quick,
        machine,
        runs,
        curve,
        capacity,
        memory,
        elapsed_s: started_at.elapsed().as_secs_f64(),
    };
    report::write_all(&out, &results)?;
    eprintln!("\n{}", report::table_md(&results));
    eprintln!(
        "tally-bench: done in {}; results in {}",
        humantime::format_duration(Duration::from_secs(started_at.elapsed().as_secs())),
        out.display()
    );
    if !ok {
        eprintln!("tally-bench: at least one correctness check FAILED.");
    }
    Ok(ok)
}

fn describe(r: &RunRecord) -> String {
    let mut s = if r.workload == "batch" {
        format!(
            "        {:>10.0} req/s  {:>11.0} increments/s  p50 {:.2} ms  p99 {:.2} ms",
            r.requests_per_s, r.items_per_s, r.latency_ms_p50, r.latency_ms_p99
        )
    } else {
        format!(
            "        {:>10.0} req/s  p50 {:.2} ms  p99 {:.2} ms",
            r.requests_per_s, r.latency_ms_p50, r.latency_ms_p99
        )
    };
    if let Some(cpu) = r.server_cpu_us_per_request {
        s.push_str(&format!("  server {cpu:.1} µs CPU/req"));
    }
    if let Some(cpu) = r.pg_cpu_per_s {
        s.push_str(&format!("  pg cpu {cpu:.2} core"));
    }
    if let Some(lag) = r.flush_lag_max_s {
        s.push_str(&format!("  lag≤{lag:.2}s"));
    }
    s.push_str(&format!("  other load {:.2} cores", r.other_load_cores));
    if let Some(idle) = r.idle_cores {
        s.push_str(&format!("  idle {idle:.2} cores"));
    }
    if let Some(c) = &r.check {
        if c.mode == "exact" {
            s.push_str(&format!(
                "  check {}: stored {} == acked {}",
                if c.pass { "ok" } else { "FAILED" },
                c.stored,
                c.expected_min
            ));
        } else {
            s.push_str(&format!(
                "  check {} (bounded): {} <= stored {} <= {} ({})",
                if c.pass { "ok" } else { "FAILED" },
                c.expected_min,
                c.stored,
                c.expected_max,
                c.note
            ));
        }
    }
    let e = &r.errors;
    if e.connect + e.read + e.write + e.status + e.timeout > 0 {
        s.push_str(&format!(
            "  errors: connect {} read {} write {} non-2xx {} timeout {}",
            e.connect, e.read, e.write, e.status, e.timeout
        ));
    }
    s
}

async fn run_step(ctx: &Ctx, step: &Step, index: usize) -> anyhow::Result<RunRecord> {
    let variant = &step.variant;
    let scratch = ScratchDir::create(&format!("run{index}"))?;
    let db = if variant.uses_postgres() {
        Some(BenchDb::create(&ctx.args.pg_admin_url).await?)
    } else {
        None
    };
    let result = measure(ctx, step, index, &scratch.0, db.as_ref()).await;
    if let Some(db) = db
        && let Err(e) = db.drop_db().await
    {
        eprintln!("        (could not drop the run's database: {e:#})");
    }
    scratch.remove();
    result
}

async fn measure(
    ctx: &Ctx,
    step: &Step,
    index: usize,
    scratch: &Path,
    db: Option<&BenchDb>,
) -> anyhow::Result<RunRecord> {
    let variant = &step.variant;
    let addr = procs::free_addr()?;
    let data_dir = scratch.join("data");
    let (program, args) = match &variant.kind {
        Kind::Noop => (
            ctx.self_bin.clone(),
            vec!["serve-noop".into(), "--listen".into(), addr.to_string()],
        ),
        Kind::NoopAxum | Kind::NoopAxumDeferred => {
            let mut args = vec!["serve-noop".into(), "--plain-axum".into()];
            if matches!(variant.kind, Kind::NoopAxumDeferred) {
                args.extend(["--defer".into(), DEFERRED_HOLD.into()]);
            }
            args.extend(["--listen".into(), addr.to_string()]);
            (ctx.self_bin.clone(), args)
        }
        Kind::Sync => (
            ctx.self_bin.clone(),
            vec![
                "serve-sync".into(),
                "--listen".into(),
                addr.to_string(),
                "--database-url".into(),
                db.context("sync needs PostgreSQL")?.url.clone(),
                "--pool-size".into(),
                ctx.args.sync_pool_size.to_string(),
            ],
        ),
        Kind::Tally {
            ack,
            backend,
            flush_interval,
            flush_max_keys,
            guard,
        } => {
            let mut a = vec![
                "--listen".into(),
                addr.to_string(),
                "--data-dir".into(),
                data_dir.display().to_string(),
                "--ack".into(),
                (*ack).to_owned(),
            ];
            if *backend == Backend::Postgres {
                a.push("--database-url".into());
                a.push(db.context("pg variant needs PostgreSQL")?.url.clone());
            }
            if let Some(i) = flush_interval {
                a.push("--flush-interval".into());
                a.push(humantime::format_duration(*i).to_string());
                a.push("--flush-max-keys".into());
                a.push(
                    flush_max_keys
                        .unwrap_or(ctx.args.curve_flush_max_keys)
                        .to_string(),
                );
            }
            match guard {
                Guard::None => {}
                Guard::Token => a.extend(["--auth-token".into(), BENCH_TOKEN.into()]),
                Guard::RateLimit => a.extend([
                    "--rate-limit-per-second".into(),
                    "1000000000".into(),
                    "--rate-limit-burst".into(),
                    "1000000000".into(),
                ]),
            }
            (ctx.tally_bin.clone(), a)
        }
    };
    let log = ctx.logs.join(format!(
        "{index:03}-{}-{}-run{}.log",
        step.workload.name, variant.name, step.run
    ));
    let server = Server::start(&program, &args, addr, &log).await?;
    let plan = &ctx.plan;
    let bearer = matches!(
        variant.kind,
        Kind::Tally {
            guard: Guard::Token,
            ..
        }
    )
    .then_some(BENCH_TOKEN);
    let warm = WrkArgs {
        threads: plan.threads,
        connections: step.workload.connections,
        duration: plan.warmup,
        tail: plan.warmup,
        zeros_only: true,
        bearer,
    };
    wrk::run(&ctx.args.wrk, &ctx.scripts, addr, step.workload.load, &warm).await?;

    let is_tally = matches!(variant.kind, Kind::Tally { .. });
    let stop = Arc::new(AtomicBool::new(false));
    // With the token: unauthorized scrapes would spend the failed-authorization budget of
    // 127.0.0.1, which wrk shares, and get wrk's requests refused with 429.
    let lag_task = is_tally.then(|| tokio::spawn(scrape_lag(addr, bearer, Arc::clone(&stop))));
    let gap_task = (is_tally && db.is_some())
        .then(|| db.map(|d| tokio::spawn(poll_commit_gap(d.url.clone(), Arc::clone(&stop)))))
        .flatten();
    // PostgreSQL CPU: the backends serving this run's database only (other databases on the
    // server, e.g. other test suites, are not counted; neither are the background writers).
    let backends = match db {
        Some(db) => db.backend_pids().await?,
        None => Vec::new(),
    };
    let cpu_before = db.map(|_| pg::snapshot(&backends));
    let server_pid = server.pid();
    let server_cpu_before = server_pid.and_then(pg::process_cpu_seconds);
    let server_ctx_before = server_pid.and_then(pg::process_context_switches);
    let machine_before = pg::machine_times();
    let ours_before = pg::own_and_reaped_children_seconds();
    let tail = if step.curve {
        plan.tail.max(Duration::from_secs(1))
    } else {
        plan.tail
    };
    let measured = WrkArgs {
        threads: plan.threads,
        connections: step.workload.connections,
        duration: step.duration,
        tail,
        zeros_only: false,
        bearer,
    };
    let out = wrk::run(
        &ctx.args.wrk,
        &ctx.scripts,
        addr,
        step.workload.load,
        &measured,
    )
    .await;
    let cpu_after = db.map(|_| pg::snapshot(&backends));
    let server_cpu_after = server_pid.and_then(pg::process_cpu_seconds);
    let server_ctx_after = server_pid.and_then(pg::process_context_switches);
    let machine_after = pg::machine_times();
    let machine_used = machine_after.busy - machine_before.busy;
    let idle = machine_after.idle - machine_before.idle;
    let ours_used = pg::own_and_reaped_children_seconds() - ours_before;
    stop.store(true, Ordering::Relaxed);
    let lag = match lag_task {
        Some(t) => t.await.ok().flatten(),
        None => None,
    };
    let gap = match gap_task {
        Some(t) => t.await.ok().flatten(),
        None => None,
    };
    let (status, stop_time) = server.stop().await?;
    let out = out?;
    let run_secs = out.duration_us as f64 / 1e6;
    let server_used = server_cpu_before
        .zip(server_cpu_after)
        .map_or(0.0, |(b, a)| a - b);
    let pg_used = cpu_before
        .as_ref()
        .zip(cpu_after.as_ref())
        .map_or(0.0, |(b, a)| pg::used_between(b, a));
    // Whatever else ran on the machine meanwhile (other builds, other databases): the noise.
    let other_load_cores =
        ((machine_used - server_used - pg_used - ours_used) / run_secs.max(1e-6)).max(0.0);
    let idle_cores = (idle / run_secs.max(1e-6)).max(0.0);
    let server_cpu_us_per_request = server_cpu_before
        .zip(server_cpu_after)
        .map(|(b, a)| (a - b) * 1e6 / out.requests.max(1) as f64);
    let server_ctx_switches_per_request = server_ctx_before
        .zip(server_ctx_after)
        .map(|(b, a)| a.saturating_sub(b) as f64 / out.requests.max(1) as f64);
    let pg_cpu_per_s = cpu_before
        .zip(cpu_after)
        .map(|(b, a)| pg::used_between(&b, &a) / run_secs.max(1e-6));

    let check = match variant.kind {
        Kind::Noop | Kind::NoopAxum | Kind::NoopAxumDeferred => None,
        _ => {
            let stored = match db {
                Some(db) => db.total().await?,
                None => sqlite_total(&data_dir.join("tally.db"))?,
            };
            let mut check = judge(&out, stored, tail, step.workload.connections);
            if is_tally && !status.success() {
                check.pass = false;
                check.note = format!("tally exited with {status}; {}", check.note);
            }
            Some(check)
        }
    };
    if check.as_ref().is_some_and(|c| !c.pass) {
        eprintln!("        server log ({}):", log.display());
        eprintln!(
            "{}",
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let ms = |us: u64| us as f64 / 1e3;
    Ok(RunRecord {
        workload: step.workload.name.to_owned(),
        variant: variant.name.clone(),
        run: step.run,
        threads: plan.threads,
        connections: step.workload.connections,
        duration_s: run_secs,
        requests: out.requests,
        requests_per_s: out.requests_per_s(),
        items_per_s: out.items_per_s(),
        latency_ms_p50: ms(out.latency_us.p50),
        latency_ms_p90: ms(out.latency_us.p90),
        latency_ms_p99: ms(out.latency_us.p99),
        latency_ms_max: ms(out.latency_us.max),
        errors: out.errors.clone(),
        check,
        pg_cpu_per_s,
        server_cpu_us_per_request,
        server_ctx_switches_per_request,
        other_load_cores,
        idle_cores: Some(idle_cores),
        flush_lag_max_s: lag,
        commit_gap_max_s: gap,
        flush_interval_s: match variant.kind {
            Kind::Tally {
                flush_interval: Some(i),
                ..
            } => Some(i.as_secs_f64()),
            Kind::Tally { .. } => Some(1.0),
            _ => None,
        },
        stop_s: stop_time.as_secs_f64(),
    })
}

/// Compares the store with what wrk saw. Each value-1 request adds `items_per_request`.
fn judge(out: &WrkOutput, stored: i64, tail: Duration, connections: u32) -> Check {
    let per = i64::try_from(out.items_per_request.max(1)).unwrap_or(1);
    let sent = i64::try_from(out.sent1).unwrap_or(i64::MAX);
    let e = &out.errors;
    let socket_errors = e.connect + e.read + e.write;
    let all_answered = out.latency_us.max < tail.as_micros() as u64 && socket_errors == 0;
    if all_answered && e.status == 0 {
        return Check {
            mode: "exact".into(),
            expected_min: sent * per,
            expected_max: sent * per,
            stored,
            pass: stored == sent * per,
            note: "every value-1 request answered 202 before the zero tail ended".into(),
        };
    }
    // Some value-1 requests were refused or may still have been in flight: the store must
    // hold at least those surely acknowledged and at most every one sent.
    let unsure = i64::try_from(e.status + socket_errors).unwrap_or(i64::MAX)
        + if all_answered {
            0
        } else {
            i64::from(connections)
        };
    let min = (sent - unsure).max(0) * per;
    Check {
        mode: "bounded".into(),
        expected_min: min,
        expected_max: sent * per,
        stored,
        pass: (min..=sent * per).contains(&stored),
        note: format!(
            "{} non-2xx, {socket_errors} socket errors, max latency {:.0} ms vs tail {:.0} ms",
            e.status,
            out.latency_us.max as f64 / 1e3,
            tail.as_secs_f64() * 1e3
        ),
    }
}

fn sqlite_total(path: &Path) -> anyhow::Result<i64> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("cannot open {}", path.display()))?;
    conn.query_row("SELECT coalesce(sum(value), 0) FROM counters", [], |r| {
        r.get(0)
    })
    .with_context(|| format!("cannot sum counters in {}", path.display()))
}

/// Scrapes /metrics every 250 ms until `stop`; the largest flush lag seen.
async fn scrape_lag(
    addr: std::net::SocketAddr,
    bearer: Option<&'static str>,
    stop: Arc<AtomicBool>,
) -> Option<f64> {
    let mut max: Option<f64> = None;
    while !stop.load(Ordering::Relaxed) {
        if let Ok((200, text)) = crate::http::get_with(addr, "/metrics", bearer).await
            && let Some(v) = crate::http::metric(&text, "tally_flush_lag_seconds")
        {
            max = Some(max.map_or(v, |m: f64| m.max(v)));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    max
}

/// Polls the age of this instance's last commit every 100 ms until `stop`; the largest.
async fn poll_commit_gap(url: String, stop: Arc<AtomicBool>) -> Option<f64> {
    let client = pg::connect(&url).await.ok()?;
    let mut max: Option<f64> = None;
    while !stop.load(Ordering::Relaxed) {
        if let Ok(Some(row)) = client
            .query_opt(
                "SELECT extract(epoch FROM clock_timestamp() - max(updated_at))::float8 \
                 FROM tally_instances",
                &[],
            )
            .await
            && let Ok(Some(v)) = row.try_get::<_, Option<f64>>(0)
        {
            max = Some(max.map_or(v, |m: f64| m.max(v)));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    max
}

async fn machine(args: &RunArgs) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let postgres = match pg::connect(&args.pg_admin_url).await {
        Ok(c) => c
            .query_one("SELECT version()", &[])
            .await
            .map(|r| r.get::<_, String>(0))
            .unwrap_or_default(),
        Err(_) => "unreachable".into(),
    };
    let wrk = tokio::process::Command::new(&args.wrk)
        .arg("--version")
        .output()
        .await
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .unwrap_or_default();
    let git_rev = tokio::process::Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short",
            "HEAD",
        ])
        .output()
        .await
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    Machine {
        nproc: std::thread::available_parallelism().map_or(0, usize::from),
        cpu,
        memory_gib: memory_kib / 1024.0 / 1024.0,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        postgres,
        wrk,
        git_rev,
    }
}

/// Progress lines: what runs, run i of N, and the time left.
struct Progress {
    total: usize,
    started: Instant,
    /// Planned seconds of each step (warm-up + run), and the overhead learnt so far.
    planned: Vec<f64>,
    overhead: f64,
    measured_steps: usize,
    components_s: f64,
}

impl Progress {
    fn new(steps: &[Step], plan: &Plan, components: bool, quick: bool) -> Self {
        Self {
            total: steps.len(),
            started: Instant::now(),
            planned: steps
                .iter()
                .map(|s| plan.warmup.as_secs_f64() + s.duration.as_secs_f64())
                .collect(),
            overhead: 1.5,
            measured_steps: 0,
            components_s: if !components {
                0.0
            } else if quick {
                15.0
            } else {
                120.0
            },
        }
    }

    fn announce(&self, i: usize, step: &Step) {
        let left: f64 = self.planned[i..]
            .iter()
            .map(|p| p + self.overhead)
            .sum::<f64>()
            + self.components_s;
        eprintln!(
            "[{:>3}/{}] {:<5} run {}  {:<32} {}s  (elapsed {}, ETA {})",
            i + 1,
            self.total,
            step.workload.name,
            step.run,
            step.variant.name,
            step.duration.as_secs(),
            fmt_secs(self.started.elapsed().as_secs_f64()),
            fmt_secs(left)
        );
    }

    fn finished(&mut self, i: usize, took: Duration) {
        let planned = self.planned[i];
        let extra = (took.as_secs_f64() - planned).max(0.0);
        // Running mean of the per-step overhead (start, warm-up excess, stop, check).
        self.measured_steps += 1;
        self.overhead += (extra - self.overhead) / self.measured_steps as f64;
    }

    fn component(&self, what: &str) {
        eprintln!(
            "[components] {what}  (elapsed {})",
            fmt_secs(self.started.elapsed().as_secs_f64())
        );
    }
}

fn fmt_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(sent1: u64, max_latency_us: u64, non_2xx: u64) -> WrkOutput {
        WrkOutput {
            sent1,
            items_per_request: 1,
            errors: Errors {
                status: non_2xx,
                ..Errors::default()
            },
            latency_us: crate::wrk::LatencyUs {
                max: max_latency_us,
                ..Default::default()
            },
            ..WrkOutput::default()
        }
    }

    #[test]
    fn a_store_matching_every_acknowledged_increment_passes_exactly() {
        let tail = Duration::from_millis(500);
        let check = judge(&output(1_000, 20_000, 0), 1_000, tail, 400);
        assert_eq!((check.mode.as_str(), check.pass), ("exact", true));
        let lost_one = judge(&output(1_000, 20_000, 0), 999, tail, 400);
        assert_eq!((lost_one.mode.as_str(), lost_one.pass), ("exact", false));
        let counted_twice = judge(&output(1_000, 20_000, 0), 1_001, tail, 400);
        assert!(!counted_twice.pass);
    }

    #[test]
    fn refusals_or_slow_answers_make_the_check_a_bound() {
        let tail = Duration::from_millis(500);
        // 10 requests refused: the store may hold 990..=1000.
        let refused = judge(&output(1_000, 20_000, 10), 990, tail, 400);
        assert_eq!((refused.mode.as_str(), refused.pass), ("bounded", true));
        assert!(!judge(&output(1_000, 20_000, 10), 989, tail, 400).pass);
        // A request slower than the tail: up to one per connection may be unanswered.
        let slow = judge(&output(1_000, 600_000, 0), 700, tail, 400);
        assert_eq!((slow.mode.as_str(), slow.pass), ("bounded", true));
        assert!(!judge(&output(1_000, 600_000, 0), 1_001, tail, 400).pass);
    }

    #[test]
    fn batch_requests_count_every_item() {
        let mut out = output(30, 1_000, 0);
        out.items_per_request = 1_000;
        let check = judge(&out, 30_000, Duration::from_millis(500), 32);
        assert_eq!((check.expected_min, check.pass), (30_000, true));
    }
}
