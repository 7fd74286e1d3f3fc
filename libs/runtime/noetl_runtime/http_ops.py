"""What every service's HTTP app shares: /health, /ready, Prometheus /metrics, request metrics, the mapping of
handler exceptions to HTTP answers, JSON logs, the `python -m` entry point and its uvicorn server.

The handlers of ingest, query and render never import FastAPI; they raise plain exceptions and this module
turns them into answers, the same way for every service:

    pydantic ValidationError, codec DecodeError  -> 422  {"detail": [...pydantic errors...] | "reason"}
    LookupError                                  -> 404  {"detail": "reason"}
    PermissionError                              -> 403  {"detail": "reason"}
    ValueError (an `errors` attribute optional)  -> 400  {"detail": "reason", "errors": [...]}
    noetl_common.refusals.Refusal                -> its status (409, 413, 429 + Retry-After, 503)

Every app refuses a request body over NOETL_MAX_BODY_BYTES with 413 (`limit_request_body`), counting the
bytes as they arrive: a Content-Length over the limit is refused before any byte is read, and a body that
lies about its length or has none (chunked) is cut off at the limit.

/health answers 503 while the `live` check names a reason (a role of the process died: the supervisor
should restart it); /ready answers 503 while the `ready` check does (not yet, or no longer, able to serve).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import ValidationError

from noetl_common.codec import DecodeError
from noetl_common.refusals import Overloaded, Refusal
from noetl_runtime.auth import Authenticator, install_auth

if TYPE_CHECKING:
    import uvicorn

    from noetl_runtime.settings import Settings

T = TypeVar("T")
_OPS_PATHS = {"/health", "/ready", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
ReadyCheck = Callable[[], "str | None"]        # None when ready (or alive), else why not
GaugeFn = tuple[str, Callable[[], float]]     # (help text, current value)

# The OpenAPI declaration of the answers above, so the document lists every status a route can give and
# the shape of its body (schemathesis checks both in CI: scripts/schemathesis.sh).
_REASON_SCHEMA: dict[str, Any] = {"type": "object", "required": ["detail"],
                                  "properties": {"detail": {"type": "string"},
                                                 "errors": {"type": "array", "items": {"type": "object"}}}}
_WHY = {400: "Refused by the engine (e.g. an invalid playbook or template)", 404: "Not found",
        409: "Conflicts with a request already taken", 413: "Over a size limit",
        429: "Too many executions in flight (see Retry-After)", 503: "Unavailable now: nothing was accepted"}


def refusals(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` of a route that `answer` may map to these statuses (each a {"detail": reason} body)."""
    declared: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        declared[status] = {"description": _WHY[status], "content": {"application/json": {"schema": _REASON_SCHEMA}}}
        if status == 429:
            declared[status]["headers"] = {"Retry-After": {"schema": {"type": "integer"},
                                                           "description": "seconds to wait before retrying"}}
    return declared


async def answer(call: Awaitable[T]) -> T | JSONResponse:
    """Await a handler; map its exceptions to the HTTP answers above."""
    try:
        return await call
    except ValidationError as exc:   # before ValueError: pydantic's errors subclass it
        detail = exc.errors(include_url=False, include_context=False, include_input=False)
        return JSONResponse({"detail": detail}, status_code=422)
    except DecodeError as exc:
        return JSONResponse({"detail": str(exc)}, status_code=422)
    except Refusal as exc:
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, Overloaded) else None
        return JSONResponse({"detail": exc.reason}, status_code=exc.status, headers=headers)
    except LookupError as exc:
        return JSONResponse({"detail": _reason(exc)}, status_code=404)
    except PermissionError as exc:
        return JSONResponse({"detail": _reason(exc)}, status_code=403)
    except ValueError as exc:
        body: dict[str, Any] = {"detail": _reason(exc)}
        if getattr(exc, "errors", None) is not None:
            body["errors"] = exc.errors   # type: ignore[attr-defined]
        return JSONResponse(body, status_code=400)


def _reason(exc: BaseException) -> str:
    # KeyError's str() is the repr of its argument; every other exception's str() is the message
    return str(exc.args[0]) if exc.args else type(exc).__name__


