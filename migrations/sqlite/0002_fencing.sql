-- Fencing: every start of an instance claims its id by bumping `epoch`, and a batch is
-- written only if the epoch it carries is still the current one.
ALTER TABLE tally_instances ADD COLUMN epoch INTEGER NOT NULL DEFAULT 0;
