-- Counters keyed by the key itself (WITHOUT ROWID): a rowid table with a TEXT primary key is
-- two B-trees, the rows by rowid and an index from key to rowid, so adding to a counter
-- dirtied a page in each (and wrote both to the WAL at every commit). Keyed by the key, the
-- row lives in the key's B-tree leaf: one lookup and one page per key.
CREATE TABLE counters_by_key (
    key        TEXT PRIMARY KEY NOT NULL,
    value      INTEGER NOT NULL,
    updated_at TEXT NOT NULL
) WITHOUT ROWID;
INSERT INTO counters_by_key (key, value, updated_at) SELECT key, value, updated_at FROM counters;
DROP TABLE counters;
ALTER TABLE counters_by_key RENAME TO counters;
