"""The query service: the read API over the projected event log (executions, their events and steps,
summaries, the catalog). `handlers.ReadModel` is the port; `sqlite_reads` implements it for embedded mode."""
