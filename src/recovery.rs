//! Start-up recovery: before tally listens, every delta the journal holds beyond the store's
//! last applied batch for this instance is written to the store.
//!
//! Each journal generation (the deltas acknowledged under one seq) is written as the batch it
//! would have been, under its own seq, in seq order, and the journal is trimmed only once all
//! are in. A crash part-way leaves the store's seq at the last generation written, so the next
//! start replays exactly the rest, and the store skips any it already has. (Re-adding the
//! records to the live generation would number them above every journal record: when they
//! needed several batches, the first one would mark the whole journal applied.)

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, anyhow};

use crate::aggregate::Sealed;
use crate::flush::Flusher;
use crate::journal::{Journal, Replay};

/// Writes the records of `replay` with a seq above `applied` through `flusher`, then trims
/// `journal`. Returns the seq of the last batch now in the store.
///
/// # Errors
///
/// A journal generation whose sum for a key does not fit in 64 bits (only a corrupted or
/// hand-edited journal can hold one), another process claiming the instance id meanwhile,
/// or a failed trim.
pub(crate) async fn replay_journal(
    flusher: &Flusher,
    journal: &Journal,
    replay: Replay,
    applied: u64,
) -> anyhow::Result<u64> {
    // Summed in 128 bits: the journal's order need not be the order the deltas were added
    // in, so a running 64-bit sum could overflow where the generation's sum does not.
    let mut generations: BTreeMap<u64, HashMap<String, i128>> = BTreeMap::new();
    let mut replayed = 0usize;
    for record in replay.records.into_iter().filter(|r| r.seq > applied) {
        replayed += record.entries.len();
        let sums = generations.entry(record.seq).or_default();
        for (key, delta) in record.entries {
            *sums.entry(key).or_default() += i128::from(delta);
        }
    }
    let mut applied = applied;
    for (seq, sums) in generations {
        let deltas = sums
            .into_iter()
            .map(|(key, sum)| match i64::try_from(sum) {
                Ok(delta) => Ok((key.into_boxed_str(), delta)),
                Err(_) => Err(anyhow!(
                    "journal generation {seq} sums to {sum} for key {key:?}, beyond 64 bits"
                )),
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .context("cannot replay the journal")?;
        flusher
            .commit(&Sealed::from_deltas(seq, deltas))
            .await
            .context("cannot replay the journal")?;
        applied = seq;
    }
    if replayed > 0 || replay.cut_bytes > 0 {
        tracing::info!(
            replayed,
            cut_bytes = replay.cut_bytes,
            "Replayed the journal."
        );
    }
    journal
        .trim(applied)
        .context("cannot trim the journal after replay")?;
    Ok(applied)
}
