"""The ingest service's HTTP transport: each route decodes, calls one handler, encodes.

    router(ports)                     the /api routes, to mount in any app (`noetl server` mounts every
                                      service's router)
    create_app(ports, auth=...)       a standalone app: the router + /health, /ready, /metrics
    create_cluster_app(ports, read)   the app `python -m noetl_ingest` and `noetl server --kafka` serve:
                                      + the read and render routes over the Postgres read model
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Body, FastAPI, Request
from fastapi.responses import JSONResponse

from noetl_ingest import handlers as h
from noetl_ingest.handlers import CancelRequest, CredentialRequest, IngestPorts, RegisterRequest, RunRequest
from noetl_runtime.auth import Authenticator, principal_of
from noetl_runtime.http_ops import ReadyCheck, answer, install_ops
from noetl_runtime.postgres_store import MissingSecretKey

log = logging.getLogger("noetl.ingest")


async def _validated_register(ports: IngestPorts, data: dict[str, Any], principal: str | None) -> dict[str, Any]:
    return await h.register(ports, RegisterRequest.model_validate(data), principal=principal)


def router(ports: IngestPorts) -> APIRouter:
    api = APIRouter(prefix="/api", tags=["ingest"])

    @api.post("/catalog/register")
    async def register(request: Request, body: dict[str, Any] = Body(...)) -> Any:
        # JSON body only: NoETL also took the fields as query parameters, which let a cross-site form
        # publish a playbook (docs/security.md)
        return await answer(_validated_register(ports, body, principal_of(request)))

    @api.post("/executions/run")
    async def run(request: Request, body: RunRequest) -> Any:
        return await answer(h.run(ports, body, principal=principal_of(request)))

    @api.post("/execute")
    async def execute(request: Request, body: RunRequest) -> Any:
        return await answer(h.run(ports, body, principal=principal_of(request)))

    @api.post("/executions/{execution_id}/cancel", status_code=202)
    async def cancel(request: Request, execution_id: str, body: CancelRequest | None = Body(None)) -> Any:
        return await answer(h.cancel(ports, execution_id, body or CancelRequest(), principal=principal_of(request)))

    @api.post("/events", status_code=202)
    async def post_event(request: Request, body: Any = Body(...)) -> Any:
        return await answer(h.post_event(ports, body, principal=principal_of(request)))

    @api.post("/credentials")
    async def put_credential(body: CredentialRequest) -> Any:
        return await answer(h.put_credential(ports, body))

    @api.get("/credentials")
    async def list_credentials(type: str | None = None, q: str | None = None) -> Any:
        return await answer(h.list_credentials(ports, type, q))

    @api.get("/credentials/{name}")
    async def get_credential(name: str, include_data: bool = False) -> Any:
        return await answer(h.get_credential(ports, name, include_data))

    @api.delete("/credentials/{name}")
    async def delete_credential(name: str) -> Any:
        return await answer(h.delete_credential(ports, name))

    return api


def create_app(ports: IngestPorts, *, auth: Authenticator, ready: ReadyCheck | None = None) -> FastAPI:
    app = FastAPI(title="noetl ingest", version="1")
    app.include_router(router(ports))
    install_ops(app, service="ingest", auth=auth, ready=ready)
    return app


def create_cluster_app(ports: IngestPorts, read: Any, *, auth: Authenticator, ready: ReadyCheck | None = None,
                       gauges: dict[str, Any] | None = None) -> FastAPI:
    """The ingest app of a cluster: write routes + the read and render routes over `read` (a
    PostgresReadModel), + ops."""
    from aiokafka.errors import KafkaError   # here: embedded `noetl server` imports this module without Kafka

    from noetl_query.app import router as query_router
    from noetl_render.app import router as render_router
    from noetl_render.handlers import RenderPorts

    app = FastAPI(title="noetl ingest", version="1",
                  description="NoETL-compatible HTTP API of a cluster: writes go to Kafka, reads come from the "
                              "query service's Postgres projection.")
    app.include_router(router(ports))
    app.include_router(query_router(read))
    app.include_router(render_router(RenderPorts(events=read.events)))
    install_ops(app, service="ingest", auth=auth, ready=ready, gauges=gauges)

    @app.exception_handler(KafkaError)
    async def _kafka_down(_request: Request, exc: KafkaError) -> JSONResponse:
        # Nothing was accepted: the client may retry (a retried run gets a new execution id).
        log.warning("Kafka refused a send: %r", exc)
        return JSONResponse({"detail": f"Kafka is unavailable, nothing was accepted: {type(exc).__name__}"},
                            status_code=503)

    @app.exception_handler(MissingSecretKey)
    async def _no_key(_request: Request, exc: MissingSecretKey) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    return app
