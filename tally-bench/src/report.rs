//! Results on disk: results.json, results.csv, table.md, chart.svg (and curve.svg).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use crate::charts;
use crate::components::Capacity;
use crate::suite::{Results, RunRecord};

/// Mean, spread and range of one quantity over the runs of a variant.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Stat {
    pub mean: f64,
    pub sd: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        Self {
            mean,
            sd: var.sqrt(),
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

/// A variant against `noop-axum` run by run (its throughput, or its context switches): run
/// *i* of the variant over run *i* of the no-op, measured in the same round (variants run round-robin), so that drift
/// between rounds cancels; drift within a round does not. The host's noise drifts over
/// tens of seconds (the no-op alone varied by ±14 % from one 8 s run to the next on the
/// shared 2-core machines), so a ratio of means over three runs can miss or meet a target
/// by chance; the spread of the paired ratios says how far a difference can be trusted.
/// The interval is that of the mean of the ratios; verdicts stay on the ratio of the means,
/// which can differ a little.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Paired {
    /// Number of pairs: runs of the variant whose round has a no-op run to pair with.
    pub n: usize,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    /// Half-width of the 95 % confidence interval of `mean` (Student's t); `None` with a
    /// single pair.
    pub ci95: Option<f64>,
}

impl Paired {
    fn of(ratios: &[f64]) -> Option<Self> {
        let stat = Stat::of(ratios);
        let n = ratios.len();
        (n > 0).then(|| Self {
            n,
            mean: stat.mean,
            min: stat.min,
            max: stat.max,
            ci95: (n > 1).then(|| {
                // Sample standard deviation (n - 1), not `Stat`'s population one.
                let sd = stat.sd * (n as f64 / (n - 1) as f64).sqrt();
                t975(n - 1) * sd / (n as f64).sqrt()
            }),
        })
    }

    /// "; 10 runs 0.60–0.94, mean 0.78 ± 0.07 (95 %)", and ", target within noise" when
    /// `threshold` lies inside the interval (`what`: "target", "limit"). Numbers with
    /// `digits` decimals, each followed by `unit`.
    fn describe(&self, digits: usize, unit: &str, threshold: f64, what: &str) -> String {
        let mut text = format!(
            "; {} runs {:.digits$}–{:.digits$}{unit}",
            self.n, self.min, self.max
        );
        if let Some(h) = self.ci95 {
            let _ = write!(
                text,
                ", mean {:.digits$} ± {h:.digits$}{unit} (95 %)",
                self.mean
            );
        }
        if self.undecided(threshold) {
            let _ = write!(text, ", {what} within noise");
        }
        text
    }

    /// Whether `threshold` lies inside the 95 % interval: the run cannot tell the target
    /// met from missed.
    fn undecided(&self, threshold: f64) -> bool {
        self.ci95
            .is_some_and(|h| self.mean - h <= threshold && threshold <= self.mean + h)
    }
}

/// The 97.5 % quantile of Student's t with `df` degrees of freedom (two-sided 95 %).
fn t975(df: usize) -> f64 {
    const T: [f64; 15] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131,
    ];
    // Past 15, each range takes the quantile of its smallest df: an interval a little too
    // wide rather than too narrow.
    match df {
        0 => f64::INFINITY,
        1..=15 => T[df - 1],
        16..=20 => 2.120,
        21..=30 => 2.080,
        31..=60 => 2.040,
        _ => 2.000,
    }
}

/// One variant on one workload, over its runs.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub workload: String,
    pub variant: String,
    pub runs: usize,
    pub rps: Stat,
    pub items: Stat,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p99_ms_worst: f64,
    pub pg_cpu_cores: Option<f64>,
    pub server_cpu_us_per_request: Option<f64>,
    pub server_ctx_switches_per_request: Option<f64>,
    pub other_load_cores: f64,
    pub idle_cores: Option<f64>,
    pub flush_lag_max_s: Option<f64>,
    /// Throughput relative to `noop-axum` (plain `axum::serve`, what a user would pick
    /// instead of tally) in the same run.
    pub ratio_noop: Option<f64>,
    /// The same ratio run by run, see [`Paired`].
    pub ratio_noop_paired: Option<Paired>,
    /// Context switches per request over the no-op's, run by run, see [`Paired`].
    pub switches_paired: Option<Paired>,
    pub ratio_sync: Option<f64>,
    pub checks_passed: usize,
    pub checks: usize,
}

