"""One module per action kind (python, http, postgres, duckdb, playbook, save, secrets); each exposes
`async def run(inv: Invocation) -> ActionOutput` (playbook: `start_child`), and `base` holds what they share."""
