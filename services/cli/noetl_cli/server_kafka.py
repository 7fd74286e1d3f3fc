"""`noetl server --kafka BOOTSTRAP --database-url DSN`: every role of the cluster in one process, on one
event loop, on Kafka + Postgres (docs/cluster.md, "One process").

    the API      one uvicorn server: `noetl_frontend.app.cluster_api`, the app `python -m noetl_frontend`
                 serves (ingest's writes, the query and render routers over the Postgres read model),
                 + /health /ready /metrics
    the broker   the faust app of `noetl_broker.create_app`, started by a faust Worker on this loop
    a worker     `WorkerService` of the pool NOETL_WORKER_POOL (default `default`), no HTTP of its own
    projection   `QueryConsumer`: noetl.events + noetl.catalog -> Postgres

The components are the services' own; only their packaging differs from scripts/cluster-start.sh, so the
process keeps the cluster's guarantees. In particular a restart resumes in-flight executions with nothing
of its own: the broker recovers its table from the changelog and replays the requests and results it had
not committed, the worker group redelivers commands whose final fact was not sent.

Start: Postgres (pool + migrations), the topics, the HTTP socket; each failure ends the start with one
line that says what is unreachable (exit 1). Stop (SIGTERM/SIGINT; a second one skips the worker's grace):
the API first (no new requests), then the worker (in-flight commands get NOETL_WORKER_SHUTDOWN_GRACE),
the broker (it settles and commits), the projection (it applies and commits its batch), the pool.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from noetl_broker.settings import BrokerSettings
from noetl_runtime.secret_key import KEY_FILE, load_key
from noetl_runtime.sqlite_store import DEFAULT_PATH

log = logging.getLogger("noetl.server")

STARTUP_TIMEOUT = 30.0      # seconds Postgres and Kafka get to answer at start before the server gives up
WATCH_INTERVAL = 0.5        # seconds between checks that every role is still alive
EXIT_AFTER_FAILURE = 10.0   # seconds the roles get to stop after one died, before the process exits anyway


class StartError(Exception):
    """The server cannot start; the message says why, in one line (no traceback is shown)."""


def server_settings(kafka: str, database_url: str, host: str, port: int, log_level: str) -> BrokerSettings:
    """Every role's settings: NOETL_* from the environment, the command line's values over them. The broker's
    own web server is off: its /ready is part of this process's /ready."""
    settings = BrokerSettings(kafka_bootstrap=kafka, database_url=database_url, http_host=host, http_port=port,
                              log_level=log_level.upper(), broker_web=False)
    if settings.worker_pool not in settings.pools:   # the broker creates the command topics of its pools
        settings = settings.model_copy(update={"broker_pools": f"{settings.broker_pools},{settings.worker_pool}"})
    if settings.secret_key is None:
        settings = settings.model_copy(update={"secret_key": SecretStr(local_secret_key().decode())})
    return settings


def local_secret_key() -> bytes:
    """Without NOETL_SECRET_KEY, the key embedded mode uses: `secret.key` beside the default store
    (NOETL_STORE, else ~/.noetl/noetl.db), generated on first use. A single-process server then stores
    credentials out of the box, and the key never sits in the database it protects. Workers started
    elsewhere to join this server need the same key in NOETL_SECRET_KEY."""
    store_dir = Path(os.environ.get("NOETL_STORE") or DEFAULT_PATH).expanduser().parent
    log.warning("NOETL_SECRET_KEY is not set: credentials are encrypted with %s; other processes that read "
                "them (extra workers) need the same key", store_dir / KEY_FILE)
    return load_key(store_dir, env={})


def where(dsn: str) -> str:
    """host:port/database of a DSN: enough to say which server is meant, without the password."""
    parts = urlsplit(dsn)
    return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or ''}"