def install_ops(app: FastAPI, *, service: str, auth: Authenticator | None, ready: ReadyCheck | None = None,
                live: ReadyCheck | None = None, gauges: Mapping[str, GaugeFn] | None = None,
                max_body_bytes: int | None = None) -> CollectorRegistry:
    """Add /health, /ready, /metrics, per-request metrics, authorization (noetl_runtime.auth) and the request
    body limit (max_body_bytes, else NOETL_MAX_BODY_BYTES) to `app`. One registry per app (not the global
    one), so several apps can live in one process (tests, `noetl server`).

    `auth` is required: every app enforces the route table. None only for a listener that serves nothing
    but ops (a worker's, whose /metrics is then open: "its own listener"); an app with any other route
    refuses to be built with None."""
    if auth is None:
        extra = sorted({getattr(r, "path", "") for r in app.router.routes} - _OPS_PATHS)
        if extra:
            raise ValueError(f"the {service} app has API routes {extra}: it needs an Authenticator")
    install_auth(app, auth)
    limit_request_body(app, max_body_bytes)   # added last: outermost, so an oversized body is 413 first
    _declare_answers(app)
    registry = CollectorRegistry()
    requests = Counter("noetl_http_requests", "HTTP requests answered", ["service", "method", "route", "status"],
                       registry=registry)
    latency = Histogram("noetl_http_request_seconds", "HTTP request latency", ["service", "method", "route"],
                        registry=registry)
    for name, (doc, value) in (gauges or {}).items():
        Gauge(name, doc, registry=registry).set_function(value)
    app.state.metrics_registry = registry   # a host process adds the collectors of the roles it runs

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default answer echoes each bad `input`, which may be secret data (a credential's
        # `data` of the wrong shape): the location and the reason are enough.
        detail = [{k: v for k, v in error.items() if k in ("type", "loc", "msg")} for error in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.middleware("http")
    async def _measure(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")   # the template, e.g. /api/executions/{execution_id}
        latency.labels(service, request.method, path).observe(time.perf_counter() - started)
        requests.labels(service, request.method, path, str(response.status_code)).inc()
        return response

    probe = {503: {"description": "Not alive / not ready, with the reason", "content": {"application/json": {
        "schema": {"type": "object", "properties": {"status": {"type": "string"}, "reason": {"type": "string"}}}}}}}

    @app.get("/health", tags=["ops"], response_model=None, responses=probe)
    async def health() -> dict[str, str] | JSONResponse:
        why = live() if live is not None else None
        if why is not None:
            return JSONResponse({"status": "dead", "reason": why}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], response_model=None, responses=probe)
    async def is_ready() -> dict[str, str] | JSONResponse:
        why = ready() if ready is not None else None
        if why is not None:
            return JSONResponse({"status": "not ready", "reason": why}, status_code=503)
        return {"status": "ready"}

    @app.get("/metrics", tags=["ops"], response_class=Response,
             responses={200: {"description": "Prometheus text exposition format",
                              "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return registry


def _declare_answers(app: FastAPI) -> None:
    """What every route may answer beyond its own declarations: a 422 is FastAPI's list of located errors or,
    from `answer` (a codec DecodeError), one reason string; any request with a body may get the 413 of the
    body limit; any API route may get a 400 for a value its store cannot hold (a NUL character in Postgres
    text: noetl_frontend.app.cluster_api)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if getattr(app.state, "answers_openapi_done", False):
            return app.openapi_schema
        schema = generate()
        invalid = schema.get("components", {}).get("schemas", {}).get("HTTPValidationError")
        if invalid is not None:
            listed = invalid["properties"]["detail"]
            invalid["properties"]["detail"] = {"anyOf": [{k: v for k, v in listed.items() if k != "title"},
                                                         {"type": "string"}], "title": "Detail"}
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                if path.startswith("/api/"):
                    operation.setdefault("responses", {}).setdefault("400", refusals(400)[400])
                if "requestBody" in operation:
                    operation.setdefault("responses", {}).setdefault("413", refusals(413)[413])
        app.state.answers_openapi_done = True
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def limit_request_body(app: FastAPI, max_body_bytes: int | None = None) -> None:
    """Answer 413 to a request whose body is over `max_body_bytes` (None: NOETL_MAX_BODY_BYTES)."""
    if max_body_bytes is None:
        from noetl_runtime.settings import load_http_limits
        max_body_bytes = load_http_limits().max_body_bytes
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)


class _BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over the limit of {limit:,} bytes (NOETL_MAX_BODY_BYTES)")


class _BodyLimit:
    """Pure ASGI (no buffering of its own). Reading past the limit raises a 413 HTTPException from
    `receive`: FastAPI re-raises HTTPExceptions met while reading a body (anything else becomes a 400), and
    its exception middleware answers it; one raised elsewhere is answered here if nothing was sent yet."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0            # the server (h11/httptools) already refuses a malformed length
                if declared > self.max_bytes:
                    await self._refuse(send)
                    return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except _BodyTooLarge:
            if started:
                raise
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse({"detail": _BodyTooLarge(self.max_bytes).detail}, status_code=413,
                                headers={"Connection": "close"})
        await response({"type": "http"}, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, any `extra=` fields, the exception."""

    _STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName",
                                                                             "color_message"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            # exc_text when a record factory already formatted it (the worker's redaction does, so a
            # traceback carrying a secret is logged redacted), as logging.Formatter itself does.
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_json_logging(level: str = "INFO") -> None:
    """Route every logger (uvicorn's too) to stderr as JSON lines. Called by entry points, never at import."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True


def run_service(name: str, serve: Callable[[Any], Awaitable[int | None]]) -> int:
    """A service's `python -m` entry point: settings from NOETL_*, JSON logs, `serve(settings)` until it
    returns; its exit status (None: 0), or 1 with the exception logged."""
    from pydantic import ValidationError

    from noetl_runtime.settings import describe_invalid, load_settings

    try:
        settings = load_settings()
    except ValidationError as exc:   # one line naming the variable, not a traceback
        configure_json_logging("INFO")
        logging.getLogger(f"noetl.{name}").error("%s", describe_invalid(exc))
        return 2
    configure_json_logging(settings.log_level)
    try:
        return asyncio.run(serve(settings)) or 0
    except ValidationError as exc:
        if not exc.title.endswith(("Settings", "Limits")):   # not a setting: a failure like any other
            logging.getLogger(f"noetl.{name}").exception("%s failed", name)
            return 1
        # settings a service reads while it starts (the API's NOETL_STEP_MAX_*)
        logging.getLogger(f"noetl.{name}").error("%s", describe_invalid(exc))
        return 2
    except Exception:
        logging.getLogger(f"noetl.{name}").exception("%s failed", name)
        return 1


def http_server(app: Any, settings: Settings, *, handle_signals: bool = True) -> uvicorn.Server:
    """A uvicorn server for `app` on NOETL_HTTP_HOST/PORT, with the app's lifespan off (the caller starts
    and stops what the app uses).

    handle_signals=True (a service's own process): SIGTERM/SIGINT make `serve()` return once the open
    requests are answered, so the caller's cleanup runs; stock uvicorn re-raises the signal after `serve()`,
    which would end the process before the consumer commits and the producer flushes.
    handle_signals=False (a host of several roles, `noetl server --kafka`): the host owns the signals and
    sets `should_exit` itself.
    Refuses (ValueError) to serve with NOETL_AUTH=off on anything but a loopback address."""
    import uvicorn

    from noetl_runtime.auth import AuthSettings, check_bind

    check_bind(settings.http_host, AuthSettings())

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            loop = asyncio.get_running_loop()
            installed = []
            for sig in (signal.SIGTERM, signal.SIGINT) if handle_signals else ():
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, self.handle_exit, sig, None)
                    installed.append(sig)
            try:
                yield
            finally:
                for sig in installed:
                    loop.remove_signal_handler(sig)

    config = uvicorn.Config(app, host=settings.http_host, port=settings.http_port, log_config=None,
                            lifespan="off", access_log=False, timeout_graceful_shutdown=5,
                            log_level=settings.log_level.lower())
    return _Server(config)