/// Summaries per workload, in run order.
pub fn summarise(runs: &[RunRecord]) -> Vec<(String, Vec<Summary>)> {
    let mut workloads: Vec<String> = Vec::new();
    for r in runs {
        if !workloads.contains(&r.workload) {
            workloads.push(r.workload.clone());
        }
    }
    workloads
        .into_iter()
        .map(|w| {
            let mut variants: Vec<String> = Vec::new();
            for r in runs.iter().filter(|r| r.workload == w) {
                if !variants.contains(&r.variant) {
                    variants.push(r.variant.clone());
                }
            }
            let mut summaries: Vec<Summary> = variants
                .iter()
                .map(|v| {
                    let rs: Vec<&RunRecord> = runs
                        .iter()
                        .filter(|r| r.workload == w && &r.variant == v)
                        .collect();
                    let n = rs.len().max(1) as f64;
                    let cpu: Vec<f64> = rs.iter().filter_map(|r| r.pg_cpu_per_s).collect();
                    let lag: Vec<f64> = rs.iter().filter_map(|r| r.flush_lag_max_s).collect();
                    let server: Vec<f64> = rs
                        .iter()
                        .filter_map(|r| r.server_cpu_us_per_request)
                        .collect();
                    Summary {
                        workload: w.clone(),
                        variant: v.clone(),
                        runs: rs.len(),
                        rps: Stat::of(&rs.iter().map(|r| r.requests_per_s).collect::<Vec<_>>()),
                        items: Stat::of(&rs.iter().map(|r| r.items_per_s).collect::<Vec<_>>()),
                        p50_ms: rs.iter().map(|r| r.latency_ms_p50).sum::<f64>() / n,
                        p99_ms: rs.iter().map(|r| r.latency_ms_p99).sum::<f64>() / n,
                        p99_ms_worst: rs.iter().map(|r| r.latency_ms_p99).fold(0.0, f64::max),
                        pg_cpu_cores: (!cpu.is_empty())
                            .then(|| cpu.iter().sum::<f64>() / cpu.len() as f64),
                        other_load_cores: rs.iter().map(|r| r.other_load_cores).sum::<f64>() / n,
                        idle_cores: mean(
                            &rs.iter().filter_map(|r| r.idle_cores).collect::<Vec<_>>(),
                        ),
                        server_cpu_us_per_request: mean(&server),
                        server_ctx_switches_per_request: mean(
                            &rs.iter()
                                .filter_map(|r| r.server_ctx_switches_per_request)
                                .collect::<Vec<_>>(),
                        ),
                        flush_lag_max_s: lag.iter().copied().reduce(f64::max),
                        ratio_noop: None,
                        ratio_noop_paired: None,
                        switches_paired: None,
                        ratio_sync: None,
                        checks_passed: rs
                            .iter()
                            .filter(|r| r.check.as_ref().is_some_and(|c| c.pass))
                            .count(),
                        checks: rs.iter().filter(|r| r.check.is_some()).count(),
                    }
                })
                .collect();
            let noop = summaries
                .iter()
                .find(|s| s.variant == "noop-axum")
                .map(|s| s.items.mean);
            let sync = summaries
                .iter()
                .find(|s| s.variant.starts_with("sync"))
                .map(|s| s.items.mean);
            // Run i of a variant over run i of the no-op, of what `of` reads from a run.
            let paired = |variant: &str, of: fn(&RunRecord) -> Option<f64>| {
                let ratios: Vec<f64> = runs
                    .iter()
                    .filter(|r| r.workload == w && r.variant == variant)
                    .filter_map(|r| {
                        let noop = runs.iter().find(|n| {
                            n.workload == w && n.variant == "noop-axum" && n.run == r.run
                        })?;
                        Some(of(r)? / of(noop).filter(|n| *n > 0.0)?)
                    })
                    .collect();
                Paired::of(&ratios)
            };
            for s in &mut summaries {
                s.ratio_noop_paired = paired(&s.variant, |r| Some(r.items_per_s));
                s.switches_paired = paired(&s.variant, |r| r.server_ctx_switches_per_request);
                s.ratio_noop = noop.filter(|n| *n > 0.0).map(|n| s.items.mean / n);
                s.ratio_sync = sync.filter(|n| *n > 0.0).map(|n| s.items.mean / n);
            }
            (w, summaries)
        })
        .collect()
}

fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

fn workload_title(w: &str) -> String {
    match w {
        "hot" => "hot path: POST /increment, keys from 1,000".into(),
        "full" => "full workload: POST /increment, keys from 100,000".into(),
        "batch" => {
            "batch ingest: POST /increments, 1,000 items per request, keys from 100,000".into()
        }
        other => other.into(),
    }
}

fn ratio(r: Option<f64>) -> String {
    r.map_or("–".into(), |r| format!("{r:.2}×"))
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.digits$}"))
}

fn checks(s: &Summary) -> String {
    if s.checks == 0 {
        "–".into()
    } else if s.checks_passed == s.checks {
        format!("{}/{} ok", s.checks_passed, s.checks)
    } else {
        format!("**{}/{} FAILED**", s.checks - s.checks_passed, s.checks)
    }
}

/// The markdown tables of a run (also printed at the end of it).
pub fn table_md(results: &Results) -> String {
    let mut md = String::new();
    let m = &results.machine;
    let _ = writeln!(
        md,
        "Measured {} on {} × {} ({:.0} GiB), kernel {}, {}, {}, git {}{}.\n",
        results.started,
        m.nproc,
        m.cpu,
        m.memory_gib,
        m.kernel,
        m.postgres.split(" on ").next().unwrap_or(&m.postgres),
        m.wrk.split(" [").next().unwrap_or(&m.wrk),
        m.git_rev,
        if results.quick {
            " — QUICK smoke run, not for comparison"
        } else {
            ""
        }
    );
    if let Some(r) = results.runs.first() {
        let _ = writeln!(
            md,
            "wrk -t{} -c{} -d{:.0}s per run (batch: -c{}), runs interleaved round-robin.\n",
            r.threads,
            r.connections,
            r.duration_s.round(),
            results
                .runs
                .iter()
                .find(|r| r.workload == "batch")
                .map_or(0, |r| r.connections)
        );
    }
    for (w, summaries) in summarise(&results.runs) {
        let _ = writeln!(md, "### {}\n", workload_title(&w));
        if w == "batch" {
            let _ = writeln!(
                md,
                "| variant | increments/s mean ± sd (min–max) | req/s | p50 ms, mean of runs | p99 ms, mean of runs | × noop-axum | server CPU µs/req | ctx switches/req | PG backend CPU (cores) | other load (cores) | idle (cores) | check |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
            );
            for s in &summaries {
                let _ = writeln!(
                    md,
                    "| {} | {:.0} ± {:.0} ({:.0}–{:.0}) | {:.0} | {:.2} | {:.2} | {} | {} | {} | {} | {:.2} | {} | {} |",
                    s.variant,
                    s.items.mean,
                    s.items.sd,
                    s.items.min,
                    s.items.max,
                    s.rps.mean,
                    s.p50_ms,
                    s.p99_ms,
                    ratio(s.ratio_noop),
                    opt(s.server_cpu_us_per_request, 1),
                    opt(s.server_ctx_switches_per_request, 3),
                    opt(s.pg_cpu_cores, 2),
                    s.other_load_cores,
                    opt(s.idle_cores, 2),
                    checks(s)
                );
            }
        } else {
            let _ = writeln!(
                md,
                "| variant | req/s mean ± sd (min–max) | p50 ms, mean of runs | p99 ms, mean of runs | × noop-axum | × sync | server CPU µs/req | ctx switches/req | PG backend CPU (cores) | max flush lag s | other load (cores) | idle (cores) | check |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
            );
            for s in &summaries {
                let _ = writeln!(
                    md,
                    "| {} | {:.0} ± {:.0} ({:.0}–{:.0}) | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} | {:.2} | {} | {} |",
                    s.variant,
                    s.rps.mean,
                    s.rps.sd,
                    s.rps.min,
                    s.rps.max,
                    s.p50_ms,
                    s.p99_ms,
                    ratio(s.ratio_noop),
                    ratio(s.ratio_sync),
                    opt(s.server_cpu_us_per_request, 1),
                    opt(s.server_ctx_switches_per_request, 3),
                    opt(s.pg_cpu_cores, 2),
                    opt(s.flush_lag_max_s, 2),
                    s.other_load_cores,
                    opt(s.idle_cores, 2),
                    checks(s)
                );
            }
        }
        md.push('\n');
    }
    if !results.curve.is_empty() {
        let _ = writeln!(
            md,
            "### flush-interval curve: tally ack=memory on PostgreSQL, full workload\n\n\
             | flush interval | req/s | PG backend CPU (cores) | max commit gap s | max tally_flush_lag_seconds | check |\n|---:|---:|---:|---:|---:|---|"
        );
        for r in &results.curve {
            let _ = writeln!(
                md,
                "| {}s | {:.0} | {} | {} | {} | {} |",
                r.flush_interval_s.unwrap_or(0.0),
                r.requests_per_s,
                opt(r.pg_cpu_per_s, 2),
                opt(r.commit_gap_max_s, 2),
                opt(r.flush_lag_max_s, 2),
                r.check
                    .as_ref()
                    .map_or("–", |c| if c.pass { "ok" } else { "**FAILED**" })
            );
        }
        md.push('\n');
    }
    if let Some(cap) = &results.capacity {
        md.push_str(&capacity_table(cap));
        md.push('\n');
    }
    if let Some(mem) = &results.memory {
        let _ = writeln!(
            md,
            "### memory per pending key\n\n{} distinct keys in an `Aggregator`: RSS +{:.1} MiB = {:.1} bytes per key, \
             of which {:.1} are the key's own bytes: **{:.1} bytes of overhead per key** (target ≤ 100).\n",
            mem.keys,
            (mem.rss_after_bytes.saturating_sub(mem.rss_before_bytes)) as f64 / 1048576.0,
            mem.bytes_per_key,
            mem.key_bytes_per_key,
            mem.overhead_bytes_per_key
        );
    }
    md.push_str(&targets_md(results));
    md
}

