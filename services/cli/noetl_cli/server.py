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

from noetl_common.caps import DEFAULT_CAPS, Caps
from noetl_common.refusals import Unavailable
from noetl_embedded.runtime import EmbeddedRuntime
from noetl_frontend.app import build_api
from noetl_ingest.admission import DEFAULT_MAX_IN_FLIGHT, InFlight
from noetl_ingest.handlers import IngestPorts
from noetl_query.sqlite_reads import SqliteReadModel
from noetl_render.handlers import RenderPorts
from noetl_runtime.auth import Authenticator, AuthSettings, check_bind
from noetl_runtime.change_feed import ChangeFeed
from noetl_runtime.http_ops import configure_json_logging
from noetl_runtime.settings import configured_caps
from noetl_runtime.sqlite_store import SqliteStore
from noetl_runtime.tokens import SqliteTokens, ensure_local_admin, local_token_file

log = logging.getLogger("noetl.server")
WATCH_INTERVAL = 0.5   # seconds between checks that the runtime is alive


def build_app(store: SqliteStore, runtime: EmbeddedRuntime, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, *,
              auth: Authenticator, caps: Caps = DEFAULT_CAPS) -> FastAPI:
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

    def dead() -> str | None:
        return f"the runtime died: {runtime.crashed!r}" if runtime.crashed is not None else None

    async def submit(message: BaseModel) -> None:
        # Refused, never accepted and lost: a dead runtime would leave the message on a bus nobody reads.
        why = dead() or (None if started else "the runtime is not running")
        if why is not None:
            raise Unavailable(f"{why}; nothing was accepted")
        runtime.submit(message)   # type: ignore[arg-type]  # any inbound message: the bus routes by execution_id

    async def known(execution_id: str) -> bool:
        return (execution_id in runtime.states or execution_id in runtime.final
                or await store.load_state(execution_id) is not None)

    async def running() -> int:
        return len(runtime.states)

    async def seen(execution_ids: Any) -> set[str]:
        return {e for e in execution_ids if e in runtime.states or e in runtime.final}

    def ready() -> str | None:
        return dead() or (None if started else "starting")

    feed = ChangeFeed()   # the console's live pages: every event, once it is in the store
    runtime.add_listener(lambda event: feed.publish(event.execution_id))
    ingest = IngestPorts(catalog=store.catalog, credentials=store.credentials, submit=submit, clock=time.time,
                         lease_seconds=runtime.lease_seconds, lease_retries=runtime.lease_retries,
                         lease_retry_delay=runtime.lease_retry_delay, idempotency=store.idempotency, known=known,
                         in_flight=InFlight(max_in_flight, running, seen), caps=caps)
    return build_api(ingest, SqliteReadModel(store), RenderPorts(events=store.events), service="server",
                     description="NoETL-compatible HTTP API, embedded mode (SQLite, in-process workers).",
                     auth=auth, ready=ready, live=dead, lifespan=lifespan, explainer=runtime.explain, feed=feed,
                     gauges={
        "noetl_executions_active": ("executions in flight in this process", lambda: float(len(runtime.states))),
        "noetl_dead_letters": ("messages the fold could not use (the store's dead_letters table), since start",
                               lambda: float(runtime.dead_lettered)),
        "noetl_forged_facts": ("facts dropped because they did not carry their attempt's token, since start",
                               lambda: float(runtime.forged_facts)),
    })


def serve(host: str, port: int, store_path: Path | None, log_level: str = "INFO",
          max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, **runtime_options: Any) -> int:
    """Run until SIGINT/SIGTERM; 0 after a clean shutdown, 1 when the server could not start or its runtime
    died (it stops within WATCH_INTERVAL of that, so that its supervisor restarts it).

    Two guards run before the runtime starts, because starting it resumes the store's in-flight executions:
    an exclusive lock on the store (two servers on one store would both resume and run every step twice)
    and the listening socket (uvicorn would otherwise start the app, hence the runtime, before binding)."""
    configure_json_logging(log_level.upper())
    try:
        caps = configured_caps()
    except ValueError as exc:
        log.error("%s", exc)
        return 1
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
            runtime = EmbeddedRuntime(store, caps=caps, **runtime_options)
            auth = Authenticator(local_admin(store), settings=settings)
            config = uvicorn.Config(build_app(store, runtime, max_in_flight, auth=auth, caps=caps), host=host,
                                    port=port, log_config=None, lifespan="on", log_level=log_level.lower(),
                                    timeout_graceful_shutdown=5)
            try:
                sock = config.bind_socket()   # logs the reason and exits 1 when the port is taken
            except SystemExit:
                return 1
            server = _Server(config, runtime)
            log.info("noetl server on http://%s:%d (store %s)", host, port, store.path)
            try:
                asyncio.run(_serve_while_alive(server, sock, runtime))
            finally:
                sock.close()
            return 0 if server.started and runtime.crashed is None else 1
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


class _Server(uvicorn.Server):
    """uvicorn's server that tells the runtime to stop at the signal itself. uvicorn stops the app (and so
    the runtime) only after it has closed its connections, up to `timeout_graceful_shutdown` later; meanwhile
    the same signal may have killed the step processes (a process group, a systemd cgroup), and their
    attempts must not be recorded as failed (EmbeddedRuntime.request_stop)."""

    def __init__(self, config: uvicorn.Config, runtime: EmbeddedRuntime) -> None:
        super().__init__(config)
        self.runtime = runtime

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.runtime.request_stop()
        super().handle_exit(sig, frame)


async def _serve_while_alive(server: uvicorn.Server, sock: Any, runtime: EmbeddedRuntime) -> None:
    async def watch() -> None:
        while runtime.crashed is None:
            await asyncio.sleep(WATCH_INTERVAL)
        log.error("the runtime died (%r): stopping, so that a supervisor restarts the server", runtime.crashed)
        server.should_exit = True

    watcher = asyncio.create_task(watch(), name="runtime-watch")
    try:
        await server.serve(sockets=[sock])
    finally:
        watcher.cancel()


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
