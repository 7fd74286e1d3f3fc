"""The context-render service: POST /api/context/render renders a template against an execution's context
(workload, step results, vars, execution_id), rebuilt from its events by `projection.render_context`."""
