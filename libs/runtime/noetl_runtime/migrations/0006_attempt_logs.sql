-- 0006: step output (GET /api/executions/{id}/logs; docs/query.md "Step output").
--
-- Runs with search_path set to the target schema (postgres_schema.migrate). An attempt's captured output
-- lives in the event that ends it (meta.log), which `event.body` already holds; it is not copied into a
-- table of its own (that would store the largest values twice). This partial index is the logs' read
-- model: the events noetl_common.attempt_logs.is_attempt_log selects (every failed attempt, and completed
-- attempts that printed something), per execution in the order the API serves them. Its predicate is
-- repeated word for word by noetl_query.postgres_reads (LOG_EVENTS_SQL), so the planner uses it and
-- counting a page never reads a body.
-- The filters' columns are included, so an index-only scan can count and filter without the heap.
CREATE INDEX event_attempt_log ON event (execution_id, "timestamp", seq) INCLUDE (node_name, attempt, current_index)
    WHERE event_type = 'action_error'
       OR (event_type IN ('action_completed', 'iteration_completed') AND COALESCE(body #>> '{meta,log}', '') <> '');