/// The flush-capacity table.
pub fn capacity_table(cap: &Capacity) -> String {
    let mut md = String::from(
        "### flush capacity into PostgreSQL (keys/s, batches of distinct keys, same run)\n\n\
         | keyspace | batch | direct statement | PgStore::apply | Flusher::flush | flusher ÷ direct | PG CPU µs/key (direct / flusher) |\n\
         |---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut seen = Vec::new();
    for p in &cap.points {
        if seen.contains(&(p.keyspace, p.batch)) {
            continue;
        }
        seen.push((p.keyspace, p.batch));
        let get = |m: &str| {
            cap.points
                .iter()
                .find(|q| q.keyspace == p.keyspace && q.batch == p.batch && q.method == m)
        };
        let (Some(d), Some(a), Some(f)) = (get("direct"), get("apply"), get("flusher")) else {
            continue;
        };
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} ({:.2}×) | {:.0} | {:.2}× | {:.1} / {:.1} |",
            p.keyspace,
            p.batch,
            d.keys_per_s,
            a.keys_per_s,
            a.keys_per_s / d.keys_per_s.max(1e-9),
            f.keys_per_s,
            f.keys_per_s / d.keys_per_s.max(1e-9),
            d.pg_cpu_us_per_key,
            f.pg_cpu_us_per_key
        );
    }
    md
}

fn find<'a>(all: &'a [(String, Vec<Summary>)], w: &str, v: &str) -> Option<&'a Summary> {
    all.iter()
        .find(|(name, _)| name == w)
        .and_then(|(_, s)| s.iter().find(|s| s.variant == v))
}

/// A throughput target's "measured" cell and whether the ratio of the means reaches `min`.
/// The cell adds the paired per-run ratios ([`Paired`]): their range, their mean with its
/// 95 % interval, and "target within noise" when `min` lies inside that interval, i.e.
/// when this run cannot tell the target met from missed.
fn throughput(s: Option<&Summary>, min: f64) -> (String, Option<bool>) {
    let Some(r) = s.and_then(|s| s.ratio_noop) else {
        return ("–".into(), None);
    };
    let mut measured = ratio(Some(r));
    if let Some(p) = s.and_then(|s| s.ratio_noop_paired) {
        measured.push_str(&p.describe(2, "", min, "target"));
    }
    (measured, Some(r >= min))
}

