"""`noetl server`: every role in one process (architecture §3): the embedded runtime (fold, worker pool,
timers) on a SQLite store, and the API every mode serves (`noetl_frontend.app.build_api`), served by
uvicorn on the same event loop. In-flight executions resume on start (the runtime reloads their snapshots).

The app is the frontend's; only the ports differ from the cluster:
    ingest  submit = runtime.submit (the in-process bus), catalog/credentials = the SQLite store
    query   SqliteReadModel(store)
    render  events = store.events
"""
from __future__ import annotations

import asyncio
import fcntl
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from noetl_embedded.runtime import EmbeddedRuntime
from noetl_frontend.app import build_api
from noetl_ingest.handlers import IngestPorts
from noetl_query.sqlite_reads import SqliteReadModel
from noetl_render.handlers import RenderPorts
from noetl_runtime.auth import Authenticator, AuthSettings, check_bind
from noetl_runtime.http_ops import configure_json_logging
from noetl_runtime.sqlite_store import SqliteStore
from noetl_runtime.tokens import SqliteTokens, ensure_local_admin, local_token_file

log = logging.getLogger("noetl.server")


def build_app(store: SqliteStore, runtime: EmbeddedRuntime, *, auth: Authenticator) -> FastAPI:
    """The one app of embedded mode. The runtime starts and stops with the app (its lifespan)."""
    started = False

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        nonlocal started
        await runtime.start()   # resumes in-flight executions
        started = True
        log.info("runtime started", extra={"store": str(store.path), "resumed": len(runtime.states)})
        try:
            yield
        finally:
            started = False
            await runtime.stop()
            log.info("runtime stopped")

    async def submit(message: BaseModel) -> None:
        runtime.submit(message)   # type: ignore[arg-type]  # any inbound message: the bus routes by execution_id

    def ready() -> str | None:
        if runtime.crashed is not None:
            return f"the runtime died: {runtime.crashed!r}"
        return None if started else "starting"

    ingest = IngestPorts(catalog=store.catalog, credentials=store.credentials, submit=submit, clock=time.time,
                         lease_seconds=runtime.lease_seconds)
    return build_api(ingest, SqliteReadModel(store), RenderPorts(events=store.events), service="server",
                     description="NoETL-compatible HTTP API, embedded mode (SQLite, in-process workers).",
                     auth=auth, ready=ready, lifespan=lifespan, gauges={
        "noetl_executions_active": ("executions in flight in this process", lambda: float(len(runtime.states))),
        "noetl_dead_letters": ("inbound messages that could not be decoded", lambda: float(len(runtime.dead_letters))),
    })


def serve(host: str, port: int, store_path: Path | None, log_level: str = "INFO", **runtime_options: Any) -> int:
    """Run until SIGINT/SIGTERM; 0 after a clean shutdown, 1 when the server could not start.

    Two guards run before the runtime starts, because starting it resumes the store's in-flight executions:
    an exclusive lock on the store (two servers on one store would both resume and run every step twice)
    and the listening socket (uvicorn would otherwise start the app, hence the runtime, before binding)."""
    configure_json_logging(log_level.upper())
    try:
        settings = AuthSettings()
        check_bind(host, settings)
    except ValueError as exc:   # pydantic's ValidationError is one
        log.error("%s", exc)
        return 1
    store = SqliteStore(store_path)
    try:
        with _exclusive(store.path.with_name(store.path.name + ".server.lock")) as locked:
            if not locked:
                log.error("another noetl server is using the store %s", store.path)
                return 1
            auth = Authenticator(local_admin(store), settings=settings)
            app = build_app(store, EmbeddedRuntime(store, **runtime_options), auth=auth)
            config = uvicorn.Config(app, host=host, port=port, log_config=None, lifespan="on", log_level=log_level.lower(),
                                    timeout_graceful_shutdown=5)
            try:
                sock = config.bind_socket()   # logs the reason and exits 1 when the port is taken
            except SystemExit:
                return 1
            server = uvicorn.Server(config)
            log.info("noetl server on http://%s:%d (store %s)", host, port, store.path)
            try:
                asyncio.run(server.serve(sockets=[sock]))
            finally:
                sock.close()
            return 0 if server.started else 1
    finally:
        store.close()


def local_admin(store: SqliteStore) -> SqliteTokens:
    """The store's tokens; on first start an admin token in `admin.token` beside the store (0600), which
    `noetl run --server` on this machine reads (docs/security.md "Tokens")."""
    tokens = SqliteTokens(store)
    path = local_token_file(store.path)
    created = asyncio.run(ensure_local_admin(tokens, path, time.time()))
    if created is not None:
        log.info("created the admin token %r in %s (mode 0600): `noetl run --server` on this machine uses it; "
                 "`noetl token create` makes others", created.name, path)
    return tokens


@contextmanager
def _exclusive(path: Path) -> Iterator[bool]:
    """An advisory lock held for the server's lifetime (released by the OS if the process dies)."""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
