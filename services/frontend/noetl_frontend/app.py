"""The HTTP API of every mode, composed in one function.

    build_api(ingest, read, render, *, service, description, ready, live, gauges, lifespan)
        the routers of ingest (writes), query (reads) and render (context-render) + /health /ready /metrics
    cluster_api(settings, pool, producer, *, ready, live, gauges, max_in_flight)
        build_api over the cluster's ports: writes produced to Kafka, reads from the Postgres read model the
        query service projects, renders over its projected event log

Why one app for writes and reads: the command contract (`noetl run --server URL`) and NoETL's clients talk
to ONE base URL. The cluster's API process has the database anyway, so it serves the read model the query
service projects (it never writes it); the standalone query and render services exist to scale reads and
to own the projection. See docs/cluster.md.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from noetl_frontend.console.data import Console
from noetl_frontend.console.routes import router as console_router
from noetl_ingest.admission import InFlight
from noetl_ingest.app import router as ingest_router
from noetl_ingest.handlers import IngestPorts
from noetl_query.app import router as query_router
from noetl_query.broker_explain import BrokerExplainer
from noetl_query.handlers import Explainer, ReadModel
from noetl_query.postgres_reads import PostgresReadModel
from noetl_render.app import router as render_router
from noetl_render.handlers import RenderPorts
from noetl_runtime.auth import Authenticator
from noetl_runtime.change_feed import ChangeFeed, PostgresChangeFeed
from noetl_runtime.http_ops import GaugeFn, ReadyCheck, install_ops
from noetl_runtime.postgres_store import (MissingSecretKey, PostgresCatalog, PostgresCredentials, PostgresExecutions,
                                          PostgresIdempotency)
from noetl_runtime.tokens import PostgresTokens

if TYPE_CHECKING:
    from noetl_runtime.settings import Settings, StepSettings

log = logging.getLogger("noetl.frontend")

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def build_api(ingest: IngestPorts, read: ReadModel, render: RenderPorts, *, service: str, description: str,
              auth: Authenticator, ready: ReadyCheck | None = None, live: ReadyCheck | None = None,
              gauges: Mapping[str, GaugeFn] | None = None, lifespan: Lifespan | None = None,
              explainer: Explainer | None = None, feed: ChangeFeed | None = None) -> FastAPI:
    """The one app: every mode's ports go through here, so a route, a middleware or a page added here is
    served the same by `noetl server`, `noetl server --kafka` and a cluster. `service` labels the request
    metrics; the app's `state.metrics_registry` takes the collectors of other roles a host process runs.
    `explainer` reads live execution states for /api/executions/{id}/explain (the modes that hold them).
    `feed` says which executions changed, for the console's live pages (None: the pages do not update)."""
    app = FastAPI(title="noetl", version="1", description=description, lifespan=lifespan)
    app.include_router(ingest_router(ingest))
    app.include_router(query_router(read, explainer))
    app.include_router(render_router(render))
    app.include_router(console_router(Console(read, ingest, auth, explainer, feed)))   # the web console at /
    install_ops(app, service=service, auth=auth, ready=ready, live=live, gauges=gauges)

    @app.exception_handler(MissingSecretKey)
    async def _no_key(_request: Request, exc: MissingSecretKey) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    return app


def cluster_api(settings: Settings, pool: Any, producer: Any, *, ready: ReadyCheck | None = None,
                live: ReadyCheck | None = None, gauges: Mapping[str, GaugeFn] | None = None,
                max_in_flight: int | None = None, explainer: Explainer | None = None,
                auth: Authenticator | None = None, step_settings: StepSettings | None = None) -> FastAPI:
    """The API of a cluster over a started asyncpg pool (migrated) and a started Kafka producer. The caller
    owns both. A send Kafka refuses is a 503 (nothing was accepted, the client may retry), or a 413 when it
    is over the topic's size limit. Idempotency scopes live in Postgres; the bound on in-flight executions
    (`max_in_flight`, else NOETL_MAX_IN_FLIGHT) reads the read model (noetl_ingest.admission). Playbooks are
    judged against NOETL_MAX_VISITS (`settings`) and the step maximums NOETL_STEP_MAX_* (`step_settings`, else
    read from the environment): set those as the workers have them."""
    # here: embedded `noetl server` imports this module without the Kafka extra
    from aiokafka.errors import KafkaError
    from asyncpg.exceptions import DataError

    from noetl_ingest.kafka_ports import KafkaSubmit, PublishingCatalog
    from noetl_runtime.settings import engine_caps, load_step_settings

    s = settings
    key = s.secret_key.get_secret_value() if s.secret_key is not None else None
    submit = KafkaSubmit(producer, s.topics)
    executions = PostgresExecutions(pool, s.database_schema)
    limit = s.max_in_flight if max_in_flight is None else max_in_flight
    ingest = IngestPorts(
        catalog=PublishingCatalog(PostgresCatalog(pool, s.database_schema), producer, s.topics),
        credentials=PostgresCredentials(pool, s.database_schema, key=key),
        submit=submit, clock=time.time, lease_seconds=s.lease_seconds, lease_retries=s.lease_retries,
        lease_retry_delay=s.lease_retry_delay,
        idempotency=PostgresIdempotency(pool, s.database_schema), known=executions.known,
        in_flight=InFlight(limit, executions.running, executions.seen),
        caps=engine_caps(s, step_settings if step_settings is not None else load_step_settings()))
    read = PostgresReadModel(pool, s.database_schema)
    if explainer is None and s.broker_url:
        explainer = BrokerExplainer(s.broker_url, token=_secret(s.broker_token))
    app = build_api(
        ingest, read, RenderPorts(events=read.events), service="ingest", ready=ready, live=live, explainer=explainer,
        feed=PostgresChangeFeed(pool, s.database_schema),   # the projector's NOTIFY, whoever projects
        auth=auth or Authenticator(PostgresTokens(pool, s.database_schema)),   # the cluster's tokens, in Postgres
        description="NoETL-compatible HTTP API of a cluster: writes go to Kafka, reads come from the query "
                    "service's Postgres projection.",
        gauges={"noetl_ingest_messages_produced": ("inbound messages produced to Kafka", lambda: float(submit.sent)),
                **(gauges or {})})

    @app.exception_handler(DataError)
    async def _unstorable(_request: Request, exc: DataError) -> JSONResponse:
        # A value of the request that Postgres cannot hold (a NUL character in text, an integer over its
        # column's range): the request's fault, so 400, never a 500. SQLite (embedded) holds both.
        return JSONResponse({"detail": f"a value of this request cannot be stored or looked up in Postgres "
                                       f"({type(exc).__name__}; e.g. a NUL character)"}, status_code=400)

    @app.exception_handler(KafkaError)
    async def _kafka_down(_request: Request, exc: KafkaError) -> JSONResponse:
        # Nothing was accepted: the client may retry (a retried run gets a new execution id).
        log.warning("Kafka refused a send: %r", exc)
        return JSONResponse({"detail": f"Kafka is unavailable, nothing was accepted: {type(exc).__name__}"},
                            status_code=503)

    return app


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None
