-- Counter values: the sum of every delta ever applied to the key.
CREATE TABLE counters (
    key        text PRIMARY KEY,
    value      bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Exactly-once bookkeeping: the last batch seq applied for each instance, written in the
-- same transaction as the batch's upserts.
CREATE TABLE tally_instances (
    instance_id text PRIMARY KEY,
    last_seq    bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Deltas the store refused for a data reason (e.g. a sum beyond the 64-bit range), kept
-- aside so that the rest of their batch could be applied.
CREATE TABLE tally_dead_letters (
    id          bigserial PRIMARY KEY,
    instance_id text NOT NULL,
    seq         bigint NOT NULL,
    key         text NOT NULL,
    delta       bigint NOT NULL,
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
