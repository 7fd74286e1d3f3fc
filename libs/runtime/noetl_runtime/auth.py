"""Who may call which route: authentication (API tokens, OIDC JWTs) and authorization by role, for every
HTTP app of every service (docs/security.md "Roles", "Tokens", "OIDC").

    ROUTE_ROLES        the one table: (method, route template) -> the role a caller needs (OPEN: nobody)
    Authenticator      a bearer credential -> Principal (a token from a TokenStore, or an OIDC JWT)
    install_auth(app)  the ASGI middleware that enforces the table, the cross-site checks, CORS (closed unless
                       NOETL_CORS_ORIGINS), and the security schemes of the OpenAPI document

Roles are hierarchical, viewer < operator < author < admin: each holds the rights of those below it.
`worker` stands apart: it may post facts (POST /api/events) and nothing else; admin may post facts too.
A path that the table does not name is refused (403) to every authenticated caller: a new route must be
given a role here, and tests/security enumerates every app's routes against this table.
"""
from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from noetl_runtime import tokens as tk
from noetl_runtime.tokens import TokenStore

log = logging.getLogger("noetl.auth")

VIEWER, OPERATOR, AUTHOR, ADMIN, WORKER = "viewer", "operator", "author", "admin", "worker"
ROLES = (VIEWER, OPERATOR, AUTHOR, ADMIN, WORKER)
_RANK = {VIEWER: 1, OPERATOR: 2, AUTHOR: 3, ADMIN: 4}
OPEN = "open"   # the route needs no credential

ROUTE_ROLES: dict[tuple[str, str], str] = {
    # ops: probes are open; metrics and the API description need a token (or metrics on its own listener)
    ("GET", "/health"): OPEN,
    ("GET", "/ready"): OPEN,
    ("GET", "/metrics"): VIEWER,
    ("GET", "/openapi.json"): VIEWER,
    ("GET", "/docs"): VIEWER,
    ("GET", "/docs/oauth2-redirect"): VIEWER,
    ("GET", "/redoc"): VIEWER,
    # read API (query, render)
    ("GET", "/api/executions"): VIEWER,
    ("GET", "/api/executions/{execution_id}"): VIEWER,
    ("GET", "/api/executions/{execution_id}/events"): VIEWER,
    ("GET", "/api/executions/{execution_id}/explain"): VIEWER,
    ("GET", "/api/executions/{execution_id}/logs"): VIEWER,     # step output is redacted like every event
    ("GET", "/api/execution/data/{execution_id}"): VIEWER,
    ("GET", "/api/events/summary/{execution_id}"): VIEWER,
    ("GET", "/api/events/by-execution/{execution_id}"): VIEWER,
    ("GET", "/api/catalog/list"): VIEWER,
    ("GET", "/api/catalog/playbook"): VIEWER,
    ("POST", "/api/context/render"): VIEWER,     # reads an execution's context, as the read routes do
    # running what is registered
    ("POST", "/api/executions/run"): OPERATOR,
    ("POST", "/api/execute"): OPERATOR,
    ("POST", "/api/executions/{execution_id}/cancel"): OPERATOR,
    # registering a playbook is publishing code that the workers will run
    ("POST", "/api/catalog/register"): AUTHOR,
    # secrets
    ("POST", "/api/credentials"): ADMIN,
    ("GET", "/api/credentials"): ADMIN,
    ("GET", "/api/credentials/{name}"): ADMIN,
    ("DELETE", "/api/credentials/{name}"): ADMIN,
    # facts from workers outside the cluster
    ("POST", "/api/events"): WORKER,
}
# The web console (noetl_frontend.console, docs/console.md): the same roles. Its routes also take the API
# token from the HttpOnly session cookie the login page sets; the /api routes take only the header.
CONSOLE_ROUTES: dict[tuple[str, str], str] = {
    ("GET", "/login"): OPEN,
    ("POST", "/login"): OPEN,                    # checks the token itself (form body), sets the cookie
    ("POST", "/logout"): OPEN,
    ("GET", "/static/{name}"): OPEN,             # the console's CSS and JavaScript
    ("GET", "/"): VIEWER,
    ("GET", "/executions/{execution_id}"): VIEWER,
    ("GET", "/executions/{execution_id}/step"): VIEWER,
    ("GET", "/live/executions"): VIEWER,         # server-sent events
    ("GET", "/live/executions/{execution_id}"): VIEWER,
    ("POST", "/executions/{execution_id}/cancel"): OPERATOR,
    ("POST", "/executions/{execution_id}/rerun"): OPERATOR,
    ("GET", "/catalog"): VIEWER,
    ("GET", "/catalog/playbook"): VIEWER,
    ("POST", "/catalog/run"): OPERATOR,
    ("GET", "/credentials"): ADMIN,
}
ROUTE_ROLES.update(CONSOLE_ROUTES)
SESSION_COOKIE = "noetl_token"
# A state-changing console request authenticated by the cookie must carry this header: a cross-site page
# cannot add it without a CORS preflight this server refuses (on top of SameSite=Strict and the Origin check).
CONSOLE_HEADER = "x-noetl-console"
OPS_ONLY_OPEN = {("GET", "/metrics")}   # open on a listener that serves nothing but ops (worker, broker)
MAX_CREDENTIAL = 8192                   # characters of an Authorization header; longer is refused unread
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def allows(held: str | None, needed: str) -> bool:
    """Whether a principal with role `held` may call a route that needs `needed`."""
    if needed == OPEN:
        return True
    if held is None:
        return False
    if needed == WORKER:
        return held in (WORKER, ADMIN)
    return held in _RANK and _RANK[held] >= _RANK[needed]


