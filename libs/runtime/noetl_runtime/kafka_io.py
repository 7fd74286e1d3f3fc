"""Thin aiokafka helpers shared by the Kafka-mode services: clients built from `Settings`, topic
creation, and the dead-letter record.

Clients are returned unstarted: the caller owns their lifecycle (`await x.start()` / `await x.stop()`).
Values and keys stay raw bytes here; `noetl_common.codec` decodes them, and a `DecodeError` sends the
record to the DLQ with `send_dead_letter` before the consumer commits past it.
"""
from __future__ import annotations

import base64
import logging
import re
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code
from aiokafka.helpers import create_ssl_context

from noetl_common.messages import DeadLetter
from noetl_common.topics import Topics

if TYPE_CHECKING:
    from noetl_runtime.settings import Settings

# Kafka's rule for topic names. Tansu accepts anything (and 0 partitions), so check here, or a bad
# NOETL_TOPIC_PREFIX would pass every test and fail only against a real cluster.
_LEGAL_TOPIC = re.compile(r"[a-zA-Z0-9._-]{1,249}")

log = logging.getLogger("noetl.kafka")

__all__ = [
    "DeadLetter", "all_topic_names", "ensure_topics", "ensure_topics_best_effort", "make_admin", "make_consumer",
    "make_producer", "security_options", "send_dead_letter",
]


# ---------------------------------------------------------------------------------------------------------
# The dead-letter record (noetl.dlq). Key: the original record's key, so an operator can find the execution.
# ---------------------------------------------------------------------------------------------------------
def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode("ascii")


async def send_dead_letter(
    producer: AIOKafkaProducer,
    topics: Topics,
    key: bytes | None,
    raw: bytes | None,
    reason: str,
    source_topic: str,
    *,
    source_partition: int | None = None,
    source_offset: int | None = None,
    now: float | None = None,
) -> DeadLetter:
    """Write `raw` to the DLQ with why it was rejected, and wait until the broker has it.

    Waiting (not fire-and-forget) is what lets the caller commit past the bad record safely (§2.6).
    """
    at = time.time() if now is None else now
    letter = DeadLetter(
        source_topic=source_topic, source_partition=source_partition, source_offset=source_offset,
        key=_b64(key), value=base64.b64encode(raw or b"").decode("ascii"), reason=reason, time=at,
        timestamp=datetime.fromtimestamp(at, timezone.utc).isoformat(),
    )
    await producer.send_and_wait(topics.dlq, letter.model_dump_json().encode(), key=key)
    return letter


# ---------------------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------------------
def security_options(settings: Settings) -> dict[str, Any]:
    """The aiokafka client options for the security settings (NOETL_KAFKA_SECURITY_PROTOCOL, _SASL_*,
    _SSL_CAFILE). Every client built here gets them; the broker's faust app maps the same dict onto its
    `broker_credentials`, so one set of variables configures every connection of an installation.

    TLS verifies the brokers' certificates and host names against the CA file (or the system's CAs).
    """
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(cafile=settings.kafka_ssl_cafile)
    if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        password = settings.kafka_sasl_password
        # aiokafka names these "plain" for every mechanism: SCRAM takes the same two options.
        options.update(sasl_mechanism=settings.kafka_sasl_mechanism,
                       sasl_plain_username=settings.kafka_sasl_username,
                       sasl_plain_password=None if password is None else password.get_secret_value())
    return options


def make_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    """A producer of raw bytes. acks=all: a send is confirmed only once the partition has it durably."""
    options: dict[str, Any] = dict(
        security_options(settings),
        bootstrap_servers=settings.kafka_bootstrap,
        client_id=f"{settings.kafka_client_id}-producer",
        acks="all",
        enable_idempotence=settings.kafka_enable_idempotence,
        linger_ms=settings.kafka_linger_ms,
    )
    options.update(overrides)
    return AIOKafkaProducer(**options)


