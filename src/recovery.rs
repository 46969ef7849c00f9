//! Start-up recovery: before tally listens, every delta the journal holds beyond the store's
//! last applied batch for this instance is written to the store.
//!
//! # Whose records
//!
//! A record carries the seq of its batch, and "beyond the store's last applied batch" means
//! beyond the last batch of the claim that numbered it. Two things break that:
//!
//! - **Another instance id.** The journal directory's `owner.json` names the instance id its
//!   records were written as. With records in the journal, a start as another id refuses to
//!   start (replayed under another id's numbers they would count twice or not at all).
//! - **Another journal claimed the id since** (two data directories run as one id, one after
//!   the other, or at once until one was fenced): that one numbered its batches from where
//!   the store stood, with the numbers this journal's unapplied records carry. `owner.json`
//!   also holds the journal's own random id; the store records which journal claimed each id
//!   last, the one before it, and the seq reached when the claim passed between them
//!   ([`Handover`]). A journal with records claims exclusively ([`Claimant::exclusive`]);
//!   if another journal claimed since, the claim fails, claiming nothing, and says so. If
//!   the claim passed from this journal, the handover seq splits its records exactly: those
//!   at or below it are in the store (a claim waits for the previous holder's last commit,
//!   and fences it), those above it were not in the store when the claim passed, and never
//!   will be under their numbers. The latter are **rebased**: written as one new batch,
//!   numbered above both the store's last seq and every record, so that nothing the journal
//!   holds can replay again after it. The rebase is noted in `owner.json` before the claim
//!   is taken back, and again with its seq before the batch is written, so a crash at any
//!   point resumes it: while the claim is still this journal's, the store's last seq says
//!   whether the batch is in; once it passed on again, the handover seq does. If the claim
//!   passed through more journals than that, or through a claim that did not record its
//!   journal (an older tally's), which records are in can no longer be told: tally refuses
//!   to start, and says what the operator can do.
//!
//! A journal without `owner.json` (written by an older tally) is replayed as before, and
//! gets one, unless a journal that records itself has claimed the id since: then it is
//! refused like any journal whose records' fate cannot be told.
//!
//! # Replay
//!
//! Each journal generation (the deltas acknowledged under one seq) is written as the batch it
//! would have been, under its own seq, in seq order, and the journal is trimmed only once all
//! are in. A crash part-way leaves the store's seq at the last generation written, so the next
//! start replays exactly the rest, and the store skips any it already has. (Re-adding the
//! records to the live generation would number them above every journal record: when they
//! needed several batches, the first one would mark the whole journal applied.)

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use anyhow::{Context, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::aggregate::Sealed;
use crate::flush::Flusher;
use crate::journal::{Journal, Replay, ReplayedBatch, no_follow};
use crate::store::{Claim, Claimant, DeadLetter, Store, StoreError};

/// The file in the journal directory that says whose its records are.
const OWNER_FILE: &str = "owner.json";

/// Whose records a journal directory holds (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Owner {
    /// The journal's own id: random, made once, the claimant it records in the store.
    journal: String,
    /// The instance id its records were written as.
    instance_id: String,
    /// A rebase in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rebase: Option<Rebase>,
}

/// Records acknowledged after another journal claimed the id, to be written as one new
/// batch: those numbered `from + 1 ..= through`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Rebase {
    from: u64,
    through: u64,
    /// The new batch's seq, once the claim is taken back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
}

/// The journal's side of this start's claim (see the module docs).
#[derive(Debug)]
pub(crate) struct Ownership {
    path: std::path::PathBuf,
    owner: Owner,
    /// What `owner.json` holds (an older tally's journal has none).
    written: Option<Owner>,
}