class KafkaServer:
    """The started roles of one `noetl server --kafka` process."""

    def __init__(self, settings: BrokerSettings, max_in_flight: int | None = None, step_settings: Any = None) -> None:
        self.settings = settings
        self.max_in_flight = max_in_flight   # None: NOETL_MAX_IN_FLIGHT
        self.step_settings = step_settings   # NOETL_STEP_*: the API's step maximums (None: read at start)
        self.pool: Any = None
        self.producer: Any = None       # ingest's: StartExecution, cancels and posted facts
        self.query: Any = None
        self.worker: Any = None
        self.python_pool: Any = None
        self.faust_app: Any = None
        self.faust_worker: Any = None
        self.faust_datadir: str | None = None
        self.role_metrics = CollectorRegistry()   # the worker's counters, served on the API's /metrics
        self.http: Any = None
        self.http_task: asyncio.Task[None] | None = None
        self.stopping = False

    # ------------------------------------------------------------------------------------------ start
    async def open_postgres(self) -> None:
        import asyncpg

        from noetl_runtime.postgres_store import open_pool

        s = self.settings
        try:
            async with asyncio.timeout(STARTUP_TIMEOUT):
                self.pool = await open_pool(s)   # migrates the schema (idempotent, safe with other replicas)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StartError(f"cannot use Postgres at {where(s.database_url or '')} (schema "
                             f"{s.database_schema}): {_reason(exc)}") from None

    async def ensure_topics(self) -> None:
        """Create the missing topics. Also the check that Kafka answers: nothing else starts before it."""
        from aiokafka.errors import KafkaError

        from noetl_runtime import kafka_io

        s = self.settings
        try:
            async with asyncio.timeout(STARTUP_TIMEOUT):
                created = await kafka_io.ensure_topics(s, s.topics, s.pools, partitions=s.topic_partitions)
        except (KafkaError, OSError, TimeoutError) as exc:
            raise StartError(f"cannot reach Kafka at {s.kafka_bootstrap}: {_reason(exc)}") from None
        if created:
            log.info("created topics %s", created)

    async def start_roles(self, sock: socket.socket) -> None:
        """Projection, worker, broker, then the API on the bound socket."""
        from noetl_query.consumer import QueryConsumer
        from noetl_query.projector import Projector
        from noetl_runtime import kafka_io
        from noetl_runtime.http_ops import http_server

        s = self.settings
        self.query = QueryConsumer(s, Projector(self.pool, s.database_schema))
        await self.query.start()
        self.worker = self._worker()
        await self.worker.start()
        await self._start_broker()
        self.producer = kafka_io.make_producer(s)
        await self.producer.start()
        # The server owns SIGTERM/SIGINT (run_server) and stops the API in its turn.
        self.http = http_server(self._api(), s, handle_signals=False)
        self.http_task = asyncio.create_task(self.http.serve(sockets=[sock]), name="server-http")

    def _worker(self) -> Any:
        from noetl_runtime.postgres_store import PostgresCatalog, PostgresCredentials
        from noetl_worker.ports import WorkerPorts
        from noetl_worker.python_pool import PythonPool
        from noetl_worker.service import WorkerOptions, WorkerService

        s = self.settings
        credentials = PostgresCredentials(self.pool, s.database_schema, key=_secret_key(s))
        catalog = PostgresCatalog(self.pool, s.database_schema)
        processes = os.environ.get("NOETL_WORKER_PYTHON_PROCESSES")
        self.python_pool = PythonPool(max(1, int(processes)) if processes else max(1, os.cpu_count() or 1))
        worker_id = f"{socket.gethostname()}-{os.getpid()}"
        # The API is this process's; topics were created above.
        options = dataclasses.replace(WorkerOptions.from_env(), serve_http=False, create_topics=False)
        return WorkerService(s, lambda emit: WorkerPorts(emit=emit, credentials=credentials, catalog=catalog,
                                                         python_pool=self.python_pool, worker_id=worker_id),
                             options=options, metrics_registry=self.role_metrics)

    async def _start_broker(self) -> None:
        import faust

        from noetl_broker.app import create_app

        class InProcessWorker(faust.Worker):
            """faust's Worker (the supported way to run an app on an existing loop) minus the signals: the
            server owns SIGTERM/SIGINT and stops the broker in its turn."""

            def install_signal_handlers(self) -> None:
                pass

        # faust makes a data directory (`<app id>-data`, in the working directory by default) even for the
        # memory store the broker uses: keep it out of the user's directory, and remove it at stop.
        self.faust_datadir = tempfile.mkdtemp(prefix="noetl-server-faust.")
        self.faust_app = create_app(self.settings, datadir=self.faust_datadir)
        # daemon=False: start() returns once the app runs, instead of waiting for it to stop
        self.faust_worker = InProcessWorker(self.faust_app, loop=asyncio.get_running_loop(), daemon=False,
                                            quiet=True, override_logging=False, redirect_stdouts=False,
                                            loglevel=self.settings.log_level)
        self.faust_worker.spinner = None   # a terminal progress spinner: it would write escapes to stdout
        await self.faust_worker.start()

    def _api(self) -> Any:
        from noetl_frontend.app import cluster_api

        # The broker runs in this process and owns every partition: /explain reads its table (docs/query.md).
        app = cluster_api(self.settings, self.pool, self.producer, ready=self.not_ready, live=self.failure,
                          max_in_flight=self.max_in_flight, explainer=self.faust_app.noetl_broker.explain,
                          step_settings=self.step_settings, gauges={
            "noetl_worker_commands_in_flight": ("commands running", lambda: float(self.worker.in_flight)),
            "noetl_query_events": ("events projected", lambda: float(self.query.stats["events"])),
        })
        # One /metrics for the process: the worker's counters and everything the broker's own /metrics shows
        app.state.metrics_registry.register(self.role_metrics)
        from noetl_broker.web import BrokerCollector
        app.state.metrics_registry.register(BrokerCollector(self.faust_app.noetl_broker))
        return app

    # ------------------------------------------------------------------------------------------ running
    def not_ready(self) -> str | None:
        """Ready once every role is: the broker's table recovered, the worker and the projection in their
        groups (until then a run would be accepted but wait)."""
        if self.stopping:
            return "stopping"
        for role, check in (("broker", self.faust_app.noetl_broker.not_ready), ("worker", self.worker.not_ready),
                            ("query", self.query.not_ready)):
            why = check()
            if why is not None:
                return f"{role}: {why}"
        return None

    def failure(self) -> str | None:
        """Why a role stopped on its own, or None while all of them run."""
        if self.faust_worker.crashed or self.faust_app.crashed:
            reason = self.faust_app.crash_reason or self.faust_worker.crash_reason
            return f"the broker crashed: {reason!r}"
        if self.query.task is not None and self.query.task.done():
            return f"the projection stopped: {_task_error(self.query.task)}"
        # WorkerService has no public handle on its loops; `run()` watches the same list.
        for task in self.worker.tasks:
            if task.done():
                return f"the worker's {task.get_name()} stopped: {_task_error(task)}"
        if self.http_task is not None and self.http_task.done():
            return f"the HTTP server stopped: {_task_error(self.http_task)}"
        return None

    async def watch(self, stop: asyncio.Event) -> str | None:
        """Until `stop` is set (None) or a role fails (its reason)."""
        while not stop.is_set():
            why = self.failure()
            if why is not None:
                return why
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WATCH_INTERVAL):
                    await stop.wait()
        return None

    # ------------------------------------------------------------------------------------------ stop
    async def stop(self) -> None:
        """Each role in turn, whatever the others did; what was never started is skipped."""
        self.stopping = True
        if self.http is not None and self.http_task is not None:
            self.http.should_exit = True
            await asyncio.gather(self.http_task, return_exceptions=True)
        steps = [("worker", self.worker and self.worker.stop), ("broker", self.faust_worker and self.faust_worker.stop),
                 ("query", self.query and self.query.stop), ("producer", self.producer and self.producer.stop),
                 ("postgres", self.pool and self.pool.close)]
        for role, stop in steps:
            if stop:
                try:
                    await stop()
                except Exception as exc:   # the next roles still need their stop
                    log.warning("stopping the %s failed: %r", role, exc)
        if self.python_pool is not None:
            self.python_pool.close()
        if self.faust_datadir is not None:
            shutil.rmtree(self.faust_datadir, ignore_errors=True)


