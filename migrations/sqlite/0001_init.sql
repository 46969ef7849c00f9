-- Counter values: the sum of every delta ever applied to the key.
CREATE TABLE counters (
    key        TEXT PRIMARY KEY NOT NULL,
    value      INTEGER NOT NULL,
    updated_at TEXT NOT NULL
);

-- Exactly-once bookkeeping: the last batch seq applied for each instance, written in the
-- same transaction as the batch's upserts.
CREATE TABLE tally_instances (
    instance_id TEXT PRIMARY KEY NOT NULL,
    last_seq    INTEGER NOT NULL,
    updated_at  TEXT NOT NULL
);

-- Deltas the store refused for a data reason (e.g. a sum beyond the 64-bit range), kept
-- aside so that the rest of their batch could be applied.
CREATE TABLE tally_dead_letters (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    key         TEXT NOT NULL,
    delta       INTEGER NOT NULL,
    reason      TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
