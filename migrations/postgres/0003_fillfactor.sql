-- Room in every page for the next version of its rows. A flush updates most pending keys
-- at once, and each update writes a new row version; with free space on the same page that
-- update is HOT (heap-only: no new index entry, and the old version is pruned in place, no
-- vacuum needed). At the default fillfactor of 100 almost none are: measured, a 100,000-key
-- flush took 1.2-1.8 s of the database's time, at 50 it took 0.5-0.8 s, 98.7 % of updates
-- HOT (docs/benchmarks.md). 50 because one flush can update every row of a page, and each
-- needs room for its new version until the flush commits. Applies to pages written from now on.
ALTER TABLE counters SET (fillfactor = 50);
