"""Every route of every HTTP app has a role, and the role is enforced (issue 9, scopes 1 and 2).

The apps are the real ones (`noetl server`'s, the standalone ingest/query/render apps, the cluster's ingest
app, the query service's app, the worker's ops listener), called in process over ASGI. The tokens are real
tokens of a real SQLite token store. The route list is read from each app (its OpenAPI document and its
plain routes), so a route added without a role in ROUTE_ROLES fails `test_every_route_of_every_app_has_a_role`.
"""
from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from noetl_runtime.auth import (ADMIN, AUTHOR, CONSOLE_ROUTES, OPEN, OPERATOR, ROLES, ROUTE_ROLES, VIEWER, WORKER,
                                Authenticator, allows)
from noetl_runtime.sqlite_store import SqliteStore
from noetl_runtime.tokens import SqliteTokens


class _Consumer:
    """What the query service's app reads of its Kafka consumer: counters and readiness."""

    stats = {name: 0 for name in ("records", "events", "dead_letters", "batches", "retries")}

    @staticmethod
    def not_ready() -> str | None:
        return None


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "noetl.db")
    yield s
    s.close()


@pytest.fixture
def tokens(store: SqliteStore) -> SqliteTokens:
    return SqliteTokens(store)


@pytest.fixture
async def role_tokens(tokens: SqliteTokens) -> dict[str, str]:
    return {role: (await tokens.create(f"t-{role}", role, time.time() + 3600))[0] for role in ROLES}


def apps(store: SqliteStore, auth: Authenticator) -> dict[str, Any]:
    """Every FastAPI app the project builds, by name."""
    from noetl_cli.server import build_app
    from noetl_frontend.app import build_api, cluster_api
    from noetl_runtime.settings import load_settings
    from noetl_ingest.handlers import IngestPorts
    from noetl_query.__main__ import create_service_app as query_service_app
    from noetl_query.app import create_app as query_app
    from noetl_query.sqlite_reads import SqliteReadModel
    from noetl_render.__main__ import create_service_app as render_service_app
    from noetl_render.app import create_app as render_app
    from noetl_render.handlers import RenderPorts
    from noetl_embedded.runtime import EmbeddedRuntime
    from noetl_worker.http_server import ops_app

    async def submit(_message: Any) -> None:
        return None

    ports = IngestPorts(catalog=store.catalog, credentials=store.credentials, submit=submit)
    read = SqliteReadModel(store)   # the cluster apps take a Postgres read model; the SQLite one has its shape
    return {
        "server": build_app(store, EmbeddedRuntime(store), auth=auth),
        "frontend": build_api(ports, read, RenderPorts(events=store.events), service="ingest", description="",
                              auth=auth),
        "query": query_app(SqliteReadModel(store), auth=auth),
        "query-service": query_service_app(read, _Consumer(), auth),
        "render": render_app(RenderPorts(events=store.events), auth=auth),
        # the cluster's own apps, with their own Authenticator over Postgres tokens (no pool: these tests
        # only send them anonymous calls and read their routes)
        "render-service": render_service_app(None, "noetl"),
        "frontend-cluster": cluster_api(load_settings(), None, None),
        "worker": ops_app(lambda: None, lambda: 0, 1)[0],
    }


def routes(app: Any) -> set[tuple[str, str]]:
    """(method, template) of every route the app serves: its OpenAPI operations and its plain routes
    (the documentation pages, which the OpenAPI document does not list)."""
    found = {(method.upper(), path) for path, ops in app.openapi()["paths"].items() for method in ops}
    pending = list(app.routes)
    while pending:
        route = pending.pop()
        inner = getattr(route, "original_router", None)   # an included router (the console's is not in OpenAPI)
        if inner is not None:
            pending.extend(inner.routes)
            continue
        path, methods = getattr(route, "path", None), getattr(route, "methods", None)
        if path and methods:
            found |= {(m, path) for m in methods if m != "HEAD"}
    return found