def role_for(method: str, path: str) -> str | None:
    """The role a route template needs; None when the table does not name it."""
    return ROUTE_ROLES.get(("GET" if method == "HEAD" else method, path))


@cache
def _templates() -> list[tuple[Any, str]]:
    # compiled on first use: the `noetl` command imports this module without the [server] extra
    from starlette.routing import compile_path

    return [(compile_path(path)[0], path) for path in sorted({path for _, path in ROUTE_ROLES})]


def route_of(method: str, path: str) -> tuple[str | None, str | None]:
    """The template of ROUTE_ROLES that a request path matches (None: none does) and the role its method
    needs (None: the template does not take this method). Matching the table itself, not the app's
    router, keeps the check independent of how a FastAPI version stores included routers."""
    first = None
    for regex, template in _templates():   # /api/executions/run also matches /api/executions/{execution_id}
        if regex.match(path):
            needed = role_for(method, template)
            if needed is not None:
                return template, needed
            first = first or template
    return first, None


def _route_path(scope: Scope) -> str:
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


@dataclass(frozen=True)
class Principal:
    name: str               # recorded on the events it causes: "token:<name>", "oidc:<subject>", "anonymous"
    role: str | None        # None: authenticated but given no role (an OIDC user outside every mapped group)


ANONYMOUS = Principal("anonymous", ADMIN)   # the caller when NOETL_AUTH=off (loopback only)


class AuthError(Exception):
    def __init__(self, status: int, reason: str, path: str | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.path = status, reason, path


# --------------------------------------------------------------------------------------------------- settings
def _csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class AuthSettings(BaseSettings):
    """NOETL_AUTH, NOETL_OIDC_*, NOETL_CORS_ORIGINS (docs/security.md)."""
    model_config = SettingsConfigDict(env_prefix="NOETL_", extra="ignore", frozen=True)

    auth: Literal["on", "off"] = "on"
    oidc_issuer: str | None = None
    oidc_audience: str | None = None
    oidc_jwks_url: str | None = None
    # where the roles are in the JWT: a claim name, dotted for nested claims (Keycloak: realm_access.roles)
    oidc_roles_claim: str = "roles"
    # {"value in the claim": "noetl role"}; a value that is already a role name needs no entry
    oidc_role_map: dict[str, str] = Field(default_factory=dict)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("auth", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        value = value.strip().lower() if isinstance(value, str) else value
        return {"true": "on", "1": "on", "false": "off", "0": "off"}.get(value, value)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: Any) -> Any:
        return _csv(value)

    @field_validator("oidc_role_map")
    @classmethod
    def _known_roles(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value.values()) - set(ROLES))
        if unknown:
            raise ValueError(f"NOETL_OIDC_ROLE_MAP maps to unknown roles {unknown}: use {', '.join(ROLES)}")
        return value

    @property
    def oidc(self) -> bool:
        parts = (self.oidc_issuer, self.oidc_audience, self.oidc_jwks_url)
        if any(parts) and not all(parts):
            raise ValueError("OIDC needs all of NOETL_OIDC_ISSUER, NOETL_OIDC_AUDIENCE and NOETL_OIDC_JWKS_URL")
        return all(parts)


