"""faust's configuration of the broker app: its id and its settings, from BrokerSettings.

Each option says why it differs from faust's default; most are about Tansu (architecture §5) or about
the folder owning the table's writes (app.py).
"""
from __future__ import annotations

import os
import socket
import tempfile
from typing import Any

from noetl_common.topics import Topics
from noetl_runtime.settings import Settings

from noetl_broker.settings import BrokerSettings
from noetl_broker.transport import broker_credentials


def app_id(settings: Settings) -> str:
    """faust's app id: the consumer group, and the stem of faust's own topics (`<id>-executions-changelog`,
    `<id>-__assignor-__leader`). It carries the topic prefix, so installations sharing a cluster never
    share a group or a changelog."""
    return Topics(settings.topic_prefix).broker_app


def app_options(settings: BrokerSettings) -> dict[str, Any]:
    """The faust.App settings (create_app lets tests and benchmarks override any of them)."""
    session = settings.session_timeout
    options: dict[str, Any] = dict(
        broker=[f"kafka://{host.strip()}" for host in settings.kafka_bootstrap.split(",") if host.strip()],
        broker_credentials=broker_credentials(settings),
        store=settings.broker_store,
        autodiscover=False,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        # Tansu (architecture §5): joins wait half the session timeout; faust needs heartbeats well inside it.
        broker_session_timeout=session,
        broker_rebalance_timeout=session,
        broker_heartbeat_interval=max(0.5, session / 6),
        broker_commit_interval=settings.broker_commit_interval,
        consumer_auto_offset_reset="earliest",
        # at_least_once: no transactions, so no idempotent producer either (Tansu refuses InitProducerId).
        processing_guarantee="at_least_once",
        producer_acks=-1,
        producer_linger=settings.kafka_linger_ms / 1000,
        recovery_consistency_check=False,   # rocksdb:// on Tansu (its offsets are not what faust expects)
        table_standby_replicas=0,
        # faust's own wait (for every taken record to be acked) would also wait at shutdown, after the folder
        # stopped; Broker.on_revoked settles instead, and the rebalance waits for it.
        stream_wait_empty=False,
        # records queued for the agent before faust pauses fetching: room for a few batches, so the fetcher
        # refills while the agent folds instead of pausing and resuming partitions around every batch
        stream_buffer_maxsize=max(4096, 4 * settings.broker_batch_size),
        web_enabled=settings.broker_web,
        web_port=settings.http_port,
        web_bind=settings.http_host,
        web_host=settings.http_host,
        canonical_url=f"http://{canonical_host(settings)}:{settings.http_port}",
        web_stats_enabled=False, web_graph_enabled=False, web_router_enabled=False, web_tables_enabled=False,
        web_metrics_enabled=False,
        # faust makes `<datadir>/v1/tables` even for memory:// (the only store allowed); its default datadir is
        # `<app id>-data` in the working directory, which littered checkouts and containers
        datadir=os.path.join(tempfile.gettempdir(), f"noetl-broker-faust.{app_id(settings)}"),
    )
    return options


def canonical_host(settings: BrokerSettings) -> str:
    """Where the other brokers reach this one (they forward /explain requests for its partitions here)."""
    if settings.broker_canonical_host:
        return settings.broker_canonical_host
    if settings.http_host not in ("0.0.0.0", "::", ""):
        return settings.http_host
    try:   # bound to every interface: a pod's (or a container's) name resolves to its own IP in /etc/hosts
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return socket.gethostname()