impl Ownership {
    /// Reads `owner.json` in `journal_dir` and checks that `replay`'s records, if any, were
    /// written as `instance_id`.
    ///
    /// # Errors
    ///
    /// If the journal holds records of another instance id (the message says how to write
    /// them), or `owner.json` cannot be read or parsed.
    pub(crate) fn check(
        journal_dir: &Path,
        instance_id: &str,
        replay: &Replay,
    ) -> anyhow::Result<Self> {
        let path = journal_dir.join(OWNER_FILE);
        let recorded = read_owner(&path)?;
        let has_records = !replay.is_empty();
        if let Some(owner) = &recorded
            && has_records
            && owner.instance_id != instance_id
        {
            bail!(
                "the journal in {} holds {} written as instance id {:?}, but this process runs as \
                 {instance_id:?}; replayed as another id they would be counted twice or lost, so \
                 tally does not start. Start it as {:?} (--instance-id) to write them to the \
                 store; after a clean stop its journal is empty and the id can change",
                journal_dir.display(),
                describe(replay),
                owner.instance_id,
                owner.instance_id,
            );
        }
        if has_records && recorded.is_none() {
            tracing::warn!(journal = %journal_dir.display(), "The journal has no owner.json (an older tally wrote it): replaying it as this instance id, unless another journal has claimed the id since.");
        }
        let owner = Owner {
            journal: recorded
                .as_ref()
                .map_or_else(|| uuid::Uuid::new_v4().to_string(), |o| o.journal.clone()),
            instance_id: instance_id.to_owned(),
            // A rebase whose records are gone (trimmed once it was written) is finished.
            rebase: recorded
                .as_ref()
                .and_then(|o| o.rebase)
                .filter(|_| has_records),
        };
        Ok(Self {
            path,
            owner,
            written: recorded,
        })
    }

    /// Claims the instance id in `store` for this journal, and returns the claim with the
    /// records to replay under it: `replay` as it is, or with the records of a rebase
    /// renumbered as its batch and those already in the store left out.
    ///
    /// # Errors
    ///
    /// If the store cannot be claimed, another journal claimed the id in a way that leaves
    /// the records' fate unknown (the message says what the operator can do), or
    /// `owner.json` cannot be written.
    pub(crate) async fn claim(
        &mut self,
        store: &dyn Store,
        replay: Replay,
    ) -> anyhow::Result<(Claim, Replay)> {
        // With records, the claim is exclusive; a journal from before owner records claims
        // so too, under its new id: it passes while the id's claim predates them, as that
        // journal's own did.
        if replay.is_empty() {
            let claim = self.take_over(store).await?;
            self.record()?;
            return Ok((claim, replay));
        }
        let rebase = match (self.owner.rebase, self.claim_as(store, true).await) {
            // Nobody else claimed the id since this journal last did.
            (None, Ok(claim)) => {
                self.record()?;
                return Ok((claim, replay));
            }
            (Some(rebase @ Rebase { seq: Some(_), .. }), Ok(claim)) => {
                return Ok((claim, rebased(replay, rebase)));
            }
            // Decided by an earlier start that stopped before it numbered the batch: the
            // batch was not written, whoever claimed since.
            (
                Some(rebase @ Rebase { seq: None, .. }),
                Ok(_) | Err(StoreError::ClaimedElsewhere { .. }),
            ) => rebase,
            (Some(Rebase { seq: None, .. }), Err(e)) => return Err(self.cannot_claim(store, e)),
            // The claim passed from this journal at `handover`: every batch it wrote is at or
            // below that, and none above.
            (pending, Err(refused)) => {
                let handover = self.passed_from_here(store, refused, &replay)?;
                let stored = match pending {
                    None => replay.max_seq <= handover,
                    // A rebase numbered `seq` before the claim passed on: the batch is in
                    // if the claim passed on at or after it (it is the only batch that
                    // start wrote).
                    Some(Rebase { seq, .. }) => seq.is_some_and(|seq| seq <= handover),
                };
                if stored {
                    tracing::info!(
                        handover_seq = handover,
                        "Another journal claimed this instance id since; every record of this one is in the store."
                    );
                    self.owner.rebase = None;
                    let claim = self.take_over(store).await?;
                    self.record()?;
                    return Ok((claim, replay));
                }
                match pending {
                    Some(rebase) => Rebase {
                        seq: None,
                        ..rebase
                    },
                    None => Rebase {
                        from: handover,
                        through: replay.max_seq,
                        seq: None,
                    },
                }
            }
        };
        // Noted before the claim is taken back: from then on the store no longer says where
        // this journal's batches end.
        self.owner.rebase = Some(rebase);
        self.record()?;
        let claim = self.take_over(store).await?;
        let rebase = Rebase {
            seq: Some(claim.last_seq.max(rebase.through) + 1),
            ..rebase
        };
        self.owner.rebase = Some(rebase);
        self.record()?;
        tracing::warn!(
            records_from = rebase.from + 1,
            records_through = rebase.through,
            seq = rebase.seq,
            "Another journal claimed this instance id since; writing this journal's records that were not in the store then as one new batch."
        );
        Ok((claim, rebased(replay, rebase)))
    }

