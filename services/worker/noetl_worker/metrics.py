"""The worker's Prometheus counters (its gauges are read live by `http_server.ops_app`)."""
from __future__ import annotations

from typing import Any

from prometheus_client import Counter


class WorkerMetrics:
    def __init__(self, registry: Any) -> None:
        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, registry=registry)
        self.started = counter("noetl_worker_commands_started", "commands taken and started")
        self.completed = counter("noetl_worker_commands_completed", "ActionCompleted facts sent")
        self.failed = counter("noetl_worker_commands_failed", "ActionFailed facts sent")
        self.children = counter("noetl_worker_children_started", "child executions started (type: playbook)")
        self.dead_letters = counter("noetl_worker_dead_letters", "records that were not commands, sent to the DLQ")
        self.duplicates = counter("noetl_worker_duplicates", "redelivered commands not run again")
