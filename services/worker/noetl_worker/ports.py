"""What a worker needs from the outside world, handed to `execute` in one object.

The runtime (embedded loop or Kafka consumer) builds it once per worker; tests build it from in-memory
doubles. Kept separate from `noetl_common.ports` because it bundles worker-only things (the python pool,
the environment that holds NOETL_SECRET_* values, the step isolation settings).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from noetl_common.ports import CatalogPort, CredentialPort, Emit
from noetl_runtime.settings import StepSettings, load_step_settings

if TYPE_CHECKING:
    from noetl_worker.python_pool import PythonPool


@dataclass
class WorkerPorts:
    emit: Emit                                  # async callable: routes each message to its topic
    credentials: CredentialPort | None = None   # `auth:` names and `{{ secret.X }}` fallbacks
    catalog: CatalogPort | None = None          # `type: playbook` children
    python_pool: PythonPool | None = None       # `type: python` steps and python saves
    worker_id: str = "worker"
    # An attempt still running after this many seconds announces itself (ActionStarted) so its lease
    # starts; a quicker one reports once, with `started` on its final message.
    announce_after: float = 0.05
    # Where NOETL_SECRET_<NAME> values come from; os.environ unless a test or an embedding app says so.
    env: Mapping[str, str] = field(default_factory=lambda: os.environ)
    # How step code is confined (NOETL_STEP_*): log bound, DuckDB directories and extensions. The python
    # pool reads the same settings for its limits and user.
    step_settings: StepSettings = field(default_factory=load_step_settings)