def make_consumer(
    settings: Settings, topics: Iterable[str], group: str | None, **overrides: Any
) -> AIOKafkaConsumer:
    """A consumer of raw bytes in `group`, committing manually (after the effect is durable, §2.6)."""
    session_ms = overrides.pop("session_timeout_ms", settings.kafka_session_timeout_ms)
    options: dict[str, Any] = dict(
        security_options(settings),
        bootstrap_servers=settings.kafka_bootstrap,
        client_id=f"{settings.kafka_client_id}-consumer",
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=session_ms,
        heartbeat_interval_ms=max(100, session_ms // 3),
        # A rebalance waits at most this long for members to rejoin; the session timeout keeps it short.
        rebalance_timeout_ms=session_ms,
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
    )
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


def make_admin(settings: Settings, **overrides: Any) -> AIOKafkaAdminClient:
    options: dict[str, Any] = dict(
        security_options(settings),
        bootstrap_servers=settings.kafka_bootstrap, client_id=f"{settings.kafka_client_id}-admin",
    )
    options.update(overrides)
    return AIOKafkaAdminClient(**options)


# ---------------------------------------------------------------------------------------------------------
# Topics
# ---------------------------------------------------------------------------------------------------------
def all_topic_names(topics: Topics, pools: Iterable[str]) -> list[str]:
    """Every topic an installation with these worker pools uses (names from `noetl_common.topics`)."""
    names = [topics.requests, topics.results, topics.events, topics.catalog, topics.dlq]
    names += [topics.commands(pool) for pool in pools]
    return list(dict.fromkeys(names))


def _configs(topics: Topics, name: str) -> dict[str, str]:
    # The catalog is the latest registration per playbook path; the event log is kept for good.
    if name == topics.catalog:
        return {"cleanup.policy": "compact"}
    if name == topics.events:
        return {"retention.ms": "-1"}
    return {}


async def ensure_topics(
    settings: Settings,
    topics: Topics,
    pools: Iterable[str],
    partitions: int | None = None,
    replication_factor: int | None = None,
) -> list[str]:
    """Create the missing topics; return the names this call created. Existing topics are left alone
    (their partition counts are not checked or changed). Partitions and replication default to the
    settings' NOETL_TOPIC_PARTITIONS and NOETL_TOPIC_REPLICATION.

    Every execution-keyed topic gets the same partition count: the broker folds requests and results of
    one execution on one partition owner, which needs them co-partitioned.
    """
    wanted = all_topic_names(topics, pools)
    illegal = [name for name in wanted if not _LEGAL_TOPIC.fullmatch(name)]
    if illegal:
        raise ValueError(f"illegal Kafka topic names {illegal}: use only [a-zA-Z0-9._-], at most 249 characters")
    partitions = settings.topic_partitions if partitions is None else partitions
    replication_factor = settings.topic_replication if replication_factor is None else replication_factor
    if partitions < 1 or replication_factor < 1:
        raise ValueError("partitions and replication_factor must be at least 1")
    admin = make_admin(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in wanted if name not in existing]
        if not missing:
            return []
        response = await admin.create_topics([
            NewTopic(name, partitions, replication_factor, topic_configs=_configs(topics, name))
            for name in missing
        ])
        created = []
        for topic_error in response.topic_errors:
            name, code = topic_error[0], topic_error[1]
            if code == 0:
                created.append(name)
            elif code != TopicAlreadyExistsError.errno:   # another process won the race: fine
                message = topic_error[2] if len(topic_error) > 2 and topic_error[2] else ""
                raise for_code(code)(f"creating topic {name!r}: {message}".rstrip(": "))
        return created
    finally:
        await admin.close()


async def ensure_topics_best_effort(settings: Settings) -> None:
    """A service's start: create the missing topics (of the settings' worker pool, NOETL_TOPIC_PARTITIONS
    partitions). Without the rights to create topics they must exist already: a warning, not a failure."""
    try:
        created = await ensure_topics(settings, settings.topics, [settings.worker_pool],
                                      partitions=settings.topic_partitions)
    except KafkaError as exc:
        log.warning("could not ensure topics: %r", exc)
        return
    if created:
        log.info("created topics %s", created)
