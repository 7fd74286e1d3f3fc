"""The ingest service's HTTP transport: each route decodes, calls one handler, encodes.

    router(ports)   the write routes under /api; the HTTP API that serves them is composed by
                    `noetl_frontend.app.build_api` (`python -m noetl_frontend`, `noetl server`,
                    `noetl server --kafka`)
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Header, Query, Request

from noetl_common import messages as m
from noetl_ingest import handlers as h
from noetl_ingest.handlers import (MAX_PAGE, CancelRequest, CredentialRequest, IngestPorts, RegisterRequest,
                                   RunRequest)
from noetl_runtime.auth import principal_of, role_of
from noetl_runtime.http_ops import answer, refusals

# The messages a client may post to /api/events (start and timer_fired are refused: 400). The body schema
# is derived from the message models of noetl_common, so the document follows them; `time` is optional
# (the server fills it) and `kind` is required (the discriminator).
_POSTABLE = (m.CancelExecution, m.ActionStarted, m.ActionHeartbeat, m.ActionCompleted, m.ActionFailed,
             m.ChildStarted, m.ChildFinished)


def _posted_event_schema() -> dict[str, Any]:
    variants = []
    for model in _POSTABLE:
        schema = model.model_json_schema()
        schema["required"] = ["kind"] + [name for name in schema.get("required", []) if name != "time"]
        if "principal" in schema["properties"]:   # a posted cancel records the caller, whatever this says
            schema["properties"]["principal"] = {"description": "ignored: the caller is recorded"}
        variants.append(schema)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": variants}}}}}


def _register_schema() -> dict[str, Any]:
    """RegisterRequest as the document shows it: exactly one of `content` or `content_base64`."""
    text = {"type": "string"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object",
        "properties": {"content": text, "content_base64": text,
                       "resource_type": {"enum": ["Playbook", "playbook", None]}},
        "oneOf": [{"required": ["content"], "not": {"required": ["content_base64"]},
                   "properties": {"content": text}},
                  {"required": ["content_base64"], "not": {"required": ["content"]},
                   "properties": {"content_base64": text}}]}}}}}


async def _validated_register(ports: IngestPorts, data: dict[str, Any], principal: str | None) -> dict[str, Any]:
    return await h.register(ports, RegisterRequest.model_validate(data), principal=principal)


def router(ports: IngestPorts) -> APIRouter:
    api = APIRouter(prefix="/api", tags=["ingest"])

    @api.post("/catalog/register", responses=refusals(400, 503), openapi_extra=_register_schema())
    async def register(request: Request, body: dict[str, Any] = Body(...)) -> Any:
        # JSON body only: NoETL also took the fields as query parameters, which let a cross-site form
        # publish a playbook (docs/security.md)
        return await answer(_validated_register(ports, body, principal_of(request)))

    @api.post("/executions/run", responses=refusals(400, 404, 409, 429, 503))
    async def run(request: Request, body: RunRequest, idempotency_key: str | None = Header(None)) -> Any:
        return await answer(h.run(ports, body, idempotency_key, principal=principal_of(request)))

    @api.post("/execute", responses=refusals(400, 404, 409, 429, 503))
    async def execute(request: Request, body: RunRequest, idempotency_key: str | None = Header(None)) -> Any:
        return await answer(h.run(ports, body, idempotency_key, principal=principal_of(request)))

    @api.post("/executions/{execution_id}/cancel", status_code=202, responses=refusals(503))
    async def cancel(request: Request, execution_id: str, body: CancelRequest | None = Body(None)) -> Any:
        return await answer(h.cancel(ports, execution_id, body or CancelRequest(), principal=principal_of(request)))

    @api.post("/events", status_code=202, responses=refusals(400, 503), openapi_extra=_posted_event_schema())
    async def post_event(request: Request, body: Any = Body(...)) -> Any:
        return await answer(h.post_event(ports, body, principal=principal_of(request), role=role_of(request)))

    @api.post("/credentials", responses=refusals(503))
    async def put_credential(body: CredentialRequest) -> Any:
        return await answer(h.put_credential(ports, body))

    @api.get("/credentials")
    async def list_credentials(type: str | None = None, q: str | None = None,
                               limit: int = Query(100, ge=1, le=MAX_PAGE),
                               offset: int = Query(0, ge=0, le=2**63 - 1)) -> Any:
        return await answer(h.list_credentials(ports, type, q, limit, offset))

    @api.get("/credentials/{name}", responses=refusals(404))
    async def get_credential(name: str, include_data: bool = False) -> Any:
        return await answer(h.get_credential(ports, name, include_data))

    @api.delete("/credentials/{name}", responses=refusals(404))
    async def delete_credential(name: str) -> Any:
        return await answer(h.delete_credential(ports, name))

    return api
