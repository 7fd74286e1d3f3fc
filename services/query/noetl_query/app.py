"""The query service's HTTP transport: each route decodes, calls one handler, encodes.

    router(read)      the /api read routes, mounted by noetl_frontend.app.build_api too
    create_app(read)  the app of `python -m noetl_query`: the router + /health, /ready, /metrics
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from noetl_runtime.auth import Authenticator
from noetl_runtime.http_ops import GaugeFn, ReadyCheck, answer, install_ops
from noetl_query import handlers as h
from noetl_query.handlers import (ExecutionFilters, Explainer, LogFilters, LogPage, NoLiveState, Page,
                                  ReadModel)


def _version(value: str | None) -> int | None:
    """None/"latest" -> None, "3" -> 3; anything else raises (pydantic-style) for a 422."""
    if value in (None, "", "latest"):
        return None
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise ValueError(f"version must be a positive integer or 'latest', got {value!r}")


async def _listing(read: ReadModel, response: Response, filters: dict[str, Any], page: dict[str, Any]) -> Any:
    items, total = await h.list_executions(read, ExecutionFilters.model_validate(filters), Page.model_validate(page))
    response.headers["X-Total-Count"] = str(total)
    return items


async def _logs(read: ReadModel, response: Response, execution_id: str, filters: dict[str, Any],
                page: dict[str, Any]) -> Any:
    body, total = await h.attempt_logs(read, execution_id, LogFilters.model_validate(filters),
                                       LogPage.model_validate(page))
    response.headers["X-Total-Count"] = str(total)
    return body


async def _playbook(read: ReadModel, playbook_id: str, version: str | None) -> Any:
    try:
        parsed = _version(version)
    except ValueError as exc:   # a request problem, not a refused playbook: 422 like other bad parameters
        raise ValidationError.from_exception_data("version", [
            {"type": "value_error", "loc": ("query", "version"), "input": version, "ctx": {"error": str(exc)}}
        ]) from exc
    return await h.catalog_playbook(read, playbook_id, parsed)


async def _explain(read: ReadModel, explainer: Explainer | None, execution_id: str) -> Any:
    try:
        return await h.explain_execution(read, explainer, execution_id, time.time())
    except NoLiveState as exc:
        return JSONResponse({"detail": str(exc)}, status_code=503)


def router(read: ReadModel, explainer: Explainer | None = None) -> APIRouter:
    """`explainer` answers /explain from live execution states (None: only finished executions are explained)."""
    api = APIRouter(prefix="/api", tags=["query"])

    @api.get("/executions")
    async def list_executions(response: Response, status: str | None = None, path: str | None = None,
                              since: str | None = None, until: str | None = None,
                              parent_execution_id: str | None = None, limit: int = 50, offset: int = 0) -> Any:
        """NoETL's list (a JSON array), newest first; the total number matching is in X-Total-Count."""
        filters = {"status": status, "path": path, "since": since, "until": until,
                   "parent_execution_id": parent_execution_id}
        return await answer(_listing(read, response, {k: v for k, v in filters.items() if v is not None},
                                     {"limit": limit, "offset": offset}))

    @api.get("/executions/{execution_id}")
    async def get_execution(execution_id: str, events: bool = True) -> Any:
        return await answer(h.get_execution(read, execution_id, include_events=events))

    @api.get("/executions/{execution_id}/events")
    async def execution_events(execution_id: str, after_seq: int = Query(-1, ge=-1)) -> Any:
        return await answer(h.execution_events(read, execution_id, after_seq))

    @api.get("/executions/{execution_id}/explain")
    async def explain_execution(execution_id: str) -> Any:
        """What a running execution waits for, and until when (noetl_common.explain); `noetl status` prints it."""
        return await answer(_explain(read, explainer, execution_id))

    @api.get("/executions/{execution_id}/logs")
    async def execution_logs(execution_id: str, response: Response, step: str | None = None,
                             attempt: int | None = None, index: int | None = None, limit: int = 50,
                             offset: int = 0) -> Any:
        """Each attempt's captured output and error (python stdout/stderr, tracebacks), redacted and bounded
        by the worker, oldest first; filters `step`, `attempt`, `index` (an iteration item); the total number
        matching is in X-Total-Count (docs/query.md, "Step output")."""
        filters = {"step": step, "attempt": attempt, "index": index}
        return await answer(_logs(read, response, execution_id, {k: v for k, v in filters.items() if v is not None},
                                  {"limit": limit, "offset": offset}))

    @api.get("/execution/data/{execution_id}")
    async def execution_data(execution_id: str) -> Any:
        return await answer(h.execution_data(read, execution_id))

    @api.get("/events/summary/{execution_id}")
    async def events_summary(execution_id: str) -> Any:
        return await answer(h.events_summary(read, execution_id))

    @api.get("/events/by-execution/{execution_id}")
    async def events_by_execution(execution_id: str) -> Any:
        return await answer(h.execution_data(read, execution_id))

    @api.get("/catalog/list")
    async def catalog_list(response: Response, resource_type: str | None = None, limit: int = 50, offset: int = 0,
                           include_content: bool = False) -> Any:
        """A page of registered versions, newest first, without content unless include_content=true; the
        total is in X-Total-Count and `total`."""
        async def listing() -> Any:
            body = await h.catalog_list(read, resource_type, Page.model_validate({"limit": limit, "offset": offset}),
                                        include_content)
            response.headers["X-Total-Count"] = str(body["total"])
            return body
        return await answer(listing())

    @api.get("/catalog/playbook")
    async def catalog_playbook(playbook_id: str, version: str | None = None) -> Any:
        return await answer(_playbook(read, playbook_id, version))

    return api


def create_app(read: ReadModel, *, auth: Authenticator, ready: ReadyCheck | None = None,
               gauges: Mapping[str, GaugeFn] | None = None, explainer: Explainer | None = None) -> FastAPI:
    app = FastAPI(title="noetl query", version="1")
    app.include_router(router(read, explainer))
    install_ops(app, service="query", auth=auth, ready=ready, gauges=gauges)
    return app