    /// Forgets a finished rebase, once its batch is in the store and the journal trimmed.
    ///
    /// # Errors
    ///
    /// If `owner.json` cannot be written.
    pub(crate) fn finish(&mut self) -> anyhow::Result<()> {
        if self.owner.rebase.take().is_some() {
            self.record()?;
        }
        Ok(())
    }

    /// Claims the id whoever held it last (not exclusively): taking it over.
    async fn take_over(&self, store: &dyn Store) -> anyhow::Result<Claim> {
        self.claim_as(store, false)
            .await
            .map_err(|e| self.cannot_claim(store, e))
    }

    /// A claim that failed for a reason of the store's.
    fn cannot_claim(&self, store: &dyn Store, e: StoreError) -> anyhow::Error {
        anyhow::Error::new(e).context(format!(
            "cannot claim instance id {:?} in the {} store",
            self.owner.instance_id,
            store.name()
        ))
    }

    async fn claim_as(&self, store: &dyn Store, exclusive: bool) -> Result<Claim, StoreError> {
        let by = Claimant {
            journal: &self.owner.journal,
            exclusive,
        };
        store.claim(&self.owner.instance_id, by).await
    }

    /// The handover seq of a refused exclusive claim, if the claim passed from this journal
    /// to the one that holds it (known).
    fn passed_from_here(
        &self,
        store: &dyn Store,
        refused: StoreError,
        replay: &Replay,
    ) -> anyhow::Result<u64> {
        let StoreError::ClaimedElsewhere {
            claimant, handover, ..
        } = &refused
        else {
            return Err(self.cannot_claim(store, refused));
        };
        if claimant.is_some() && handover.from.as_deref() == Some(self.owner.journal.as_str()) {
            return Ok(handover.seq);
        }
        let why = if self.written.is_none() {
            "this journal was written by a tally that did not record its owner, and another journal has claimed the id since"
        } else if claimant.is_some() {
            "the claim passed through more than one other journal since"
        } else {
            "the claim that took it did not record which journal made it"
        };
        let message = format!(
            "{refused}. The journal in {} holds {}, and {why}, so which of them the store \
             already has can no longer be told: replaying could count some twice or drop some, \
             so tally does not start (nothing was claimed). To start anyway, move that journal \
             directory aside: what it holds that the store lacks is then not counted \
             (docs/operations.md, \"The journal's owner\")",
            self.path.parent().unwrap_or(Path::new(".")).display(),
            describe(replay),
        );
        Err(anyhow!(message))
    }

    /// Writes `owner.json`, durably, before any record is appended or rebased under the
    /// claim; nothing when it already says so.
    fn record(&mut self) -> anyhow::Result<()> {
        if self.written.as_ref() == Some(&self.owner) {
            return Ok(());
        }
        let json = serde_json::to_vec(&self.owner).context("cannot encode owner.json")?;
        crate::startup::write_durably(&self.path, &json)?;
        self.written = Some(self.owner.clone());
        Ok(())
    }
}

/// `replay` with the records of `rebase` renumbered as its batch, and the rest (already in
/// the store) left out.
fn rebased(replay: Replay, rebase: Rebase) -> Replay {
    let Some(seq) = rebase.seq else {
        return replay;
    };
    let mut batch = ReplayedBatch::default();
    for (_, part) in replay
        .batches
        .into_iter()
        .filter(|(s, _)| *s > rebase.from && *s <= rebase.through)
    {
        batch.merge(part);
    }
    // No batch at all if none of its records is left (cut as corrupt since): `max_seq` still
    // keeps the next live batch above the rebase's number.
    let batches = if batch.records > 0 {
        BTreeMap::from([(seq, batch)])
    } else {
        BTreeMap::new()
    };
    Replay {
        batches,
        max_seq: seq,
        cut_bytes: replay.cut_bytes,
    }
}

