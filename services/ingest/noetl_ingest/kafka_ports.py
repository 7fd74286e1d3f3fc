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
A send over the size limit (the producer's max_request_size, 1 MB by default, or the topic's
max.message.bytes) is `TooLarge` (413); any other Kafka error is `Unavailable` (503, nothing was accepted).

A registration is numbered and inserted in a Postgres transaction (max + 1 under a lock) that commits only
once it is produced to `noetl.catalog` (key: the playbook path, value: `noetl_common.ports.CatalogEntry` as
JSON): a refused produce rolls the row back, so a 413 or 503 leaves no version behind. (A commit that fails
after the produce leaves the record on the topic; the query service's projection of it inserts the row.)
Consumers other than this installation's query service see every registration. The query service of
the installation reads the catalog table itself (the same database) and also projects the topic
(`apply_catalog` is an idempotent upsert: a no-op for rows already there).
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from noetl_common.codec import encode
from noetl_common.ports import CatalogEntry
from noetl_common.refusals import TooLarge, Unavailable
from noetl_common.topics import Topics

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
        await send(self.producer, topic_for(message, self.topics), encode(message), execution_id.encode(),
                   what=f"the {getattr(message, 'kind', 'message')} message")
        self.sent += 1


async def send(producer: Any, topic: str, value: bytes, key: bytes, *, what: str) -> None:
    """send_and_wait with Kafka's refusals as the API's: TooLarge (413) or Unavailable (503)."""
    # here: embedded `noetl server` imports this module (through noetl_frontend.app) without the Kafka extra
    from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError

    try:
        await producer.send_and_wait(topic, value, key=key)
    except (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError) as exc:
        raise TooLarge(f"{what} is {len(value)} bytes, over the size limit of topic {topic}: "
                       f"{type(exc).__name__}") from exc
    except KafkaError as exc:
        raise Unavailable(f"Kafka is unavailable, nothing was accepted: {type(exc).__name__}") from exc


class PublishingCatalog:
    """A CatalogPort that stores in `inner` (PostgresCatalog) and publishes each registration to
    noetl.catalog before the row commits: both happen, or neither."""

    def __init__(self, inner: Any, producer: Any, topics: Topics) -> None:
        self.inner = inner
        self.producer = producer
        self.topics = topics

    async def register(self, content: str, document: dict[str, Any], path: str,
                       registered_by: str | None = None) -> CatalogEntry:
        async def publish(entry: CatalogEntry) -> None:
            await send(self.producer, self.topics.catalog, entry.model_dump_json().encode(), entry.path.encode(),
                       what=f"playbook {entry.path!r}")
        return await self.inner.register(content, document, path, registered_by, before_commit=publish)

    async def get(self, path: str, version: int | None = None) -> CatalogEntry | None:
        return await self.inner.get(path, version)

    async def list(self) -> list[CatalogEntry]:
        return await self.inner.list()