/// Every speed target of the project with what this run measured. Ratios are against
/// `noop-axum` (plain `axum::serve`) in the same run.
pub fn targets_md(results: &Results) -> String {
    let all = summarise(&results.runs);
    let mut md = String::from(
        "### Targets, as measured in this run (ratios against noop-axum)\n\n| target | measured | met? |\n|---|---|---|\n",
    );
    let mut row = |target: &str, measured: String, met: Option<bool>| {
        let met = match met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "not measured",
        };
        let _ = writeln!(md, "| {target} | {measured} | {met} |");
    };
    // Throughput targets are met on the ratio of the means, as every run so far was judged,
    // with the paired per-run ratios beside them (`throughput`).
    for store in ["sqlite", "pg"] {
        let s = find(&all, "hot", &format!("tally-memory-{store}"));
        let (measured, met) = throughput(s, 0.85);
        row(
            &format!("hot: tally ack=memory ({store}) ≥ 0.85×"),
            measured,
            met,
        );
        let s = find(&all, "hot", &format!("tally-journal-{store}"));
        let (measured, met) = throughput(s, 0.80);
        row(
            &format!("hot: tally ack=journal ({store}) ≥ 0.80×, p99 ≤ 15 ms"),
            s.map_or(measured.clone(), |s| {
                format!(
                    "{measured}; p99 {:.1} ms (worst run {:.1})",
                    s.p99_ms, s.p99_ms_worst
                )
            }),
            met.zip(s).map(|(met, s)| met && s.p99_ms_worst <= 15.0),
        );
    }
    for (v, min) in [("tally-memory-pg", 0.80), ("tally-journal-pg", 0.75)] {
        let (measured, met) = throughput(find(&all, "full", v), min);
        row(&format!("full: {v} ≥ {min:.2}×"), measured, met);
    }
    for w in ["hot", "full"] {
        for v in ["tally-store-sqlite", "tally-store-pg"] {
            if let Some(s) = find(&all, w, v) {
                let (measured, met) = throughput(Some(s), 0.50);
                row(&format!("{w}: {v} ≥ 0.50×"), measured, met);
            }
        }
    }
    // Against the no-op of the same workload, as the throughput ratios are: the no-op's own
    // switches differ by workload (the full workload's wrk script does more per request).
    // Per request of one increment: a batch request carries a thousand.
    for (workload, summaries) in all.iter().filter(|(w, _)| w != "batch") {
        let Some(noop) =
            find(&all, workload, "noop-axum").and_then(|s| s.server_ctx_switches_per_request)
        else {
            continue;
        };
        for s in summaries.iter().filter(|s| s.variant.starts_with("tally-")) {
            if let Some(ctx) = s.server_ctx_switches_per_request {
                // The no-op's own switches swing from run to run more than tally's do
                // (docs/benchmarks.md), so the paired ratios say what the limit can tell.
                let mut measured = format!("{ctx:.3}");
                if let Some(p) = s.switches_paired {
                    measured.push_str(&p.describe(1, "×", 2.0, "limit"));
                }
                row(
                    &format!(
                        "{} {}: context switches/request ≤ 2 × noop-axum's ({noop:.3})",
                        s.workload, s.variant
                    ),
                    measured,
                    Some(ctx <= 2.0 * noop),
                );
            }
        }
    }
    for v in ["tally-memory-pg", "tally-journal-pg"] {
        let s = find(&all, "full", v);
        row(
            &format!("full: {v} ≥ 6 × sync"),
            s.map_or("–".into(), |s| ratio(s.ratio_sync)),
            s.and_then(|s| s.ratio_sync).map(|r| r >= 6.0),
        );
    }
    match &results.capacity {
        Some(cap) => {
            let mut worst: Option<(f64, usize, usize)> = None;
            for f in cap.points.iter().filter(|p| p.method == "flusher") {
                if let Some(d) = cap.points.iter().find(|d| {
                    d.method == "direct" && d.keyspace == f.keyspace && d.batch == f.batch
                }) {
                    let r = f.keys_per_s / d.keys_per_s.max(1e-9);
                    if worst.is_none_or(|(w, _, _)| r < w) {
                        worst = Some((r, f.keyspace, f.batch));
                    }
                }
            }
            row(
                "flusher ≥ 0.90 × direct statement (keys/s)",
                worst.map_or("–".into(), |(r, ks, b)| {
                    format!("worst {r:.2}× (keyspace {ks}, batch {b})")
                }),
                worst.map(|(r, _, _)| r >= 0.90),
            );
        }
        None => row("flusher ≥ 0.90 × direct statement", "–".into(), None),
    }
    for v in ["tally-memory-pg", "tally-journal-pg", "tally-memory-sqlite"] {
        let s = find(&all, "batch", v);
        row(
            &format!("batch: POST /increments ({v}) ≥ 1,000,000 increments/s"),
            s.map_or("–".into(), |s| {
                format!("{:.0} increments/s", s.items.mean)
            }),
            s.map(|s| s.items.mean >= 1e6),
        );
    }
    match &results.memory {
        Some(m) => row(
            "memory ≤ 100 bytes per pending key beyond the key",
            format!("{:.1} bytes", m.overhead_bytes_per_key),
            Some(m.overhead_bytes_per_key <= 100.0),
        ),
        None => row("memory ≤ 100 bytes per pending key", "–".into(), None),
    }
    if results.curve.is_empty() {
        row(
            "flush lag ≤ interval + 1 s under full load",
            "curve not run (--flush-curve)".into(),
            None,
        );
    } else {
        let worst = results
            .curve
            .iter()
            .map(|r| {
                let lag = r
                    .commit_gap_max_s
                    .unwrap_or(0.0)
                    .max(r.flush_lag_max_s.unwrap_or(0.0));
                (lag - r.flush_interval_s.unwrap_or(0.0), r)
            })
            .fold(None::<(f64, &RunRecord)>, |acc, x| match acc {
                Some(a) if a.0 >= x.0 => Some(a),
                _ => Some(x),
            });
        row(
            "flush lag ≤ interval + 1 s under full load",
            worst.map_or("–".into(), |(excess, r)| {
                format!(
                    "worst: interval {}s, lag exceeded the interval by {excess:.2}s",
                    r.flush_interval_s.unwrap_or(0.0)
                )
            }),
            worst.map(|(excess, _)| excess <= 1.0),
        );
    }
    let checks: Vec<bool> = results
        .runs
        .iter()
        .chain(&results.curve)
        .filter_map(|r| r.check.as_ref().map(|c| c.pass))
        .collect();
    row(
        "correctness: store total == increments answered 202, every run",
        format!(
            "{}/{} runs passed",
            checks.iter().filter(|c| **c).count(),
            checks.len()
        ),
        Some(checks.iter().all(|c| *c)),
    );
    // Not targets: the same ratio for a no-op whose reply another thread releases, what an
    // asynchronous acknowledgement costs on axum's multi-thread runtime, to read the
    // journal's against.
    for w in ["hot", "full"] {
        if let Some(s) = find(&all, w, "noop-axum-deferred") {
            let _ = writeln!(
                md,
                "| {w}: reference, noop-axum-deferred (a no-op whose reply another thread releases) | {} | – |",
                ratio(s.ratio_noop)
            );
        }
    }
    md
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

