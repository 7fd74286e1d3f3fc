"""`python -m noetl_render`: the context-render service on Postgres, until SIGTERM/SIGINT.

Settings from NOETL_* (noetl_runtime.settings): NOETL_DATABASE_URL (required), NOETL_DATABASE_SCHEMA,
NOETL_HTTP_HOST/PORT, NOETL_LOG_LEVEL.

POST /api/context/render rebuilds the execution's context from its events. The events are read from the
query service's projection (the `event` table, `noetl_runtime.postgres_store.read_events`), not from
noetl.events: the projected log is the same log (every event, by seq, duplicates dropped) already indexed
by execution, so a render is one indexed read instead of a scan of a topic. The price: a render sees what the query service
has projected, which trails the broker by the projection's lag (milliseconds when it keeps up). Consume no
Kafka here; scale it like the read API.
"""
from __future__ import annotations

import logging
import sys
from typing import Any

from noetl_runtime.http_ops import http_server, run_service
from noetl_runtime.settings import Settings

log = logging.getLogger("noetl.render")


def create_service_app(pool: Any, schema: str) -> Any:
    """The render app over the projected event log in `schema`."""
    from noetl_render.app import create_app
    from noetl_render.handlers import RenderPorts
    from noetl_runtime.auth import Authenticator
    from noetl_runtime.postgres_store import read_events
    from noetl_runtime.tokens import PostgresTokens

    async def events(execution_id: str) -> Any:
        return await read_events(pool, schema, execution_id)

    return create_app(RenderPorts(events=events), auth=Authenticator(PostgresTokens(pool, schema)))


async def serve(settings: Settings) -> int:
    from noetl_runtime.postgres_store import open_pool

    pool = await open_pool(settings, max_size=5)
    try:
        server = http_server(create_service_app(pool, settings.database_schema), settings)
        log.info("render on http://%s:%d (schema %s)", settings.http_host, settings.http_port,
                 settings.database_schema)
        await server.serve()
        return 0 if server.started else 1
    finally:
        await pool.close()
        log.info("render stopped")


def main() -> int:
    return run_service("render", serve)


if __name__ == "__main__":
    sys.exit(main())
