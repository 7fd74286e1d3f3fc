-- 0003: idempotent submission (POST /api/executions/run with an Idempotency-Key or a client-chosen
-- execution_id). Written by ingest before it produces the start; read by a retry, which gets the same
-- execution (and re-sends the start, same id, if the execution never appeared).
--
-- Runs with search_path set to the target schema (postgres_schema.migrate).
CREATE TABLE idempotency (
    scope        text PRIMARY KEY,                    -- 'key:<Idempotency-Key>' or 'id:<execution_id>'
    request_hash text NOT NULL,                       -- sha256 of the canonical request: another body is a 409
    execution_id text NOT NULL UNIQUE,                -- one scope per execution: a second one is a 409
    request      jsonb NOT NULL,                      -- what a re-send of the start is rebuilt from
    answer       jsonb NOT NULL,                      -- the answer a retry gets again
    created_at   double precision NOT NULL            -- the start's `time` (epoch seconds)
);