fn csv(results: &Results) -> String {
    let mut out = String::from(
        "section,workload,variant,run,threads,connections,duration_s,requests,requests_per_s,items_per_s,\
         latency_ms_p50,latency_ms_p90,latency_ms_p99,latency_ms_max,errors_connect,errors_read,errors_write,\
         errors_non2xx,errors_timeout,check_mode,check_expected_min,check_expected_max,check_stored,check_pass,\
         pg_cpu_cores,server_cpu_us_per_request,other_load_cores,flush_lag_max_s,commit_gap_max_s,flush_interval_s,stop_s,\
         idle_cores\n",
    );
    let f = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.4}"));
    for (section, rows) in [("matrix", &results.runs), ("curve", &results.curve)] {
        for r in rows {
            let c = r.check.as_ref();
            let _ = writeln!(
                out,
                "{section},{},{},{},{},{},{:.3},{},{:.1},{:.1},{:.3},{:.3},{:.3},{:.3},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{:.3},{:.3},{:.3}",
                csv_field(&r.workload),
                csv_field(&r.variant),
                r.run,
                r.threads,
                r.connections,
                r.duration_s,
                r.requests,
                r.requests_per_s,
                r.items_per_s,
                r.latency_ms_p50,
                r.latency_ms_p90,
                r.latency_ms_p99,
                r.latency_ms_max,
                r.errors.connect,
                r.errors.read,
                r.errors.write,
                r.errors.status,
                r.errors.timeout,
                c.map_or("", |c| c.mode.as_str()),
                c.map_or(String::new(), |c| c.expected_min.to_string()),
                c.map_or(String::new(), |c| c.expected_max.to_string()),
                c.map_or(String::new(), |c| c.stored.to_string()),
                c.map_or(String::new(), |c| c.pass.to_string()),
                f(r.pg_cpu_per_s),
                f(r.server_cpu_us_per_request),
                r.other_load_cores,
                f(r.flush_lag_max_s),
                f(r.commit_gap_max_s),
                f(r.flush_interval_s),
                r.stop_s,
                f(r.idle_cores)
            );
        }
    }
    out
}

