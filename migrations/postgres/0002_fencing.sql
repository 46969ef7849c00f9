-- Fencing: every start of an instance claims its id by bumping `epoch`, and a batch is
-- written only if the epoch it carries is still the current one. A process that lost its
-- claim (a duplicate id, or a commit still running after kill -9) can no longer write.
ALTER TABLE tally_instances ADD COLUMN epoch bigint NOT NULL DEFAULT 0;
