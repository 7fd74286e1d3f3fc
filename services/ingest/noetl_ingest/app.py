"""The ingest service's HTTP transport: each route decodes, calls one handler, encodes.

    router(ports)   the write routes under /api; the HTTP API that serves them is composed by
                    `noetl_frontend.app.build_api` (`python -m noetl_frontend`, `noetl server`,
                    `noetl server --kafka`)
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Header, Request

from noetl_ingest import handlers as h
from noetl_ingest.handlers import CancelRequest, CredentialRequest, IngestPorts, RegisterRequest, RunRequest
from noetl_runtime.auth import principal_of, role_of
from noetl_runtime.http_ops import answer


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
    async def run(request: Request, body: RunRequest, idempotency_key: str | None = Header(None)) -> Any:
        return await answer(h.run(ports, body, idempotency_key, principal=principal_of(request)))

    @api.post("/execute")
    async def execute(request: Request, body: RunRequest, idempotency_key: str | None = Header(None)) -> Any:
        return await answer(h.run(ports, body, idempotency_key, principal=principal_of(request)))

    @api.post("/executions/{execution_id}/cancel", status_code=202)
    async def cancel(request: Request, execution_id: str, body: CancelRequest | None = Body(None)) -> Any:
        return await answer(h.cancel(ports, execution_id, body or CancelRequest(), principal=principal_of(request)))

    @api.post("/events", status_code=202)
    async def post_event(request: Request, body: Any = Body(...)) -> Any:
        return await answer(h.post_event(ports, body, principal=principal_of(request), role=role_of(request)))

    @api.post("/credentials")
    async def put_credential(body: CredentialRequest) -> Any:
        return await answer(h.put_credential(ports, body))

    @api.get("/credentials")
    async def list_credentials(type: str | None = None, q: str | None = None, limit: int = 100,
                               offset: int = 0) -> Any:
        return await answer(h.list_credentials(ports, type, q, limit, offset))

    @api.get("/credentials/{name}")
    async def get_credential(name: str, include_data: bool = False) -> Any:
        return await answer(h.get_credential(ports, name, include_data))

    @api.delete("/credentials/{name}")
    async def delete_credential(name: str) -> Any:
        return await answer(h.delete_credential(ports, name))

    return api
