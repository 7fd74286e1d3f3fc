"""The worker's own knobs (those not in `Settings`), read from NOETL_WORKER_* by `WorkerOptions.from_env`."""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerOptions:
    """Worker knobs that are not (yet) in `Settings`; `from_env` reads them from NOETL_WORKER_*."""
    shutdown_grace: float = 30.0       # NOETL_WORKER_SHUTDOWN_GRACE: in-flight commands may finish within it
    commit_interval: float = 0.2       # at most one offset commit per this many seconds
    poll_timeout_ms: int = 100         # one fetch waits at most this long (bounds how fast stop() is noticed)
    revoke_wait: float | None = None   # a rebalance waits this long for revoked in-flight commands
                                       # (None: a third of the session timeout)
    serve_http: bool = True
    http_port: int | None = None       # None: settings.http_port; 0: any free port (tests)
    create_topics: bool = True         # create missing topics at start (kafka_io.ensure_topics)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerOptions:
        env = os.environ if env is None else env
        grace = float(env.get("NOETL_WORKER_SHUTDOWN_GRACE", cls.shutdown_grace))
        if grace < 0:
            raise ValueError("NOETL_WORKER_SHUTDOWN_GRACE must be >= 0")
        create = env.get("NOETL_WORKER_CREATE_TOPICS", "true").strip().lower() not in ("0", "false", "no")
        return cls(shutdown_grace=grace, create_topics=create)
