"""The console's HTTP routes: server-rendered pages (Jinja2, autoescaped), its actions, its live streams.

    router(console)     mounted at `/` by noetl_frontend.app.build_api, so every mode serves the same console

Authentication and roles are the API's (noetl_runtime.auth.CONSOLE_ROUTES): viewer to look, operator to
cancel, run again and start, admin for the credentials page. The login page checks a token and keeps it in
an HttpOnly, SameSite=Strict cookie that only these routes accept; actions are JSON POSTs with the
X-NoETL-Console header (docs/console.md, "Authentication").
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
from fastapi import APIRouter, Body, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import ValidationError

from noetl_frontend.console import live, views
from noetl_frontend.console.data import PAGE_SIZES, Console
from noetl_ingest import handlers as ih
from noetl_ingest.handlers import CancelRequest, RunRequest
from noetl_render.budget import render_in_child
from noetl_runtime.auth import ADMIN, OPERATOR, SESSION_COOKIE, AuthError, allows, principal_of
from noetl_runtime.http_ops import answer

HERE = Path(__file__).parent
STATIC = {"console.css": "text/css", "console.js": "text/javascript"}
MAX_TOKEN = 4096


def environment() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["clock"] = views.clock
    env.filters["pretty"] = lambda v: json.dumps(v, indent=2, default=str, ensure_ascii=False)
    env.filters["short"] = lambda v, n=8: str(v or "")[:n]
    return env


def router(console: Console) -> APIRouter:
    env = environment()
    pages = APIRouter(include_in_schema=False)

    def page(request: Request, name: str, status: int = 200, **values: Any) -> HTMLResponse:
        principal = getattr(request.state, "principal", None)
        role = principal.role if principal is not None else None
        html = env.get_template(name).render(
            user=principal.name if principal is not None else None, role=role,
            can_act=allows(role, OPERATOR), is_admin=allows(role, ADMIN), **values)
        return HTMLResponse(html, status_code=status, headers={
            "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin",
            "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                                       "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'"})

    # ------------------------------------------------------------------------------------------ session
    @pages.get("/login")
    async def login_form(request: Request) -> HTMLResponse:
        return page(request, "login.html", error=None)

    @pages.post("/login")
    async def login(request: Request) -> Response:
        if not _same_origin(request):
            return page(request, "login.html", 403, error="cross-site login refused")
        # a urlencoded form parsed here: Starlette's form parser needs python-multipart, a dependency for one field
        body = (await request.body())[:MAX_TOKEN * 4].decode("utf-8", "replace")
        token = (parse_qs(body).get("token") or [""])[0].strip()
        if not token:
            return page(request, "login.html", 400, error="give an API token")
        try:
            if len(token) > MAX_TOKEN:
                raise AuthError(401, "the token is too long")
            principal = await console.auth.authenticate(f"Bearer {token}")
        except AuthError as exc:
            return page(request, "login.html", exc.status, error=exc.reason)
        response = RedirectResponse("/", status_code=303)
        if console.auth.enabled:
            response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict", path="/",
                                secure=request.url.scheme == "https")
        response.headers["X-NoETL-Principal"] = principal.name
        return response

    @pages.post("/logout")
    async def logout() -> Response:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @pages.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in STATIC:
            return Response("not found", status_code=404, media_type="text/plain")
        return Response((HERE / "static" / name).read_bytes(), media_type=STATIC[name],
                        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    # ------------------------------------------------------------------------------------------ executions
    @pages.get("/")
    async def executions(request: Request, status: str | None = None, path: str | None = None,
                         since: str | None = None, until: str | None = None, q: str | None = None,
                         page_no: int = 1, size: int = 50) -> Response:
        q = (q or "").strip()
        if q:
            if await console.read.execution(q) is not None:
                return RedirectResponse(f"/executions/{q}", status_code=303)
        filters = {"status": status or "", "path": path or "", "since": since or "", "until": until or ""}
        try:
            listing = await console.listing(status, path, since, until, page_no, size)
            error = f"no execution {q!r}" if q else None
        except (ValidationError, ValueError) as exc:
            listing, error = {"rows": [], "total": 0, "page": 1, "size": size, "pages": 1}, _problem(exc)
        query = {k: v for k, v in filters.items() if v}
        return page(request, "executions.html", 400 if error and not q else 200, listing=listing,
                    filters=filters, error=error, q=q, sizes=PAGE_SIZES, query=query,
                    live_url="/live/executions?" + _qs({**query, "page_no": listing["page"], "size": listing["size"]}))

    @pages.get("/executions/{execution_id}")
    async def execution(request: Request, execution_id: str) -> Response:
        shown = await console.execution(execution_id)
        # Unknown: maybe accepted and not folded yet (in Kafka mode a run answers before its first event is
        # projected). A 404 whose live part fills in if the execution appears.
        return page(request, "execution.html", 200 if shown else 404, execution_id=execution_id, x=shown)

    @pages.get("/executions/{execution_id}/step")
    async def step(request: Request, execution_id: str, name: str = "") -> Response:
        events = await console.events(execution_id)
        if not events:
            return page(request, "missing.html", 404, what=f"execution {execution_id}")
        summary = events[0].meta or {}
        found = await console.entry(summary.get("path"), summary.get("version"))
        playbook = found[1] if found else None
        spec = playbook.steps.get(name) if playbook is not None else None
        detail = views.step_detail(events, name)
        inputs = await asyncio.to_thread(views.rendered_inputs, spec, events, render_in_child)
        logs = await _logs(request, execution_id, name)
        return page(request, "step.html", execution_id=execution_id, step=detail, spec=spec, inputs=inputs,
                    logs=logs)

    # ------------------------------------------------------------------------------------------ actions
    @pages.post("/executions/{execution_id}/cancel")
    async def cancel(request: Request, execution_id: str, body: dict[str, Any] | None = Body(None)) -> Any:
        reason = str((body or {}).get("reason") or "cancelled from the console")[:1000]
        return await answer(ih.cancel(console.ingest, execution_id, CancelRequest(reason=reason),
                                      principal=principal_of(request)))

    @pages.post("/executions/{execution_id}/rerun")
    async def rerun(request: Request, execution_id: str) -> Any:
        events = await console.events(execution_id)
        if not events or events[0].event_type != "execution_start":
            return JSONResponse({"detail": f"no execution {execution_id!r}"}, status_code=404)
        meta = events[0].meta or {}
        req = RunRequest(path=meta.get("path"), version=meta.get("version"), parameters=meta.get("workload") or {})
        return await answer(ih.run(console.ingest, req, principal=principal_of(request)))

    # ------------------------------------------------------------------------------------------ catalog
    @pages.get("/catalog")
    async def catalog(request: Request) -> Response:
        latest: dict[str, Any] = {}
        for entry in await console.read.catalog():
            if entry.path not in latest or entry.version > latest[entry.path]["version"]:
                latest[entry.path] = {"path": entry.path, "version": entry.version, "created_at": entry.created_at,
                                      "registered_by": entry.registered_by}
        return page(request, "catalog.html", entries=sorted(latest.values(), key=lambda e: e["path"]))

    @pages.get("/catalog/playbook")
    async def playbook(request: Request, path: str = "", version: int | None = None) -> Response:
        shown = await console.playbook(path, version)
        if shown is None:
            return page(request, "missing.html", 404, what=f"playbook {path} version {version or 'latest'}")
        workload = shown["playbook"].workload if shown["playbook"] is not None else {}
        return page(request, "playbook.html", p=shown, workload=json.dumps(views.masked(workload), indent=2))

    @pages.post("/catalog/run")
    async def run(request: Request, body: dict[str, Any] = Body(...)) -> Any:
        workload = body.get("workload")
        if isinstance(workload, str):
            try:
                workload = json.loads(workload) if workload.strip() else {}
            except ValueError as exc:
                return JSONResponse({"detail": f"the workload is not JSON: {exc}"}, status_code=400)
        if workload is not None and not isinstance(workload, dict):
            return JSONResponse({"detail": "the workload must be a JSON object"}, status_code=400)

        async def start() -> Any:
            req = RunRequest.model_validate({"path": body.get("path"), "version": body.get("version"),
                                             "parameters": workload or {}})
            return await ih.run(console.ingest, req, principal=principal_of(request))
        return await answer(start())

    @pages.get("/credentials")
    async def credentials(request: Request) -> Response:
        listed = await ih.list_credentials(console.ingest, limit=1000)
        items = listed.get("items", listed) if isinstance(listed, dict) else listed
        return page(request, "credentials.html", items=[
            {"name": c.get("name"), "type": c.get("type"), "updated_at": c.get("updated_at")} for c in items])

    live.install(pages, console, env)
    return pages


def _problem(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return str(exc)


def _qs(values: dict[str, Any]) -> str:
    return urlencode(values)


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None:
        return True
    parts = urlsplit(origin)
    return origin != "null" and parts.netloc.lower() == request.headers.get("host", "").lower()


async def _logs(request: Request, execution_id: str, step: str) -> dict[str, Any]:
    """The step's captured output from GET /api/executions/{id}/logs, called through this same app with the
    caller's own credential (the route's role applies). Absent route or refusal: `available` is false and
    the page shows what the events carry."""
    headers = {}
    token = request.cookies.get(SESSION_COOKIE)
    if request.headers.get("authorization"):
        headers["Authorization"] = request.headers["authorization"]
    elif token:
        headers["Authorization"] = f"Bearer {token}"
    transport = httpx.ASGITransport(app=request.app)
    started = time.monotonic()
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://console", timeout=10) as client:
            answer_ = await client.get(f"/api/executions/{execution_id}/logs", params={"step": step},
                                       headers=headers)
    except Exception as exc:   # noqa: BLE001 - the page shows the events' view instead
        return {"available": False, "why": f"{type(exc).__name__}", "items": []}
    if answer_.status_code != 200:
        return {"available": False, "why": f"HTTP {answer_.status_code}", "items": []}
    body = answer_.json()
    items = body.get("items", []) if isinstance(body, dict) else []
    return {"available": True, "items": items[-100:], "seconds": time.monotonic() - started}
