"""`python -m noetl_query`: the query service on Kafka + Postgres, until SIGTERM/SIGINT.

Settings from NOETL_* (noetl_runtime.settings): NOETL_KAFKA_BOOTSTRAP, NOETL_TOPIC_PREFIX,
NOETL_TOPIC_PARTITIONS, NOETL_DATABASE_URL (required), NOETL_DATABASE_SCHEMA, NOETL_QUERY_GROUP (optional:
replaces the name `noetl-query` of Topics.query_group, the topic prefix still in front), NOETL_HTTP_HOST/PORT,
NOETL_LOG_LEVEL, and the Kafka security variables (NOETL_KAFKA_SECURITY_PROTOCOL, ...: docs/kafka.md).

Two things in one process, on one event loop:

    the projection   QueryConsumer: noetl.events + noetl.catalog -> Projector -> Postgres (commit after apply)
    the read API     noetl_query.app over PostgresReadModel, + /health, /ready (in the group), /metrics

Replicas share the group: Kafka spreads the partitions over them, and the projector's advisory locks keep
a partition that moves mid-batch correct. If the consume loop dies, the process exits 1 (the read API
would otherwise serve an ever older projection).
"""
from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

from noetl_runtime.http_ops import http_server, run_service
from noetl_runtime.settings import Settings

log = logging.getLogger("noetl.query")


async def serve(settings: Settings) -> int:
    from noetl_query.consumer import QueryConsumer
    from noetl_query.postgres_reads import PostgresReadModel
    from noetl_query.projector import Projector
    from noetl_runtime.auth import Authenticator
    from noetl_runtime.kafka_io import ensure_topics_best_effort
    from noetl_runtime.postgres_store import open_pool
    from noetl_runtime.tokens import PostgresTokens

    pool = await open_pool(settings)
    consumer: QueryConsumer | None = None
    try:
        await ensure_topics_best_effort(settings)
        consumer = QueryConsumer(settings, Projector(pool, settings.database_schema))
        app = create_service_app(PostgresReadModel(pool, settings.database_schema), consumer,
                                 Authenticator(PostgresTokens(pool, settings.database_schema)), settings.broker_url,
                                 settings.broker_token.get_secret_value() if settings.broker_token else None)
        await consumer.start()
        server = http_server(app, settings)
        serving = asyncio.create_task(server.serve(), name="query-http")
        assert consumer.task is not None
        done, _ = await asyncio.wait([serving, consumer.task], return_when=asyncio.FIRST_COMPLETED)
        failed = consumer.task in done
        if failed:
            error = consumer.task.exception() if not consumer.task.cancelled() else None
            log.error("the projection stopped: %r", error, exc_info=error)
            server.should_exit = True
        await asyncio.gather(serving, return_exceptions=True)
        return 1 if failed or not server.started else 0
    finally:
        if consumer is not None:
            await consumer.stop()
        await pool.close()
        log.info("query stopped")


def create_service_app(read: Any, consumer: Any, auth: Any, broker_url: str | None = None,
                       broker_token: str | None = None) -> Any:
    """The read API (the query app) with the projection's readiness and counters on /ready and /metrics."""
    from noetl_query.app import create_app

    stats = consumer.stats
    gauges = {f"noetl_query_{name}": (doc, (lambda n=name: float(stats[n]))) for name, doc in (
        ("records", "records consumed from noetl.events and noetl.catalog and applied"),
        ("events", "events projected (new ones; duplicates are not counted)"),
        ("dead_letters", "records sent to noetl.dlq"),
        ("batches", "batches applied and committed"),
        ("retries", "batch attempts retried after a Postgres error"))}
    from noetl_query.broker_explain import BrokerExplainer
    return create_app(read, auth=auth, ready=consumer.not_ready, gauges=gauges,
                      explainer=BrokerExplainer(broker_url, token=broker_token) if broker_url else None)


def main() -> int:
    return run_service("query", serve)


if __name__ == "__main__":
    sys.exit(main())
