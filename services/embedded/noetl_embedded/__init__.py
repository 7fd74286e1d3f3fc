"""The embedded runtime (`noetl_embedded.runtime.EmbeddedRuntime`): the fold, the worker, the timers and the
SQLite store in one process, for `noetl run` and `noetl server` (docs/embedded.md).

It sits above the services (it runs the worker's `execute`) and beside `noetl_frontend`, below the CLI. The
generic parts it is built from stay in noetl_runtime: the in-memory bus, the timer loop, the SQLite store.
"""