def is_loopback(host: str) -> bool:
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False   # a name: it may resolve to anything


def check_bind(host: str, settings: AuthSettings) -> None:
    """Refuse to serve without authentication anywhere but on the loopback interface."""
    if settings.auth == "off" and not is_loopback(host):
        raise ValueError(f"NOETL_AUTH=off is allowed only on a loopback address (127.0.0.1, ::1, localhost), "
                         f"not {host!r}: anyone who reaches the port could run code on this machine. Remove "
                         "NOETL_AUTH=off, or bind to 127.0.0.1.")


# ---------------------------------------------------------------------------------------------- authenticator
class Authenticator:
    """Turns the Authorization header of a request into a Principal, or refuses with 401."""

    def __init__(self, tokens: TokenStore | None, *, settings: AuthSettings | None = None,
                 clock: Callable[[], float] | None = None, oidc: Any = None) -> None:
        import time

        self.settings = settings or AuthSettings()
        self.enabled = self.settings.auth == "on"
        self.tokens = tokens
        self.clock = clock or time.time
        if oidc is None and self.settings.oidc:
            from noetl_runtime.oidc import OidcVerifier

            oidc = OidcVerifier(self.settings)
        self.oidc = oidc

    async def authenticate(self, authorization: str | None) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        if not authorization:
            raise AuthError(401, "authentication required: send 'Authorization: Bearer <token>'")
        if len(authorization) > MAX_CREDENTIAL:
            raise AuthError(401, "the Authorization header is too long")
        scheme, _, credential = authorization.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise AuthError(401, "use 'Authorization: Bearer <token>'")
        if tk.well_formed(credential):
            return await self._token(credential)
        if self.oidc is not None and credential.count(".") == 2:
            return await self.oidc.principal(credential)
        raise AuthError(401, "invalid token")

    async def _token(self, token: str) -> Principal:
        if self.tokens is None:
            raise AuthError(401, "invalid token")
        try:
            record = await self.tokens.lookup(token)
        except Exception as exc:   # the database is down or refused: nobody can be authenticated now
            log.warning("the token store cannot be read: %r", exc)
            raise AuthError(503, "the token store is unavailable; try again") from None
        if record is None:
            raise AuthError(401, "invalid token")
        if record.revoked_at is not None:
            raise AuthError(401, "the token was revoked")
        if record.expires_at is not None and self.clock() >= record.expires_at:
            raise AuthError(401, "the token has expired")
        return Principal(f"token:{record.name}", record.role)


def principal_of(request: Any) -> str | None:
    """The name of the caller of a request (set by the middleware), for the events and rows it causes."""
    principal = getattr(request.state, "principal", None)
    return principal.name if principal is not None else None


def role_of(request: Any) -> str | None:
    """The role of the caller of a request (set by the middleware), for routes whose bodies differ in what
    they need (a cancel posted to POST /api/events needs `operator`, a fact `worker`)."""
    principal = getattr(request.state, "principal", None)
    return principal.role if principal is not None else None


# ------------------------------------------------------------------------------------------------- middleware
Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]


class AuthMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware: it would buffer bodies and run the app in another task)."""

    def __init__(self, app: ASGIApp, *, authenticator: Authenticator | None, cors_origins: list[str]) -> None:
        self.app, self.authenticator = app, authenticator
        self.cors_origins = set(cors_origins)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = "GET" if scope["method"] == "HEAD" else scope["method"]
        template, needed = route_of(method, _route_path(scope))
        if needed == OPEN or (self.authenticator is None and (method, template) in OPS_ONLY_OPEN):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        try:
            if self.authenticator is None:   # an ops-only listener: nothing but the probes and metrics
                raise AuthError(401, "this listener serves only /health, /ready and /metrics")
            if len(headers.get("authorization", [])) > 1:
                raise AuthError(401, "send one Authorization header")
            credential = (headers.get("authorization") or [None])[0]
            by_cookie = credential is None and (method, template) in CONSOLE_ROUTES
            if by_cookie:
                token = _cookie(headers, SESSION_COOKIE)
                credential = f"Bearer {token}" if token else None
            principal = await self.authenticator.authenticate(credential)
            if template is None:   # fail closed: a path the table does not name is served to nobody
                raise AuthError(403, "no role is declared for this path (noetl_runtime.auth.ROUTE_ROLES)")
            if needed is None:
                raise AuthError(405, f"{method} is not allowed on {template}", path=template)
            if not allows(principal.role, needed):
                raise AuthError(403, f"{method} {template} needs the role {needed!r}; "
                                     f"{principal.name} has {principal.role or 'no role'}")
            if method in UNSAFE_METHODS:
                self._same_site(scope, headers)
                if by_cookie and not headers.get(CONSOLE_HEADER):
                    raise AuthError(403, f"a console action needs the {CONSOLE_HEADER} header")
        except AuthError as exc:
            if exc.status == 401 and method == "GET" and (method, template) in CONSOLE_ROUTES:
                await _to_login(send)   # a page asked for without a session: the login page
                return
            await _refuse(send, exc)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)

    def _same_site(self, scope: Scope, headers: dict[str, list[str]]) -> None:
        """State-changing requests: JSON bodies only, nothing in the query string, no foreign Origin."""
        for origin in headers.get("origin", []):
            if origin in self.cors_origins:
                continue
            host = (headers.get("host") or [""])[0].lower()
            parts = urlsplit(origin) if origin != "null" else None
            if parts is None or parts.scheme not in ("http", "https") or parts.netloc.lower() != host:
                raise AuthError(403, f"cross-site request refused (Origin {origin[:200]!r} is not this server "
                                     "and not in NOETL_CORS_ORIGINS)")
        if scope.get("query_string"):
            raise AuthError(400, "state-changing requests take their fields in a JSON body, not the query string")
        has_body = any(v not in ("", "0") for v in headers.get("content-length", [])) or \
            "transfer-encoding" in headers
        if has_body:
            kind = (headers.get("content-type") or [""])[0].split(";")[0].strip().lower()
            if kind != "application/json" and not kind.endswith("+json"):
                raise AuthError(415, "the body must be JSON (Content-Type: application/json)")


def _headers(scope: Scope) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for key, value in scope.get("headers", []):
        found.setdefault(key.decode("latin-1").lower(), []).append(value.decode("latin-1"))
    return found


def _cookie(headers: dict[str, list[str]], name: str) -> str | None:
    for header in headers.get("cookie", []):
        for part in header.split(";"):
            key, _, value = part.strip().partition("=")
            if key == name and value:
                return value.strip('"')
    return None


async def _to_login(send: Any) -> None:
    await send({"type": "http.response.start", "status": 303,
                "headers": [(b"location", b"/login"), (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


async def _refuse(send: Any, exc: AuthError) -> None:
    body = json.dumps({"detail": exc.reason}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if exc.status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="noetl"'))
    elif exc.status == 405:
        headers.append((b"allow", ", ".join(sorted(m for m, p in ROUTE_ROLES if p == exc.path)).encode()))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------------------------------- install
def install_auth(app: Any, authenticator: Authenticator | None) -> None:
    """Enforce ROUTE_ROLES on `app` (None: an ops-only listener, where /metrics is open), CORS when
    configured, and declare the schemes in the OpenAPI document."""
    settings = authenticator.settings if authenticator is not None else AuthSettings()
    app.add_middleware(AuthMiddleware, authenticator=authenticator, cors_origins=settings.cors_origins)
    if settings.cors_origins:   # added last = outermost: a preflight is answered before authentication
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_credentials=False,
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization", "Content-Type"])
    from noetl_runtime.auth_openapi import declare_schemes

    declare_schemes(app, settings if authenticator is not None else None)
