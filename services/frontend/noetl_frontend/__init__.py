"""The HTTP surface: the one place the API is composed from the services' routers (ingest's writes, query's
reads, render's context-render), + /health, /ready, /metrics.

    build_api(ingest, read, render, ...)      the composition every mode calls (noetl_frontend.app)
    cluster_api(settings, pool, producer)      its ports on Kafka + Postgres (`python -m noetl_frontend`,
                                               `noetl server --kafka`)
    noetl_cli.server.build_app(store, rt)      its ports on SQLite + the embedded runtime (`noetl server`)

Layers (pyproject's import-linter contract): cli -> frontend | embedded -> services -> runtime -> core. The
frontend imports the services' routers and ports; no service imports it or another service.
"""
