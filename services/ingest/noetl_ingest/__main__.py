"""`python -m noetl_ingest`: the ingest service on Kafka + Postgres, until SIGTERM/SIGINT.

Settings from NOETL_* (noetl_runtime.settings): NOETL_KAFKA_BOOTSTRAP, NOETL_TOPIC_PREFIX,
NOETL_TOPIC_PARTITIONS, NOETL_DATABASE_URL (required), NOETL_DATABASE_SCHEMA, NOETL_SECRET_KEY (the Fernet
key credentials are encrypted with: the workers need the same one), NOETL_LEASE_SECONDS,
NOETL_HTTP_HOST/PORT, NOETL_LOG_LEVEL.

At start: a Postgres pool, the migrations (idempotent), the missing topics, a producer. Then one HTTP app:

    the write API       (noetl_ingest.app.router)  submit -> noetl.requests / noetl.results (kafka_ports)
    the read API        (noetl_query.app.router)   over PostgresReadModel: the query service's projection
    context-render      (noetl_render.app.router)  over the projected event log
    /health /ready /metrics

Why the read routes too: the command contract (`noetl run --server URL`) and NoETL's clients talk to ONE
base URL for writes and reads. Ingest has the database anyway, so it serves the read model the query
service projects (it never writes it); the standalone query and render services exist to scale reads
and to own the projection. See docs/cluster.md.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any

from fastapi import FastAPI

from noetl_ingest.app import create_cluster_app
from noetl_ingest.handlers import IngestPorts
from noetl_runtime.http_ops import run_service
from noetl_runtime.settings import Settings

log = logging.getLogger("noetl.ingest")


class IngestCluster:
    """The started resources of one ingest process: pool, producer, ports, read model, app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pool: Any = None
        self.producer: Any = None
        self.app: FastAPI | None = None
        self.stopping = False

    async def start(self) -> FastAPI:
        from noetl_ingest.kafka_ports import KafkaSubmit, PublishingCatalog, ensure_topics, open_pool
        from noetl_query.postgres_reads import PostgresReadModel
        from noetl_runtime import kafka_io
        from noetl_runtime.auth import Authenticator
        from noetl_runtime.postgres_store import PostgresCatalog, PostgresCredentials
        from noetl_runtime.tokens import PostgresTokens

        s = self.settings
        if s.secret_key is None:
            log.warning("NOETL_SECRET_KEY is not set: storing a credential will fail (set the same key on "
                        "ingest and the workers)")
        self.pool = await open_pool(s)
        try:
            await ensure_topics(s)
            self.producer = kafka_io.make_producer(s)
            await self.producer.start()
        except BaseException:
            await self.stop()
            raise
        key = s.secret_key.get_secret_value() if s.secret_key is not None else None
        submit = KafkaSubmit(self.producer, s.topics)
        ports = IngestPorts(
            catalog=PublishingCatalog(PostgresCatalog(self.pool, s.database_schema), self.producer, s.topics),
            credentials=PostgresCredentials(self.pool, s.database_schema, key=key),
            submit=submit, clock=time.time, lease_seconds=s.lease_seconds)
        self.app = create_cluster_app(
            ports, PostgresReadModel(self.pool, s.database_schema), ready=self.not_ready,
            auth=Authenticator(PostgresTokens(self.pool, s.database_schema)),
            gauges={"noetl_ingest_messages_produced": ("inbound messages produced to Kafka",
                                                       lambda: float(submit.sent))})
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
    from noetl_ingest.kafka_ports import http_server

    cluster = IngestCluster(settings)
    app = await cluster.start()
    server = http_server(app, settings)
    try:
        log.info("ingest on http://%s:%d (topics prefix %r, schema %s)", settings.http_host, settings.http_port,
                 settings.topic_prefix, settings.database_schema)
        await server.serve()
    finally:
        await cluster.stop()
        log.info("ingest stopped")
    return 0 if server.started else 1


def main() -> int:
    return run_service("ingest", serve)


if __name__ == "__main__":
    sys.exit(main())
