-- 0001: the query service's read model.
--
-- Runs with search_path set to the target schema (postgres_schema.migrate), so names are unqualified
-- and one file serves any schema name. Applied once, inside one transaction, under an advisory lock.

-- The event log as projected from noetl.events. Append-only: a row is inserted once (by event_id) and
-- never updated, so replaying the topic from any offset changes nothing.
CREATE TABLE event (
    event_id            text PRIMARY KEY,             -- deterministic, f"{execution_id}:{seq}"
    execution_id        text NOT NULL,
    parent_execution_id text,
    seq                 integer NOT NULL,             -- position in the execution's log (0-based)
    event_type          text NOT NULL,
    node_name           text NOT NULL,
    node_type           text NOT NULL,
    status              text NOT NULL,
    "timestamp"         timestamptz NOT NULL,
    attempt             integer,
    current_index       integer,
    duration            double precision,             -- seconds
    command_id          text,
    error               text,
    body                jsonb NOT NULL                -- the whole event (Event.model_dump_json)
);
CREATE INDEX event_by_execution ON event (execution_id, seq);
CREATE INDEX event_by_time ON event ("timestamp");

-- One row per execution: noetl_common.projection.summary over the execution's events, maintained by the
-- projector in the same transaction that inserts the events.
CREATE TABLE execution (
    execution_id        text PRIMARY KEY,
    parent_execution_id text,
    path                text,
    version             integer,
    playbook_name       text,
    status              text NOT NULL,                -- PENDING | RUNNING | COMPLETED | FAILED | CANCELLED
    start_time          timestamptz,
    end_time            timestamptz,
    duration            double precision,             -- seconds
    progress            integer NOT NULL DEFAULT 0,   -- 0..100
    result              jsonb,
    error               text,
    last_event_time     timestamptz,
    last_seq            integer NOT NULL,             -- highest seq projected
    event_count         integer NOT NULL,             -- events projected (the cache check of the projector)
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX execution_by_start ON execution (start_time DESC, execution_id DESC);
CREATE INDEX execution_by_status ON execution (status, start_time DESC, execution_id DESC);
CREATE INDEX execution_by_path ON execution (path, start_time DESC, execution_id DESC);
CREATE INDEX execution_by_parent ON execution (parent_execution_id) WHERE parent_execution_id IS NOT NULL;

-- Playbook registrations from noetl.catalog. A (path, version) is immutable once registered.
CREATE TABLE catalog (
    path        text NOT NULL,
    version     integer NOT NULL,
    content     text NOT NULL,                        -- the YAML as registered
    document    jsonb NOT NULL,                       -- parsed
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (path, version)
);
CREATE INDEX catalog_by_created ON catalog (created_at DESC);
