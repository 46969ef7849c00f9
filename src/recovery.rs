//! Start-up recovery: before tally listens, every delta the journal holds beyond the store's
//! last applied batch for this instance is written to the store.
//!
//! # Whose records
//!
//! A record carries the seq of its batch, and "beyond the store's last applied batch" means
//! beyond the last one of the claim that numbered it. Two things would break that, and tally
//! refuses to start on either rather than count twice or drop increments:
//!
//! - **Another instance id.** The journal directory's `owner.json` names the instance id its
//!   records were written as; with records in the journal, a start as another id stops.
//! - **Another journal claimed the id since** (two data directories run as one id, one after
//!   the other: the second one's batches reused the first one's numbers). `owner.json` also
//!   holds the journal's own random id; the store records which journal claimed each
//!   instance id last, and a journal with records asks for an exclusive claim
//!   ([`Claimant::exclusive`]), which fails, claiming nothing, in that case.
//!
//! A journal without `owner.json` (written by an older tally) is replayed as before, and
//! gets one.
//!
//! Each journal generation (the deltas acknowledged under one seq) is written as the batch it
//! would have been, under its own seq, in seq order, and the journal is trimmed only once all
//! are in. A crash part-way leaves the store's seq at the last generation written, so the next
//! start replays exactly the rest, and the store skips any it already has. (Re-adding the
//! records to the live generation would number them above every journal record: when they
//! needed several batches, the first one would mark the whole journal applied.)

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use anyhow::{Context, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::aggregate::Sealed;
use crate::flush::Flusher;
use crate::journal::{Journal, Replay, no_follow};
use crate::store::{Claimant, StoreError};

/// The file in the journal directory that says whose its records are.
const OWNER_FILE: &str = "owner.json";

/// Whose records a journal directory holds (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Owner {
    /// The journal's own id: random, made once, the claimant it records in the store.
    pub journal: String,
    /// The instance id its records were written as.
    pub instance_id: String,
}

/// The journal's part in this start's claim: who claims, and whether exclusively.
#[derive(Debug)]
pub(crate) struct Ownership {
    owner: Owner,
    exclusive: bool,
    /// Whether `owner.json` must be (re)written once the claim is made.
    changed: bool,
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
        let recorded = read_owner(&journal_dir.join(OWNER_FILE))?;
        let has_records = !replay.records.is_empty();
        if has_records && recorded.is_none() {
            tracing::warn!(journal = %journal_dir.display(), "The journal has no owner.json (an older tally wrote it): replaying it as this instance id, unchecked.");
        }
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
        let owner = Owner {
            journal: recorded
                .as_ref()
                .map_or_else(|| uuid::Uuid::new_v4().to_string(), |o| o.journal.clone()),
            instance_id: instance_id.to_owned(),
        };
        Ok(Self {
            changed: recorded.as_ref() != Some(&owner),
            exclusive: has_records && recorded.is_some(),
            owner,
        })
    }

    /// The claimant this start claims the instance id as.
    pub(crate) fn claimant(&self) -> Claimant<'_> {
        Claimant {
            journal: &self.owner.journal,
            exclusive: self.exclusive,
        }
    }

    /// Explains a refused claim: what the journal holds and what the operator can do.
    pub(crate) fn refused(
        &self,
        error: anyhow::Error,
        journal_dir: &Path,
        replay: &Replay,
    ) -> anyhow::Error {
        match error.downcast_ref::<StoreError>() {
            Some(StoreError::ClaimedElsewhere { claimant, .. }) => anyhow!(
                "instance id {:?} was claimed by another tally (journal {claimant}) since this \
                 data directory last ran as it. The journal in {} still holds {}, and that \
                 process numbered its own batches with the same numbers, so tally cannot tell \
                 which of them the store already has: replaying could count some twice or drop \
                 some, so it does not start (nothing was claimed). To start anyway, move {} \
                 aside: what it holds that the store lacks is then not counted \
                 (docs/operations.md, \"The journal's owner\")",
                self.owner.instance_id,
                journal_dir.display(),
                describe(replay),
                journal_dir.display(),
            ),
            _ => error,
        }
    }

    /// Writes `owner.json` if it changed, durably, before any record is appended under
    /// this claim.
    ///
    /// # Errors
    ///
    /// If it cannot be written.
    pub(crate) fn record(&self, journal_dir: &Path) -> anyhow::Result<()> {
        if !self.changed {
            return Ok(());
        }
        let json = serde_json::to_vec(&self.owner).context("cannot encode owner.json")?;
        crate::startup::write_durably(&journal_dir.join(OWNER_FILE), &json)
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

/// "N acknowledged requests (batches A to B)".
fn describe(replay: &Replay) -> String {
    let low = replay.records.iter().map(|r| r.seq).min().unwrap_or(0);
    format!(
        "{} acknowledged requests (batches {low} to {})",
        replay.records.len(),
        replay.max_seq
    )
}

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
