"""The worker: runs commands (one attempt of one step) and reports facts back to the fold.

Public API (import from the modules; the package imports nothing, so `import noetl_worker` stays cheap):
- `noetl_worker.execute.execute(cmd, ports)` and `child_execution_id(command_id)`
- `noetl_worker.ports.WorkerPorts`
- `noetl_worker.python_pool.PythonPool` / `PythonOutcome`
"""
