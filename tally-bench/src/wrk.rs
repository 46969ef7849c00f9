//! Running wrk with the Lua scripts of `bench/` and reading what their `done()` prints.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tokio::process::Command;

const INCREMENT_LUA: &str =
    include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/bench/increment.lua"));
const INCREMENTS_LUA: &str =
    include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/bench/increments.lua"));

/// What a load looks like.
#[derive(Debug, Clone, Copy)]
pub enum Load {
    /// POST /increment, keys from `keyspace`.
    Single { keyspace: u64 },
    /// POST /increments with `items` items per request.
    Batch { keyspace: u64, items: u32 },
}

/// wrk's settings for one invocation.
#[derive(Debug, Clone)]
pub struct WrkArgs {
    pub threads: u32,
    pub connections: u32,
    pub duration: Duration,
    /// Final part of the run posting value 0 (see bench/increment.lua); ZERO-length runs
    /// post only zeros.
    pub tail: Duration,
    /// Post only zeros (warm-up).
    pub zeros_only: bool,
    /// Bearer token sent with every request (the scripts read `TALLY_BENCH_TOKEN`).
    pub bearer: Option<&'static str>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Errors {
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    pub status: u64,
    pub timeout: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LatencyUs {
    pub mean: f64,
    pub stdev: f64,
    pub max: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
}

/// The line printed by the scripts' `done()`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WrkOutput {
    /// Requests posting value 1 (each item of a batch request posts 1).
    pub sent1: u64,
    /// Requests posting value 0 (the tail).
    pub sent0: u64,
    pub items_per_request: u64,
    pub requests: u64,
    pub duration_us: u64,
    pub bytes: u64,
    pub errors: Errors,
    pub latency_us: LatencyUs,
}

impl WrkOutput {
    pub fn requests_per_s(&self) -> f64 {
        self.requests as f64 / (self.duration_us.max(1) as f64 / 1e6)
    }

    pub fn items_per_s(&self) -> f64 {
        self.requests_per_s() * self.items_per_request as f64
    }
}

/// Writes the Lua scripts into `dir` once and returns their paths.
pub fn write_scripts(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let one = dir.join("increment.lua");
    let many = dir.join("increments.lua");
    std::fs::write(&one, INCREMENT_LUA)
        .with_context(|| format!("cannot write {}", one.display()))?;
    std::fs::write(&many, INCREMENTS_LUA)
        .with_context(|| format!("cannot write {}", many.display()))?;
    Ok((one, many))
}

/// Checks that wrk can be run; the error says how to install it.
pub async fn check_installed(wrk: &str) -> anyhow::Result<()> {
    match Command::new(wrk).arg("--version").output().await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "wrk is not installed (looked for `{wrk}`). Install it with \
             `apt-get update && apt-get install -y wrk`, or pass --wrk PATH."
        ),
        Err(e) => Err(e).with_context(|| format!("cannot run {wrk}")),
    }
}

/// Runs wrk against `addr` and returns what the script reported.
pub async fn run(
    wrk: &str,
    scripts: &(PathBuf, PathBuf),
    addr: SocketAddr,
    load: Load,
    args: &WrkArgs,
) -> anyhow::Result<WrkOutput> {
    let secs = args.duration.as_secs().max(1);
    let duration_arg = if args.zeros_only { 0 } else { secs };
    let tail = args.tail.as_secs_f64();
    let (script, url, extra) = match load {
        Load::Single { keyspace } => (
            &scripts.0,
            format!("http://{addr}/increment"),
            vec![
                keyspace.to_string(),
                duration_arg.to_string(),
                format!("{tail:.3}"),
            ],
        ),
        Load::Batch { keyspace, items } => (
            &scripts.1,
            format!("http://{addr}/increments"),
            vec![
                keyspace.to_string(),
                items.to_string(),
                duration_arg.to_string(),
                format!("{tail:.3}"),
            ],
        ),
    };
    let output = Command::new(wrk)
        .arg(format!("-t{}", args.threads))
        .arg(format!("-c{}", args.connections))
        .arg(format!("-d{secs}s"))
        .arg("--timeout")
        .arg("10s")
        .arg("-s")
        .arg(script)
        .arg(&url)
        .arg("--")
        .args(&extra)
        .env("TALLY_BENCH_TOKEN", args.bearer.unwrap_or_default())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("cannot run {wrk}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("TALLYBENCH "))
        .with_context(|| {
            format!(
                "wrk printed no result line (exit {}):\n{stdout}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
    serde_json::from_str(line).with_context(|| format!("cannot read wrk's result line {line:?}"))
}
