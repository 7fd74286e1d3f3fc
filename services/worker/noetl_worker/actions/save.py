"""`save` blocks and `type: save` steps (DSL §2.7): where an action's result goes after it succeeded.

The spec arrives as a `SaveSpec` dump with its templates unrendered, because they need the result. They
are rendered here with the step's context plus `result`, `this` (the result overlaid with data/result/
status/error), `data` (= the result, as the reference binds it) and `secret`. `code` is never rendered.

A failing save raises ActionError, so it fails the attempt and the step's retry policy applies.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from noetl_common.render import TemplateError, this_view

from noetl_worker.actions.base import ActionError, Invocation

STORAGE_ALIASES = {"event_log": "event", "events": "event", "var": "variable", "vars": "variable",
                   "postgresql": "postgres", "pg": "postgres", "webhook": "http"}
_RENDERED = ("data", "table", "auth", "url", "method", "headers", "command", "database", "key", "name")


@dataclass
class SaveOutcome:
    saved: Any = None                                   # event storage: the rendered data
    variables: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)  # what was written where (a `type: save` result)


async def run_save(spec: dict[str, Any], result: Any, inv: Invocation) -> SaveOutcome:
    storage = _storage(spec)
    context = {**inv.cmd.action.context, "result": result, "this": this_view(result), "data": result}
    raw = {k: spec.get(k) for k in _RENDERED if spec.get(k) is not None}
    try:
        rendered = await inv.secrets.render(raw, context, inv.cmd.time)
    except TemplateError as exc:
        raise ActionError(f"save ({storage}): {exc}") from exc
    merged = {**spec, **rendered}
    # No `data` at all means "save the result" (a bare `save: {name: X}` keeps the step's result).
    data = rendered["data"] if "data" in raw else result

    if storage == "event":
        return SaveOutcome(saved=data, report={"storage": "event", "data": data})
    if storage == "variable":
        name = merged.get("name")
        if not name or not isinstance(name, str):
            raise ActionError("a variable save needs `name`")
        return SaveOutcome(variables={name: data}, report={"storage": "variable", "name": name})
    if storage == "postgres":
        from noetl_worker.actions import save_sql
        return SaveOutcome(report=await save_sql.save_postgres(merged, data, inv))
    if storage == "duckdb":
        from noetl_worker.actions import save_sql
        return SaveOutcome(report=await save_sql.save_duckdb(merged, data, inv))
    if storage == "http":
        return SaveOutcome(report=await _save_http(merged, data, inv))
    if storage == "python":
        return SaveOutcome(report=await _save_python(merged, data, inv))
    raise ActionError(f"unknown save storage {storage!r} (event, variable, postgres, duckdb, http, python)")


def _storage(spec: dict[str, Any]) -> str:
    storage = spec.get("storage") or spec.get("type")
    if isinstance(storage, dict):          # a nested form the fold did not flatten: be forgiving
        storage = storage.get("type") or storage.get("kind")
    if not storage:
        storage = "variable" if spec.get("name") else "event"
    storage = str(storage).lower()
    return STORAGE_ALIASES.get(storage, storage)


def spec_from_step(inv: Invocation) -> dict[str, Any]:
    """`type: save` without a `save` block: the step's own keys are the save spec and `data` its data."""
    spec = dict(inv.config)
    spec.setdefault("data", inv.data)
    if inv.auth is not None:
        spec.setdefault("auth", inv.auth)
    return spec


async def _save_http(spec: dict[str, Any], data: Any, inv: Invocation) -> dict[str, Any]:
    from noetl_worker.actions import http

    url = spec.get("url") or spec.get("endpoint")
    if not url:
        raise ActionError("an http save needs `url`")
    method = str(spec.get("method") or "POST").upper()
    headers = {str(k): str(v) for k, v in (spec.get("headers") or {}).items() if v is not None}
    if spec.get("auth") is not None:
        from noetl_worker.auth import AuthError, resolve_single
        try:
            auth = await resolve_single(spec["auth"], inv.secrets, "http")
        except AuthError as exc:
            raise ActionError(f"http save: {exc}") from exc
        if auth is not None:
            headers.update(http.auth_headers(auth))
    # The rendered data is the body whatever the method: a save sends data, it does not query.
    request = {"method": method, "url": str(url), "headers": headers}
    if data is not None:
        request.update(http.encode_body(data, headers))
    timeout = inv.timeout if inv.timeout is not None else http.DEFAULT_TIMEOUT
    try:
        response = await http.send(request, timeout)
    except ActionError as exc:
        raise ActionError(f"save to {url} failed: {exc}") from exc
    if not 200 <= response.status_code < 300:
        raise ActionError(f"save to {url} failed: {http.status_error(response, method)}",
                          status_code=response.status_code)
    return {"storage": "http", "url": str(response.url), "status_code": response.status_code}


async def _save_python(spec: dict[str, Any], data: Any, inv: Invocation) -> dict[str, Any]:
    from noetl_worker.actions.python import run_code

    code = spec.get("code")
    if not code:
        return {"storage": "python", "result": data}    # the reference's default: echo
    try:
        out = await run_code(inv, code, {"data": data})
    except ActionError as exc:
        raise ActionError(f"python save failed: {exc}", log=exc.log) from exc
    if out.log:
        inv.note(out.log.rstrip("\n"))
    return {"storage": "python", "result": out.result}