async def run_server(settings: BrokerSettings, sock: socket.socket, max_in_flight: int | None = None,
                     step_settings: Any = None) -> int:
    """Start every role, serve until a signal (0) or a role's failure (1), stop every role."""
    server = KafkaServer(settings, max_in_flight, step_settings)
    stop = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1 and server.worker is not None:
            server.worker.request_stop()   # already stopping: a second request cancels in-flight commands
        stop.set()

    with _signals(on_signal):
        try:
            await server.open_postgres()
            await server.ensure_topics()
            if stop.is_set():
                return 0
            await server.start_roles(sock)
            log.info("noetl server on http://%s:%d (Kafka %s, Postgres %s schema %s, topic prefix %r)",
                     settings.http_host, settings.http_port, settings.kafka_bootstrap,
                     where(settings.database_url or ""), settings.database_schema, settings.topic_prefix)
            failed = await server.watch(stop)
            if failed is not None:
                log.error("%s; stopping", failed)
                _exit_hard_after(EXIT_AFTER_FAILURE)
            return 1 if failed is not None else 0
        except StartError as exc:
            log.error("%s", exc)
            return 1
        finally:
            await server.stop()
            log.info("noetl server stopped")


def serve_kafka(host: str, port: int, kafka: str, database_url: str, log_level: str = "INFO",
                max_in_flight: int | None = None) -> int:
    """The `noetl server --kafka` command: 0 after a signal, 1 when it could not start or a role failed."""
    from pydantic import ValidationError

    from noetl_runtime.http_ops import configure_json_logging

    from noetl_runtime.settings import STEP_PREFIX, describe_invalid, load_step_settings

    configure_json_logging(log_level.upper())
    try:
        settings = server_settings(kafka, database_url, host, port, log_level)
    except ValidationError as exc:
        log.error("%s", describe_invalid(exc))
        return 1
    try:   # the API judges `limits:` against the maximums of this process's worker (NOETL_STEP_MAX_*)
        step_settings = load_step_settings()
    except ValidationError as exc:
        log.error("%s", describe_invalid(exc, STEP_PREFIX))
        return 1
    try:
        from noetl_runtime.auth import AuthSettings, check_bind

        check_bind(host, AuthSettings())
    except ValueError as exc:   # pydantic's ValidationError is one
        log.error("%s", exc)
        return 1
    try:   # bound before anything starts, so that a taken port fails at once
        sock = _listen(host, port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, _reason(exc))
        return 1
    try:
        return asyncio.run(run_server(settings, sock, max_in_flight, step_settings))
    finally:
        sock.close()


