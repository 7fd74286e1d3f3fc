"""`python -m noetl_worker`: one worker of the pool NOETL_WORKER_POOL, until SIGTERM/SIGINT.

Reads the Settings (NOETL_*: Kafka, pool, concurrency, HTTP port ...) plus the worker-only variables:

    NOETL_DATABASE_URL             optional. With it, credentials (`auth:`, `{{ secret.X }}` fallbacks) and
                                   the catalog (child playbooks) come from Postgres; without it, secrets
                                   come from NOETL_SECRET_<NAME> only and `type: playbook` steps fail saying why.
    NOETL_DATABASE_SCHEMA          the Postgres schema (default `noetl`); migrated at start (idempotent)
    NOETL_TOPIC_PARTITIONS         partitions of the topics it creates when missing (default 6)
    NOETL_SECRET_KEY               the Fernet key the credentials are encrypted with (same as ingest's)
    NOETL_WORKER_SHUTDOWN_GRACE    seconds in-flight commands get on SIGTERM (default 30)
    NOETL_WORKER_PYTHON_PROCESSES  processes of the python step pool (default: the CPU count)
    NOETL_WORKER_CREATE_TOPICS     create missing topics at start (default true)
    NOETL_STEP_*                   how step code is confined: step user, limits, log bound, DuckDB folders
                                   (docs/security.md)
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any

from noetl_common.ports import CatalogEntry, Emit
from noetl_runtime.settings import Settings

from noetl_worker.actions.base import ActionError
from noetl_worker.options import WorkerOptions
from noetl_worker.ports import WorkerPorts
from noetl_worker.python_pool import PythonPool
from noetl_worker.service import WorkerService

log = logging.getLogger("noetl.worker")


class NoCatalog:
    """The catalog of a worker without a database: every child playbook fails with the reason."""

    REASON = ("this worker has no catalog (NOETL_DATABASE_URL is not set), so it cannot start child "
              "playbooks; give the worker pool the database URL")

    async def register(self, content: str, document: dict[str, Any], path: str) -> CatalogEntry:
        raise ActionError(self.REASON)

    async def get(self, path: str, version: int | None = None) -> CatalogEntry | None:
        raise ActionError(self.REASON)

    async def list(self) -> list[CatalogEntry]:
        raise ActionError(self.REASON)


def _python_processes(env: Any) -> int:
    raw = env.get("NOETL_WORKER_PYTHON_PROCESSES")
    return max(1, int(raw)) if raw else max(1, os.cpu_count() or 1)


async def serve(settings: Settings, options: WorkerOptions) -> None:
    credentials: Any = None
    catalog: Any = NoCatalog()
    db = None
    if settings.database_url:
        import asyncpg

        from noetl_runtime.postgres_store import PostgresCatalog, PostgresCredentials, ensure_schema

        schema = settings.database_schema
        db = await asyncpg.create_pool(settings.database_url, min_size=1,
                                       max_size=max(2, min(10, settings.worker_concurrency)))
        await ensure_schema(db, schema)
        key = settings.secret_key.get_secret_value() if settings.secret_key is not None else None
        credentials = PostgresCredentials(db, schema, key=key)
        catalog = PostgresCatalog(db, schema)
    else:
        log.info("NOETL_DATABASE_URL is not set: secrets from NOETL_SECRET_* only, no child playbooks")
    pool = PythonPool(_python_processes(os.environ))
    worker_id = f"{socket.gethostname()}-{os.getpid()}"

    def ports(emit: Emit) -> WorkerPorts:
        return WorkerPorts(emit=emit, credentials=credentials, catalog=catalog, python_pool=pool,
                           worker_id=worker_id)

    try:
        await WorkerService(settings, ports, options=options).run()
    finally:
        pool.close()
        if db is not None:
            await db.close()


def main() -> int:
    from noetl_runtime.http_ops import run_service

    return run_service("worker", lambda settings: serve(settings, WorkerOptions.from_env()))


if __name__ == "__main__":
    sys.exit(main())
