"""The broker's settings: the shared NOETL_* Settings plus the few knobs only the broker has."""
from __future__ import annotations

from typing import Any

from pydantic import Field

from noetl_runtime.settings import Settings


class BrokerSettings(Settings):
    # Every execution-keyed topic (requests, results, commands) and the table's changelog have this many
    # partitions: faust co-partitions the agent's topics with the table, and refuses a mismatch.
    topic_partitions: int = Field(6, ge=1)
    broker_batch_size: int = Field(2000, ge=1)         # NOETL_BROKER_BATCH_SIZE: the most records a batch takes
    # NOETL_BROKER_STORE: memory:// only. The changelog topic is the durable copy; the broker writes the store
    # itself per batch (app.py), and faust's rocksdb store files a write under the partition of the event
    # being processed, which is wrong for a batch that spans partitions.
    broker_store: str = Field("memory://", pattern=r"^memory://")
    broker_pools: str = "default"                      # NOETL_BROKER_POOLS: command topics created at start
    broker_commit_interval: float = Field(1.0, gt=0)   # NOETL_BROKER_COMMIT_INTERVAL: faust's commit loop (s)
    # None: derived from NOETL_KAFKA_SESSION_TIMEOUT_MS, but never below 6 s (faust's heartbeats need the room).
    broker_session_timeout: float | None = Field(None, gt=0)
    # NOETL_BROKER_PIPELINE: folded batches that may wait for their acks while the folder folds the next ones
    broker_pipeline: int = Field(4, ge=1)
    # NOETL_BROKER_CHANGELOG_LAST_ALONE: write the last snapshot of each changelog partition per batch in a
    # record batch of its own (output.py: Tansu's ListOffsets "latest" would cut faust's recovery short).
    # Harmless on Kafka (one more small batch per partition); turn it off there if you like.
    broker_changelog_last_alone: bool = True
    broker_state_cache: int = Field(20_000, ge=0)      # parsed states kept between batches
    # NOETL_BROKER_EVICT_AFTER: seconds after an execution finished (its `finished` time) that its state leaves
    # the table (and a tombstone goes to the changelog); 0 keeps every state forever. A `start` re-sent later
    # than this after it was first made is refused (dead-lettered), so an evicted execution never restarts
    # (eviction.py).
    broker_evict_after: float = Field(3600.0, ge=0)
    broker_web: bool = True                            # serve /health, /ready, /metrics on NOETL_HTTP_PORT
    # NOETL_BROKER_CANONICAL_HOST: the host other brokers reach this one's web server at, to forward an
    # /explain request for an execution of its partitions (faust's canonical_url is http://HOST:HTTP_PORT).
    # Default: HTTP_HOST, or when that binds every interface (0.0.0.0, a pod), the address this host's name
    # resolves to (a pod's own IP, from its /etc/hosts). See faust_config.canonical_host.
    broker_canonical_host: str | None = None

    @property
    def pools(self) -> list[str]:
        return [p.strip() for p in self.broker_pools.split(",") if p.strip()] or ["default"]

    @property
    def session_timeout(self) -> float:
        if self.broker_session_timeout is not None:
            return self.broker_session_timeout
        return max(6.0, self.kafka_session_timeout_ms / 1000)


def load_broker_settings(**overrides: Any) -> BrokerSettings:
    """Settings from the environment; keyword overrides (field names) win over it."""
    return BrokerSettings(**overrides)
