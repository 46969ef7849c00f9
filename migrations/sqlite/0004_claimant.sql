-- Which journal claimed each instance id last (a random id each data directory's journal
-- makes once). A journal that still holds records numbered under its own claim of an id
-- may replay them only if no other journal has claimed the id since: the other one's
-- batches reuse those numbers. NULL: claimed before this column existed.
ALTER TABLE tally_instances ADD COLUMN claimed_by TEXT;