/// The results of the run written to `dir` (its results.json).
pub fn read_results(dir: &Path) -> anyhow::Result<Results> {
    #[derive(serde::Deserialize)]
    struct File {
        results: Results,
    }
    let path = dir.join("results.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let file: File = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a tally-bench results.json", path.display()))?;
    Ok(file.results)
}

/// Writes every result file into `dir`.
pub fn write_all(dir: &Path, results: &Results) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
    };
    let summaries = summarise(&results.runs);
    let json = serde_json::json!({ "results": results, "summaries": summaries });
    write("results.json", &serde_json::to_string_pretty(&json)?)?;
    write("results.csv", &csv(results))?;
    let mut md = format!(
        "# tally-bench results\n\nCommand: `{}`\n\n",
        results.command
    );
    md.push_str(&table_md(results));
    md.push_str("\n![requests/s per variant](chart.svg)\n");
    if !results.curve.is_empty() {
        md.push_str("\n![flush-interval curve](curve.svg)\n");
    }
    write("table.md", &md)?;
    // In the batch panel the no-op server (which does not even parse the 1,000 items) would
    // dwarf every bar; it stays in the table.
    let panels: Vec<(String, Vec<Summary>)> = summaries
        .into_iter()
        .map(|(w, s)| {
            if w == "batch" {
                let s: Vec<Summary> = s
                    .into_iter()
                    .filter(|s| !s.variant.starts_with("noop"))
                    .collect();
                (
                    format!(
                        "{} (no-ops left out: they do not parse)",
                        workload_title(&w)
                    ),
                    s,
                )
            } else {
                (workload_title(&w), s)
            }
        })
        .filter(|(_, s)| !s.is_empty())
        .collect();
    if !panels.is_empty() {
        charts::throughput(&dir.join("chart.svg"), &panels)?;
    }
    if !results.curve.is_empty() {
        charts::curve(&dir.join("curve.svg"), &results.curve)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(variant: &str, run: u32, items_per_s: f64) -> RunRecord {
        RunRecord {
            workload: "full".into(),
            variant: variant.into(),
            run,
            items_per_s,
            requests_per_s: items_per_s,
            // Switches fall as throughput rises, so that no two runs give the same ratio.
            server_ctx_switches_per_request: Some(1000.0 / items_per_s),
            ..RunRecord::default()
        }
    }

    #[test]
    fn each_run_is_paired_with_the_no_op_run_of_its_round() {
        // The no-op's runs drift (90k, 60k, 75k); tally's follow them at 0.8, 0.7, 0.9.
        // Listed out of order, and round 4 has no no-op run: it makes no pair.
        let runs = [
            run("tally", 3, 67_500.0),
            run("noop-axum", 1, 90_000.0),
            run("tally", 4, 10_000.0),
            run("tally", 2, 42_000.0),
            run("noop-axum", 3, 75_000.0),
            run("tally", 1, 72_000.0),
            run("noop-axum", 2, 60_000.0),
        ];
        let all = summarise(&runs);
        let tally = find(&all, "full", "tally").expect("summarised");
        let paired = tally.ratio_noop_paired.expect("three pairs");
        assert_eq!(paired.n, 3, "{paired:?}");
        assert!((paired.min - 0.7).abs() < 1e-9, "{paired:?}");
        assert!((paired.max - 0.9).abs() < 1e-9, "{paired:?}");
        assert!((paired.mean - 0.8).abs() < 1e-9, "{paired:?}");
        // Sample sd 0.1 over 3 pairs: t(2) = 4.303, half-width 4.303 × 0.1 / √3 = 0.248.
        let half = paired.ci95.expect("more than one pair");
        assert!((half - 4.303 * 0.1 / 3f64.sqrt()).abs() < 1e-9, "{half}");
        assert!(paired.undecided(0.75) && paired.undecided(0.56));
        assert!(!paired.undecided(0.5) && !paired.undecided(1.1));
        // Switches are paired the same way: tally's over the no-op's, run by run.
        let switches = tally.switches_paired.expect("three pairs");
        assert!((switches.min - 1.0 / 0.9).abs() < 1e-9, "{switches:?}");
        assert!((switches.max - 1.0 / 0.7).abs() < 1e-9, "{switches:?}");
    }

    #[test]
    fn a_target_the_noise_cannot_decide_says_so_and_keeps_its_verdict() {
        let runs = [
            run("noop-axum", 1, 100_000.0),
            run("tally", 1, 85_000.0),
            run("noop-axum", 2, 100_000.0),
            run("tally", 2, 65_000.0),
        ];
        let all = summarise(&runs);
        let s = find(&all, "full", "tally");
        let (measured, met) = throughput(s, 0.74);
        assert_eq!(met, Some(true), "0.75× of the means meets 0.74×");
        assert!(measured.contains("target within noise"), "{measured}");
        let (measured, met) = throughput(s, 0.70);
        assert_eq!(met, Some(true));
        assert!(measured.contains("2 runs 0.65–0.85"), "{measured}");
        // One pair has no interval, so nothing is called noise.
        let one = summarise(&runs[..2]);
        let (measured, met) = throughput(find(&one, "full", "tally"), 0.86);
        assert_eq!(met, Some(false));
        assert!(
            !measured.contains("noise") && !measured.contains("±"),
            "{measured}"
        );
    }

    #[test]
    fn the_verdict_is_on_the_ratio_of_the_means_not_the_mean_of_the_ratios() {
        // Ratios 0.8 and 0.6 (mean 0.70); means 55k over 75k (0.733).
        let runs = [
            run("noop-axum", 1, 100_000.0),
            run("tally", 1, 80_000.0),
            run("noop-axum", 2, 50_000.0),
            run("tally", 2, 30_000.0),
        ];
        let all = summarise(&runs);
        let (measured, met) = throughput(find(&all, "full", "tally"), 0.72);
        assert_eq!(met, Some(true), "{measured}");
        assert!(measured.starts_with("0.73×"), "{measured}");
        assert!(measured.contains("mean 0.70 ±"), "{measured}");
        let (_, met) = throughput(find(&all, "full", "tally"), 0.74);
        assert_eq!(met, Some(false));
    }

    #[test]
    fn a_run_written_to_disk_reads_back_for_a_new_report_even_without_newer_fields() {
        let dir = std::env::temp_dir().join(format!("tally-bench-report-{}", std::process::id()));
        let results = Results {
            started: "2026-12-06T14:33:00Z".into(),
            command: "tally-bench --workloads full".into(),
            quick: false,
            machine: crate::suite::Machine {
                nproc: 2,
                cpu: "AMD EPYC".into(),
                memory_gib: 24.0,
                kernel: "6.18".into(),
                postgres: "PostgreSQL 15".into(),
                wrk: "wrk 4.1.0".into(),
                git_rev: "ecb0f1c".into(),
            },
            runs: vec![
                RunRecord {
                    idle_cores: Some(0.12),
                    ..run("noop-axum", 1, 80_000.0)
                },
                run("tally", 1, 60_000.0),
            ],
            curve: Vec::new(),
            capacity: None,
            memory: None,
            elapsed_s: 40.0,
        };
        write_all(&dir, &results).expect("written");
        let back = read_results(&dir).expect("read back");
        assert_eq!(back.runs.len(), 2);
        assert_eq!(back.runs[0].idle_cores, Some(0.12));
        assert_eq!(back.runs[1].items_per_s, 60_000.0);
        assert_eq!(back.machine.git_rev, "ecb0f1c");

        // A results.json from before `idle_cores` existed.
        let path = dir.join("results.json");
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("readable")).expect("json");
        for r in json["results"]["runs"].as_array_mut().expect("runs") {
            r.as_object_mut().expect("a run").remove("idle_cores");
        }
        std::fs::write(&path, json.to_string()).expect("rewritten");
        let old = read_results(&dir).expect("an older file reads too");
        assert_eq!(old.runs[0].idle_cores, None, "not measured, so not 0");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
