//! `tally-journal`: prints what a tally journal holds, without changing it.
//!
//! For the operator whose instance refused to replay its journal (its records' fate in the
//! store can no longer be told, docs/operations.md "The journal's owner"), or who wants to
//! know what a data directory still owes the store. The output is what `POST /increments`
//! takes as NDJSON, so that records judged missing can be sent once their fate is decided.

use std::collections::BTreeMap;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tally::journal::{Journal, Replay, in_pieces};

/// Prints the acknowledged increments in a tally data directory's journal, without
/// changing anything (the journal may be in use by a running tally).
///
/// On stdout: one `{"key": …, "value": …}` line per key and batch, each batch's deltas
/// summed (a sum beyond 64 bits as several lines that add up to it): NDJSON that
/// `POST /increments` takes (Content-Type: application/x-ndjson, at most
/// --max-batch-items lines per request). On stderr: the journal's owner (owner.json) and,
/// per batch, its seq and how many requests and keys it holds.
///
/// Whether the store already has a batch is for you to decide: a batch at or below the
/// instance's `last_seq` in `tally_instances`, written by this journal, is in the store.
#[derive(Debug, Parser)]
#[command(name = "tally-journal", version)]
struct Args {
    /// The data directory of the instance (the journal is its `journal/`).
    #[arg(long, env = "TALLY_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    /// Prints only the batches with a seq above this one.
    #[arg(long, value_name = "SEQ", default_value_t = 0)]
    above: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    // A mistyped path must not read as an empty journal.
    anyhow::ensure!(
        args.data_dir.is_dir(),
        "no data directory at {}",
        args.data_dir.display()
    );
    let dir = args.data_dir.join("journal");
    let mut replay = Replay::default();
    let cut_bytes = Journal::read(&dir, &mut |record| replay.add(record))
        .with_context(|| format!("cannot read the journal in {}", dir.display()))?;
    let mut log = io::stderr().lock();
    match std::fs::read_to_string(dir.join("owner.json")) {
        Ok(owner) => writeln!(log, "owner: {}", owner.trim())?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            writeln!(log, "owner: none recorded (no owner.json)")?;
        }
        Err(e) => writeln!(log, "owner: cannot read owner.json: {e}")?,
    }
    if cut_bytes > 0 {
        writeln!(
            log,
            "{cut_bytes} bytes of torn or corrupt records skipped (none of them acknowledged if they end the last segment)"
        )?;
    }
    let batches: BTreeMap<_, _> = replay
        .batches
        .into_iter()
        .filter(|(seq, _)| *seq > args.above)
        .collect();
    let mut out = BufWriter::new(io::stdout().lock());
    for (seq, batch) in &batches {
        writeln!(
            log,
            "batch {seq}: {} requests, {} keys",
            batch.records,
            batch.sums.len()
        )?;
        for (key, &sum) in &batch.sums {
            for value in in_pieces(sum) {
                serde_json::to_writer(
                    &mut out,
                    &serde_json::json!({ "key": key, "value": value }),
                )?;
                out.write_all(b"\n")?;
            }
        }
    }
    out.flush()?;
    writeln!(
        log,
        "{} batches above {}; {} requests",
        batches.len(),
        args.above,
        batches.values().map(|b| b.records).sum::<usize>()
    )?;
    Ok(())
}
