"""`python -m noetl_frontend`: the HTTP API of a cluster on Kafka + Postgres, until SIGTERM/SIGINT (the
chart's, compose's and cluster-start.sh's `ingest` role).

Settings from NOETL_* (noetl_runtime.settings): NOETL_KAFKA_BOOTSTRAP, NOETL_TOPIC_PREFIX,
NOETL_TOPIC_PARTITIONS, NOETL_DATABASE_URL (required), NOETL_DATABASE_SCHEMA, NOETL_SECRET_KEY (the Fernet
key credentials are encrypted with: the workers need the same one), NOETL_LEASE_SECONDS,
NOETL_HTTP_HOST/PORT, NOETL_LOG_LEVEL.

At start: a Postgres pool, the migrations (idempotent), the missing topics, a producer. Then one HTTP app,
`noetl_frontend.app.cluster_api`:

    the write API       (noetl_ingest.app.router)  submit -> noetl.requests / noetl.results (kafka_ports)
    the read API        (noetl_query.app.router)   over PostgresReadModel: the query service's projection
    context-render      (noetl_render.app.router)  over the projected event log
    /health /ready /metrics
"""
from __future__ import annotations

import logging
import sys
from typing import Any

from fastapi import FastAPI

from noetl_frontend.app import cluster_api
from noetl_runtime.http_ops import http_server, run_service
from noetl_runtime.settings import Settings

log = logging.getLogger("noetl.frontend")


class FrontendCluster:
    """The started resources of one API process: pool, producer, app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool: Any = None
        self.producer: Any = None
        self.app: FastAPI | None = None
        self.stopping = False

    async def start(self) -> FastAPI:
        from noetl_runtime import kafka_io
        from noetl_runtime.postgres_store import open_pool
        from noetl_runtime.settings import load_step_settings

        s = self.settings
        # NOETL_STEP_MAX_*: what a python step's `limits:` may ask for, judged at registration (set them as the
        # workers have them). Read first, so a bad value stops the start before anything is opened.
        step_settings = load_step_settings()
        if s.secret_key is None:
            log.warning("NOETL_SECRET_KEY is not set: storing a credential will fail (set the same key on "
                        "the API and the workers)")
        self.pool = await open_pool(s)
        try:
            await kafka_io.ensure_topics_best_effort(s)
            self.producer = kafka_io.make_producer(s)
            await self.producer.start()
        except BaseException:
            await self.stop()
            raise
        self.app = cluster_api(s, self.pool, self.producer, ready=self.not_ready, step_settings=step_settings)
        return self.app

    def not_ready(self) -> str | None:
        if self.stopping:
            return "stopping"
        if self.pool is None or self.producer is None:
            return "starting"
        return None

    async def stop(self) -> None:
        self.stopping = True
        if self.producer is not None:
            await self.producer.stop()
        if self.pool is not None:
            await self.pool.close()


async def serve(settings: Settings) -> int:
    cluster = FrontendCluster(settings)
    app = await cluster.start()
    server = http_server(app, settings)
    try:
        log.info("API on http://%s:%d (topics prefix %r, schema %s)", settings.http_host, settings.http_port,
                 settings.topic_prefix, settings.database_schema)
        await server.serve()
    finally:
        await cluster.stop()
        log.info("API stopped")
    return 0 if server.started else 1


def main() -> int:
    return run_service("frontend", serve)


if __name__ == "__main__":
    sys.exit(main())