def concrete(template: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", template)


async def call(app: Any, method: str, path: str, token: str | None = None, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if path.startswith("/live/"):   # a server-sent-events stream never ends: only its status and headers
        return await _stream_start(app, path, headers)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)   # a 500 is an answer here too
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080") as client:
        if method in ("POST", "PUT", "PATCH"):
            kwargs.setdefault("json", {})
        return await client.request(method, path, headers={**headers, **kwargs.pop("headers", {})}, **kwargs)


async def _stream_start(app: Any, path: str, headers: dict[str, str]) -> httpx.Response:
    """GET `path` straight over ASGI and stop at the response's start (httpx's ASGI transport would wait for
    the end of a stream that has none)."""
    import asyncio

    started: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in {**headers, "host": "127.0.0.1"}.items()],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8080)}
    body: list[bytes] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and not started.done():
            started.set_result(message)
        elif message["type"] == "http.response.body":
            body.append(message.get("body", b""))
            if not message.get("more_body") and not started.done():
                started.set_exception(AssertionError("no response start"))

    task = asyncio.create_task(app(scope, receive, send))
    try:
        start = await asyncio.wait_for(started, 30)
        await asyncio.sleep(0.05)   # a refusal's body follows its start at once
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
    return httpx.Response(start["status"], headers=[(k.decode(), v.decode()) for k, v in start["headers"]],
                          content=b"".join(body))


# ------------------------------------------------------------------------------------------------ the table
def test_every_route_of_every_app_has_a_role(store: SqliteStore, tokens: SqliteTokens) -> None:
    missing = {name: sorted(routes(app) - set(ROUTE_ROLES)) for name, app in apps(store, Authenticator(tokens)).items()}
    assert not any(missing.values()), f"routes without a role in noetl_runtime.auth.ROUTE_ROLES: {missing}"
    served = set().union(*(routes(app) for app in apps(store, Authenticator(tokens)).values()))
    assert set(ROUTE_ROLES) <= served, f"roles for routes nobody serves: {sorted(set(ROUTE_ROLES) - served)}"


def test_only_health_ready_and_the_consoles_login_and_assets_are_open() -> None:
    assert {route for route, role in ROUTE_ROLES.items() if role == OPEN} == {
        ("GET", "/health"), ("GET", "/ready"), ("GET", "/login"), ("POST", "/login"), ("POST", "/logout"),
        ("GET", "/static/{name}")}


def test_the_roles_the_issue_names() -> None:
    assert ROUTE_ROLES[("POST", "/api/catalog/register")] == AUTHOR          # registering is running code
    assert ROUTE_ROLES[("POST", "/api/executions/run")] == OPERATOR
    assert ROUTE_ROLES[("POST", "/api/executions/{execution_id}/cancel")] == OPERATOR
    assert all(role == ADMIN for (m, p), role in ROUTE_ROLES.items() if p.startswith("/api/credentials"))
    assert ROUTE_ROLES[("POST", "/api/events")] == WORKER
    assert all(role == VIEWER for (m, p), role in ROUTE_ROLES.items() if m == "GET" and p.startswith("/api/")
               and not p.startswith("/api/credentials"))
    # the hierarchy, and worker beside it
    assert [r for r in ROLES if allows(r, OPERATOR)] == [OPERATOR, AUTHOR, ADMIN]
    assert [r for r in ROLES if allows(r, WORKER)] == [ADMIN, WORKER]
    assert not allows(WORKER, VIEWER) and not allows(None, VIEWER)


# ------------------------------------------------------------------------------------------------ enforcing
async def test_anonymous_calls_get_401_on_every_route_of_every_app(store: SqliteStore, tokens: SqliteTokens) -> None:
    for name, app in apps(store, Authenticator(tokens)).items():
        for method, template in sorted(routes(app)):
            answer = await call(app, method, concrete(template))
            if ROUTE_ROLES[(method, template)] == OPEN or (name == "worker" and template == "/metrics"):
                assert answer.status_code not in (401, 403), (name, method, template, answer.text)
            elif method == "GET" and (method, template) in CONSOLE_ROUTES:   # a page: to the login form
                assert answer.status_code == 303 and answer.headers["location"] == "/login", (name, template)
            else:
                assert answer.status_code == 401, (name, method, template, answer.status_code, answer.text)
                assert answer.headers["www-authenticate"].startswith("Bearer")


