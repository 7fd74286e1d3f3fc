"""The ingest service's HTTP transport: each route decodes, calls one handler, encodes.

    router(ports)   the write routes under /api; the HTTP API that serves them is composed by
                    `noetl_frontend.app.build_api` (`python -m noetl_frontend`, `noetl server`,
                    `noetl server --kafka`)
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Header, Query

from noetl_ingest import handlers as h
from noetl_ingest.handlers import CancelRequest, CredentialRequest, IngestPorts, RegisterRequest, RunRequest
from noetl_runtime.http_ops import answer


async def _validated_register(ports: IngestPorts, data: dict[str, Any]) -> dict[str, Any]:
    return await h.register(ports, RegisterRequest.model_validate(data))


def router(ports: IngestPorts) -> APIRouter:
    api = APIRouter(prefix="/api", tags=["ingest"])

    @api.post("/catalog/register")
    async def register(body: dict[str, Any] | None = Body(None), content: str | None = Query(None),
                       content_base64: str | None = Query(None), resource_type: str | None = Query(None)) -> Any:
        # NoETL takes the fields in the JSON body or as query parameters; the body wins.
        query = {"content": content, "content_base64": content_base64, "resource_type": resource_type}
        data = {k: v for k, v in query.items() if v is not None} | (body or {})
        return await answer(_validated_register(ports, data))

    @api.post("/executions/run")
    async def run(body: RunRequest, idempotency_key: str | None = Header(None)) -> Any:
        return await answer(h.run(ports, body, idempotency_key))

    @api.post("/execute")
    async def execute(body: RunRequest, idempotency_key: str | None = Header(None)) -> Any:
        return await answer(h.run(ports, body, idempotency_key))

    @api.post("/executions/{execution_id}/cancel", status_code=202)
    async def cancel(execution_id: str, body: CancelRequest | None = Body(None)) -> Any:
        return await answer(h.cancel(ports, execution_id, body or CancelRequest()))

    @api.post("/events", status_code=202)
    async def post_event(body: Any = Body(...)) -> Any:
        return await answer(h.post_event(ports, body))

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
