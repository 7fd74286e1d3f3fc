-- 0003: a quarantined execution says so (issue 8). An execution whose state the fold could not use, nor fail
-- normally, ends FAILED with an `execution_failed` event whose meta.quarantined is true
-- (noetl_common.engine.quarantine); projection.summary carries it as `quarantined`, and so does the row.
ALTER TABLE execution ADD COLUMN quarantined boolean NOT NULL DEFAULT false;