# ---------------------------------------------------------------------------------------------------------
def _exit_hard_after(seconds: float) -> None:
    """A role died: the process must end (status 1) so that its supervisor restarts it, even if stopping
    the other roles hangs on the dead one (a faust worker whose agent crashed may never finish stopping)."""
    def watchdog() -> None:
        time.sleep(seconds)
        log.error("the roles did not stop within %g s of a failure: exiting now", seconds)
        logging.shutdown()
        os._exit(1)

    threading.Thread(target=watchdog, name="exit-watchdog", daemon=True).start()


def _listen(host: str, port: int) -> socket.socket:
    """The API's listening socket, as uvicorn would make it (uvicorn's own binding logs "running" at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # a restart may follow a crash at once
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


@contextlib.contextmanager
def _signals(handler: Any) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handler)
    try:
        yield
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _secret_key(settings: BrokerSettings) -> str | None:
    return settings.secret_key.get_secret_value() if settings.secret_key is not None else None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, TimeoutError):
        return f"no answer within {STARTUP_TIMEOUT:g} s"
    name = type(exc).__name__
    if not text:
        return name
    return text if text.startswith(name) else f"{name}: {text}"   # aiokafka's messages start with the name


def _task_error(task: asyncio.Task[Any]) -> str:
    if task.cancelled():
        return "cancelled"
    error = task.exception()
    return repr(error) if error is not None else "it returned"
