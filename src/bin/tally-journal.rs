//! `tally-journal`: prints what a tally journal holds, without changing it.
//!
//! For the operator whose instance refused to replay its journal (its records' fate in the
//! store can no longer be told, docs/operations.md "The journal's owner"), or who wants to
//! know what a data directory still owes the store. The output is what `POST /increments`
//! takes as NDJSON, so that records judged missing can be sent once their fate is decided.

use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tally::causes::Causes;
use tally::journal::{Journal, Replay};

/// Prints the increments in a tally journal, without changing anything (the journal may be
/// in use by a running tally: records whose fsync has not finished show too).
///
/// On stdout: one `{"key": …, "value": …}` line per key and batch, the batch's deltas
/// summed, batch after batch in seq order and keys sorted: NDJSON that `POST /increments`
/// takes (Content-Type: application/x-ndjson; split it to stay within the receiving
/// instance's --max-batch-items and --max-body-bytes, and note that one request is refused
/// whole if a line is). A key whose batch sums beyond 64 bits is left out and named on
/// stderr (tally's own replay sets it aside as dead letters). On stderr: the journal's owner
/// (owner.json), damage skipped, and per batch its seq and how many requests and keys it
/// holds.
///
/// Which batches the store lacks: every batch above the instance id's current `last_seq`
/// (`tally_instances`); of those at or below it, the ones above the seq at which another
/// journal took the id over from this one (the `applied_seq` of the "Claimed the instance
/// id." log line of the tally that did). A rebase noted in owner.json and not finished
/// changes this: see docs/operations.md, "The journal's owner".
#[derive(Debug, Parser)]
#[command(name = "tally-journal", version)]
struct Args {
    /// The data directory of the instance: the journal is its `journal/`.
    #[arg(long, env = "TALLY_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    /// The journal directory itself (one moved aside, say), instead of DATA_DIR/journal.
    #[arg(long, value_name = "DIR")]
    journal_dir: Option<PathBuf>,
    /// Prints only the batches with a seq above this one.
    #[arg(long, value_name = "SEQ", default_value_t = 0)]
    above: u64,
}

/// Exit code for a path that is not a journal, as for clap's usage errors.
const USAGE_ERROR: u8 = 2;

fn main() -> ExitCode {
    let args = Args::parse();
    // The journal's own warnings (which segment, where, why) go to stderr.
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_target(false)
        .without_time()
        .init();
    let dir = args
        .journal_dir
        .clone()
        .unwrap_or_else(|| args.data_dir.join("journal"));
    // A mistyped path must not read as an empty journal.
    if !dir.is_dir() {
        eprintln!("error: no journal directory at {}", dir.display());
        return ExitCode::from(USAGE_ERROR);
    }
    match run(&dir, args.above) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", Causes(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn run(dir: &std::path::Path, above: u64) -> anyhow::Result<()> {
    let mut replay = Replay::default();
    let cut_bytes = Journal::read(dir, &mut |record| {
        if record.seq > above {
            replay.add(record);
        }
    })
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
            "{cut_bytes} bytes of torn or corrupt records skipped (see the lines above)"
        )?;
    }
    let mut out = BufWriter::new(io::stdout().lock());
    for (seq, batch) in &replay.batches {
        writeln!(
            log,
            "batch {seq}: {} requests, {} keys",
            batch.records,
            batch.sums.len()
        )?;
        // Sorted, so that two dumps of one journal compare line by line.
        let mut sums: Vec<_> = batch.sums.iter().collect();
        sums.sort_unstable();
        for (key, &sum) in sums {
            // A zero sum is printed too: replay writes it, and it creates the counter.
            let Ok(value) = i64::try_from(sum) else {
                writeln!(
                    log,
                    "batch {seq}: key {key:?} sums to {sum}, beyond 64 bits: left out"
                )?;
                continue;
            };
            serde_json::to_writer(&mut out, &serde_json::json!({ "key": key, "value": value }))?;
            out.write_all(b"\n")?;
        }
    }
    out.flush()?;
    writeln!(
        log,
        "{} batches above {above}; {} requests",
        replay.batches.len(),
        replay.records()
    )?;
    Ok(())
}