async def test_each_role_gets_exactly_its_routes(store: SqliteStore, tokens: SqliteTokens,
                                                 role_tokens: dict[str, str]) -> None:
    app = apps(store, Authenticator(tokens))["server"]
    for method, template in sorted(routes(app)):
        needed = ROUTE_ROLES[(method, template)]
        for role, token in role_tokens.items():
            answer = await call(app, method, concrete(template), token)
            if allows(role, needed):
                assert answer.status_code not in (401, 403), (role, method, template, answer.text)
            else:
                assert answer.status_code == 403, (role, method, template, answer.status_code, answer.text)
                assert needed in answer.json()["detail"]


async def test_the_worker_listener_serves_metrics_and_probes_only(store: SqliteStore, tokens: SqliteTokens,
                                                                  role_tokens: dict[str, str]) -> None:
    worker = apps(store, Authenticator(tokens))["worker"]
    assert (await call(worker, "GET", "/metrics")).status_code == 200          # its own listener
    assert (await call(worker, "GET", "/openapi.json", role_tokens[ADMIN])).status_code == 401   # no token store


async def test_a_path_outside_the_table_is_refused_and_a_wrong_method_is_405(store: SqliteStore,
                                                                              tokens: SqliteTokens,
                                                                              role_tokens: dict[str, str]) -> None:
    app = apps(store, Authenticator(tokens))["server"]

    @app.get("/api/undeclared")            # a route someone adds without a role
    async def undeclared() -> dict[str, str]:
        return {"secret": "served"}

    answer = await call(app, "GET", "/api/undeclared", role_tokens[ADMIN])
    assert answer.status_code == 403 and "secret" not in answer.text
    assert (await call(app, "GET", "/api/undeclared")).status_code == 401
    # /api/executions/run also matches /api/executions/{execution_id}: a GET there is a viewer's read, and
    # a worker (no read rights) is refused, not let through by the overlap
    assert (await call(app, "GET", "/api/executions/run", role_tokens[WORKER])).status_code == 403
    assert (await call(app, "GET", "/api/executions/run", role_tokens[VIEWER])).status_code == 404
    wrong = await call(app, "PUT", "/api/credentials", role_tokens[ADMIN])
    assert wrong.status_code == 405 and "POST" in wrong.headers["allow"]


def test_an_app_with_api_routes_cannot_be_built_without_authentication(store: SqliteStore) -> None:
    from fastapi import FastAPI

    from noetl_query.app import router
    from noetl_query.sqlite_reads import SqliteReadModel
    from noetl_runtime.http_ops import install_ops

    app = FastAPI()
    app.include_router(router(SqliteReadModel(store)))
    with pytest.raises(ValueError, match="needs an Authenticator"):
        install_ops(app, service="query", auth=None)


def test_the_openapi_document_declares_the_scheme(store: SqliteStore, tokens: SqliteTokens) -> None:
    for name, app in apps(store, Authenticator(tokens)).items():
        schema = app.openapi()
        assert schema["components"]["securitySchemes"]["bearerAuth"] == {
            "type": "http", "scheme": "bearer", "description": schema["components"]["securitySchemes"]
            ["bearerAuth"]["description"]}, name
        assert schema["security"] == [{"bearerAuth": []}], name
        for path, ops in schema["paths"].items():
            for method, op in ops.items():
                if ROUTE_ROLES[(method.upper(), path)] == OPEN or (name == "worker" and path == "/metrics"):
                    assert op["security"] == [], (name, path)
                else:
                    assert "security" not in op and {"401", "403"} <= set(op["responses"]), (name, method, path)
                    assert op["x-noetl-role"] == ROUTE_ROLES[(method.upper(), path)]
