"""The ingest service's ports in Kafka mode: `submit` produces to Kafka, the catalog and the credentials live
in Postgres (`noetl_runtime.postgres_store`).

    submit = KafkaSubmit(producer, topics)              # StartExecution, cancel ... -> noetl.requests / results
    catalog = PublishingCatalog(PostgresCatalog(...), producer, topics)

Routing (architecture §1): requests of the fold (`start`, `cancel`, and the `child_finished` /
`timer_fired` kinds other systems may send) go to `noetl.requests`; facts about an action (`action_started`,
`heartbeat`, `action_completed`, `action_failed`, `child_started`), as an outside worker or callback posts
them to POST /api/events, go to `noetl.results`. Both are keyed by execution_id, so the broker folds them on
the execution's partition. Values are `noetl_common.codec.encode(message)`: the JSON of the models in
`noetl_common.messages`, which is also the format for systems that produce to `noetl.requests` directly.

Every send waits for the broker's ack (acks=all) before the HTTP answer: a 200 means the request is durable.

The catalog is written to Postgres first (it numbers versions: max + 1 under a lock), then the registration
is produced to `noetl.catalog` (key: the playbook path, value: `noetl_common.ports.CatalogEntry` as JSON),
so consumers other than this installation's query service see every registration. The query service of
the installation reads the catalog table itself (the same database) and also projects the topic
(`apply_catalog` is an idempotent upsert: a no-op for rows already there).

The last section is the cluster-mode plumbing the three HTTP services (ingest, query, render) share: the
Postgres pool (migrated at start) and a uvicorn server that leaves SIGTERM to the caller's cleanup. It lives
here because the services share no edge package for it yet; it belongs in
`noetl_runtime` next to the settings.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from noetl_common.codec import encode
from noetl_common.ports import CatalogEntry, CatalogPort
from noetl_common.topics import Topics

if TYPE_CHECKING:
    import uvicorn

    from noetl_runtime.settings import Settings

log = logging.getLogger("noetl.cluster")

REQUEST_KINDS = frozenset({"start", "cancel", "timer_fired", "child_finished"})


def topic_for(message: BaseModel, topics: Topics) -> str:
    """noetl.requests for the fold's requests, noetl.results for action facts."""
    kind = getattr(message, "kind", None)
    if kind is None:
        raise TypeError(f"{type(message).__name__} is not an inbound message (no `kind`)")
    return topics.requests if kind in REQUEST_KINDS else topics.results


class KafkaSubmit:
    """IngestPorts.submit: produce the encoded inbound message keyed by its execution_id; wait for the ack."""

    def __init__(self, producer: Any, topics: Topics) -> None:
        self.producer = producer
        self.topics = topics
        self.sent = 0

    async def __call__(self, message: BaseModel) -> None:
        execution_id: str = getattr(message, "execution_id")
        await self.producer.send_and_wait(topic_for(message, self.topics), encode(message),
                                          key=execution_id.encode())
        self.sent += 1


class PublishingCatalog:
    """A CatalogPort that stores in `inner` (Postgres) and then publishes each registration to noetl.catalog."""

    def __init__(self, inner: CatalogPort, producer: Any, topics: Topics) -> None:
        self.inner = inner
        self.producer = producer
        self.topics = topics

    async def register(self, content: str, document: dict[str, Any], path: str,
                       registered_by: str | None = None) -> CatalogEntry:
        entry = await self.inner.register(content, document, path, registered_by=registered_by)
        await self.producer.send_and_wait(self.topics.catalog, entry.model_dump_json().encode(),
                                          key=entry.path.encode())
        return entry

    async def get(self, path: str, version: int | None = None) -> CatalogEntry | None:
        return await self.inner.get(path, version)

    async def list(self) -> list[CatalogEntry]:
        return await self.inner.list()


# ---------------------------------------------------------------------------------------------------------
# Cluster-mode plumbing shared by the HTTP services
# ---------------------------------------------------------------------------------------------------------
async def open_pool(settings: Settings, *, max_size: int = 10) -> Any:
    """An asyncpg pool on NOETL_DATABASE_URL, with the schema migrated (idempotent, concurrency-safe: every
    service may run it at start, whichever comes first creates the tables)."""
    import asyncpg

    from noetl_query.postgres_schema import migrate

    if not settings.database_url:
        raise SystemExit("NOETL_DATABASE_URL is not set: this service keeps its data in Postgres")
    pool = await asyncpg.create_pool(settings.database_url, min_size=1, max_size=max_size)
    try:
        applied = await migrate(pool, settings.database_schema)
    except BaseException:
        await pool.close()
        raise
    if applied:
        log.info("migrated schema %s: %s", settings.database_schema, applied)
    return pool


async def ensure_topics(settings: Settings) -> None:
    """Create the missing topics (the partition count of NOETL_TOPIC_PARTITIONS). Without the rights to
    create topics they must exist already: a warning, not a failure."""
    from aiokafka.errors import KafkaError

    from noetl_runtime import kafka_io

    try:
        created = await kafka_io.ensure_topics(settings, settings.topics, [settings.worker_pool],
                                               partitions=settings.topic_partitions)
    except KafkaError as exc:
        log.warning("could not ensure topics: %r", exc)
        return
    if created:
        log.info("created topics %s", created)


def http_server(app: Any, settings: Settings) -> uvicorn.Server:
    """A uvicorn server for `app` on NOETL_HTTP_HOST/PORT. SIGTERM/SIGINT make `serve()` return (once the
    open requests are answered), so the caller's cleanup runs: stock uvicorn re-raises the signal after
    `serve()`, which would end the process before the consumer commits and the producer flushes.
    Refuses (ValueError) to serve with NOETL_AUTH=off on anything but a loopback address."""
    import uvicorn

    from noetl_runtime.auth import AuthSettings, check_bind

    check_bind(settings.http_host, AuthSettings())

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            loop = asyncio.get_running_loop()
            installed = []
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, self.handle_exit, sig, None)
                    installed.append(sig)
            try:
                yield
            finally:
                for sig in installed:
                    loop.remove_signal_handler(sig)

    config = uvicorn.Config(app, host=settings.http_host, port=settings.http_port, log_config=None,
                            lifespan="off", access_log=False, timeout_graceful_shutdown=5,
                            log_level=settings.log_level.lower())
    return _Server(config)
