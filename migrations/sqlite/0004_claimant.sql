-- Which journal claimed each instance id last (a random id each data directory's journal
-- makes once), which one held it before, and the id's last applied seq when the claim
-- passed from that one to the current one (every batch of the previous claimant is at or
-- below it). A journal that still holds records numbered under its own claim of an id can
-- then tell which of them are in the store after another journal claimed the id: those at
-- or below the handover seq (see src/recovery.rs). NULL: claimed before these columns.
-- `claimed_epoch` is the epoch of the claim `claimed_by` made: a claim that does not record
-- its claimant (an older tally's) leaves it behind the epoch, and the claimant unknown.
ALTER TABLE tally_instances ADD COLUMN claimed_by TEXT;
ALTER TABLE tally_instances ADD COLUMN previous_claimant TEXT;
ALTER TABLE tally_instances ADD COLUMN handover_seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tally_instances ADD COLUMN claimed_epoch INTEGER;
