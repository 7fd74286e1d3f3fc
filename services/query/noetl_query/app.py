"""The query service's HTTP transport: each route decodes, calls one handler, encodes.

    router(read)      the /api read routes, mounted by noetl_frontend.app.build_api too
    create_app(read)  the app of `python -m noetl_query`: the router + /health, /ready, /metrics
"""
from __future__ import annotations

import re
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Response
from fastapi.responses import JSONResponse
from pydantic import BeforeValidator, ValidationError

from noetl_runtime.auth import Authenticator
from noetl_runtime.http_ops import GaugeFn, ReadyCheck, answer, install_ops, refusals
from noetl_query import handlers as h
from noetl_query.handlers import (MAX_PAGE, STATUSES, ExecutionFilters, Explainer, LogFilters, LogPage, NoLiveState,
                                  Page, ReadModel)

# Any letter case of a status (the filter upper-cases it); a character class per letter keeps the pattern
# valid both in Python and in the document's (ECMA-262) regular expressions.
_STATUS_PATTERN = "^(" + "|".join("".join(f"[{c}{c.lower()}]" for c in s) for s in STATUSES) + ")$"
_VERSION_PATTERN = r"^(latest|0*[1-9][0-9]*)?$"
MAX_INT64 = 2**63 - 1   # offsets are 64-bit integers in SQLite and Postgres
MAX_SEQ = 2**31 - 1     # an event's seq is a Postgres integer


def _not_a_number(value: Any) -> Any:
    """pydantic would read "0.5" as epoch seconds (and a large one as milliseconds); the document says an
    ISO-8601 date-time, so a number is refused (422) rather than guessed."""
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?[0-9.]+([eE][-+]?[0-9]+)?\s*", value):
        raise ValueError("a time filter is an ISO-8601 date-time (2026-01-31T12:00:00Z), not a number")
    return value


Moment = Annotated[datetime, BeforeValidator(_not_a_number)]   # a time filter (a naive one is UTC)


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
    async def list_executions(response: Response, status: str | None = Query(None, pattern=_STATUS_PATTERN),
                              path: str | None = None, since: Moment | None = None, until: Moment | None = None,
                              parent_execution_id: str | None = None, limit: int = Query(50, ge=1, le=MAX_PAGE),
                              offset: int = Query(0, ge=0, le=MAX_INT64)) -> Any:
        """NoETL's list (a JSON array), newest first; the total number matching is in X-Total-Count."""
        filters = {"status": status, "path": path, "since": since, "until": until,
                   "parent_execution_id": parent_execution_id}
        return await answer(_listing(read, response, {k: v for k, v in filters.items() if v is not None},
                                     {"limit": limit, "offset": offset}))

    @api.get("/executions/{execution_id}", responses=refusals(404))
    async def get_execution(execution_id: str, events: bool = True) -> Any:
        return await answer(h.get_execution(read, execution_id, include_events=events))

    @api.get("/executions/{execution_id}/events", responses=refusals(404))
    async def execution_events(execution_id: str, after_seq: int = Query(-1, ge=-1, le=MAX_SEQ)) -> Any:
        return await answer(h.execution_events(read, execution_id, after_seq))

    @api.get("/executions/{execution_id}/explain", responses=refusals(404, 503))
    async def explain_execution(execution_id: str) -> Any:
        """What a running execution waits for, and until when (noetl_common.explain); `noetl status` prints it."""
        return await answer(_explain(read, explainer, execution_id))

    @api.get("/executions/{execution_id}/logs", responses=refusals(404))
    async def execution_logs(execution_id: str, response: Response,
                             step: str | None = Query(None, max_length=1000, pattern=r"^[^\x00]*$"),
                             attempt: int | None = Query(None, ge=1, le=MAX_SEQ),
                             index: int | None = Query(None, ge=0, le=MAX_SEQ),
                             limit: int = Query(50, ge=1, le=200), offset: int = Query(0, ge=0, le=2**62)) -> Any:
        """Each attempt's captured output and error (python stdout/stderr, tracebacks), redacted and bounded
        by the worker, oldest first; filters `step`, `attempt`, `index` (an iteration item); the total number
        matching is in X-Total-Count (docs/query.md, "Step output")."""
        filters = {"step": step, "attempt": attempt, "index": index}
        return await answer(_logs(read, response, execution_id, {k: v for k, v in filters.items() if v is not None},
                                  {"limit": limit, "offset": offset}))

    @api.get("/execution/data/{execution_id}", responses=refusals(404))
    async def execution_data(execution_id: str) -> Any:
        return await answer(h.execution_data(read, execution_id))

    @api.get("/events/summary/{execution_id}", responses=refusals(404))
    async def events_summary(execution_id: str) -> Any:
        return await answer(h.events_summary(read, execution_id))

    @api.get("/events/by-execution/{execution_id}", responses=refusals(404))
    async def events_by_execution(execution_id: str) -> Any:
        return await answer(h.execution_data(read, execution_id))

    @api.get("/catalog/list", responses=refusals(400))
    async def catalog_list(response: Response, resource_type: str | None = None,
                           limit: int = Query(50, ge=1, le=MAX_PAGE), offset: int = Query(0, ge=0, le=MAX_INT64),
                           include_content: bool = False) -> Any:
        """A page of registered versions, newest first, without content unless include_content=true; the
        total is in X-Total-Count and `total`."""
        async def listing() -> Any:
            body = await h.catalog_list(read, resource_type, Page.model_validate({"limit": limit, "offset": offset}),
                                        include_content)
            response.headers["X-Total-Count"] = str(body["total"])
            return body
        return await answer(listing())

    @api.get("/catalog/playbook", responses=refusals(404))
    async def catalog_playbook(playbook_id: str, version: str | None = Query(None, pattern=_VERSION_PATTERN)) -> Any:
        return await answer(_playbook(read, playbook_id, version))

    return api


def create_app(read: ReadModel, *, auth: Authenticator, ready: ReadyCheck | None = None,
               gauges: Mapping[str, GaugeFn] | None = None, explainer: Explainer | None = None) -> FastAPI:
    app = FastAPI(title="noetl query", version="1")
    app.include_router(router(read, explainer))
    install_ops(app, service="query", auth=auth, ready=ready, gauges=gauges)
    return app
