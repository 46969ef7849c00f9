-- The pgbench set-up of store-pg-full-diagnostics.txt, section 4 (database tally_pgb).
CREATE TABLE counters (key text PRIMARY KEY, value bigint NOT NULL, updated_at timestamptz NOT NULL DEFAULT now()) WITH (fillfactor=50);
CREATE TABLE tally_instances (instance_id text PRIMARY KEY, last_seq bigint NOT NULL, epoch bigint NOT NULL DEFAULT 0, updated_at timestamptz NOT NULL DEFAULT now());
INSERT INTO counters SELECT 'k' || i, 1, now() FROM generate_series(0, 99999) i;
INSERT INTO tally_instances VALUES ('a', 0, 0, now());
CREATE TABLE pool (id int PRIMARY KEY, keys text[], deltas int8[]);
INSERT INTO pool SELECT b, array_agg(k ORDER BY k), array_agg(1::int8) FROM (SELECT DISTINCT b, 'k' || (random()*99999)::int AS k FROM generate_series(0,63) b, generate_series(1,240)) s GROUP BY b;
VACUUM ANALYZE;
-- a.sql (pgbench -n -M prepared -f a.sql -T 8 tally_pgb):
--   \set b random(0, 63)
--   BEGIN;
--   SELECT last_seq, epoch FROM tally_instances WHERE instance_id = 'a' FOR UPDATE;
--   INSERT INTO counters (key, value, updated_at) SELECT k, v, now() FROM unnest((SELECT keys FROM pool WHERE id = :b), (SELECT deltas FROM pool WHERE id = :b)) AS u(k, v) ON CONFLICT (key) DO UPDATE SET value = counters.value + EXCLUDED.value, updated_at = EXCLUDED.updated_at;
--   UPDATE tally_instances SET last_seq = last_seq + 1 WHERE instance_id = 'a';
--   COMMIT;
-- b.sql: the upsert replaced by
--   WITH u AS (SELECT * FROM unnest(...) AS u(k, v)),
--        upd AS (UPDATE counters c SET value = c.value + u.v, updated_at = now() FROM u WHERE c.key = u.k RETURNING c.key)
--   INSERT INTO counters (key, value, updated_at) SELECT k, v, now() FROM u WHERE k NOT IN (SELECT key FROM upd)
--   ON CONFLICT (key) DO UPDATE SET value = counters.value + EXCLUDED.value, updated_at = EXCLUDED.updated_at;
-- n.sql: the upsert replaced by SELECT count(*) FROM unnest(...) AS u(k, v);