/// The owner recorded at `path`, if there is one.
fn read_owner(path: &Path) -> anyhow::Result<Option<Owner>> {
    let mut text = String::new();
    match no_follow(File::options().read(true))
        .open(path)
        .and_then(|mut f| f.read_to_string(&mut text))
    {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    serde_json::from_str(&text)
        .map(Some)
        .with_context(|| format!("cannot parse {} (the journal's owner)", path.display()))
}

/// `sum` as 64-bit pieces that add up to it, each as large as it can be.
fn in_pieces(mut sum: i128) -> impl Iterator<Item = i64> {
    std::iter::from_fn(move || {
        (sum != 0).then(|| {
            let piece = sum.clamp(i128::from(i64::MIN), i128::from(i64::MAX));
            sum -= piece;
            // In range: clamped to it.
            i64::try_from(piece).unwrap_or_default()
        })
    })
}

/// "N acknowledged requests (batches A to B)".
fn describe(replay: &Replay) -> String {
    let low = replay.batches.keys().next().copied().unwrap_or(0);
    format!(
        "{} acknowledged requests (batches {low} to {})",
        replay.records(),
        replay.max_seq
    )
}

/// Writes the batches of `replay` with a seq above `applied` through `flusher`, then trims
/// `journal`. Returns the seq of the last batch now in the store.
///
/// # Errors
///
/// Another process claiming the instance id meanwhile, or the store losing this one's
/// claim, or a failed trim. (A generation
/// whose sum for a key does not fit in 64 bits has that key's deltas set aside as dead
/// letters, as the store's refusals are.)
pub(crate) async fn replay_journal(
    flusher: &Flusher,
    journal: &Journal,
    replay: Replay,
    applied: u64,
) -> anyhow::Result<u64> {
    let mut requests = 0usize;
    let in_store = applied;
    let mut applied = applied;
    let cut_bytes = replay.cut_bytes;
    for (seq, batch) in replay.batches.into_iter().filter(|(s, _)| *s > in_store) {
        requests += batch.records;
        let sums = batch.sums;
        let mut deltas = Vec::with_capacity(sums.len());
        let mut dead_letters = Vec::new();
        for (key, sum) in sums {
            match i64::try_from(sum) {
                Ok(delta) => deltas.push((key.into_boxed_str(), delta)),
                Err(_) => {
                    // The aggregator checked the running sum of every delta added, but the
                    // journal holds only those acknowledged: one that was added and then
                    // failed (its group's fsync, or a crash before its append) can leave the
                    // rest summing past 64 bits. Set aside like any delta the store refuses,
                    // in pieces that each fit, rather than refuse to start for good.
                    tracing::error!(seq, key, %sum, "A journal generation sums beyond 64 bits for a key; moving its deltas to tally_dead_letters.");
                    let reason = format!(
                        "journal replay: batch {seq} sums to {sum} for this key, beyond 64 bits"
                    );
                    dead_letters.extend(in_pieces(sum).map(|delta| DeadLetter {
                        key: key.clone(),
                        delta,
                        reason: reason.clone(),
                    }));
                }
            }
        }
        let set_aside = dead_letters.len() as u64;
        flusher
            .commit(&Sealed::from_deltas(seq, deltas, dead_letters))
            .await
            .context("cannot replay the journal")?;
        crate::metrics::Metrics::global()
            .dead_letters
            .increment(set_aside);
        applied = seq;
    }
    if requests > 0 || cut_bytes > 0 {
        tracing::info!(requests, cut_bytes, "Replayed the journal.");
    }
    // A segment that cannot be deleted is logged, counted and kept on the journal's list,
    // to be tried again after the next batch or flush tick: no reason not to start.
    let _ = journal.trim(applied);
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::in_pieces;

    #[test]
    fn pieces_fit_in_64_bits_and_add_up_to_the_sum() {
        let max = i128::from(i64::MAX);
        let min = i128::from(i64::MIN);
        for sum in [0, 5, max + 1, 2 * max + 7, min - 1, 3 * min - 2] {
            let pieces: Vec<i64> = in_pieces(sum).collect();
            assert_eq!(pieces.iter().map(|&p| i128::from(p)).sum::<i128>(), sum);
            assert!(pieces.iter().all(|&p| p != 0), "{sum}: {pieces:?}");
            assert!(pieces.len() <= 4, "as few as can be: {pieces:?}");
        }
        assert_eq!(in_pieces(max + 1).collect::<Vec<_>>(), [i64::MAX, 1]);
        assert_eq!(in_pieces(min - 1).collect::<Vec<_>>(), [i64::MIN, -1]);
    }
}
