"""`type: http` (DSL §2.2): one request with httpx; the attempt fails on a non-2xx status.

Routing of `data`: `data.query` → query string and `data.body` → body when either is given (other keys
then join the query for GET/DELETE, or form the body when there is no `body`); otherwise GET/DELETE send
`data` as query parameters and other methods send it as the body. The body is JSON unless the
Content-Type asks for a form (`application/x-www-form-urlencoded`) or `multipart/form-data`.
"""
from __future__ import annotations

import base64
import json
import ssl
from typing import Any

import httpx

from noetl_worker.actions.base import ActionError, ActionOutput, Invocation
from noetl_worker.auth import AuthError, ResolvedAuth, first, resolve_single
from noetl_worker.python_pool import format_seconds

DEFAULT_TIMEOUT = 30.0
_QUERY_METHODS = ("GET", "DELETE", "HEAD", "OPTIONS")
_ERROR_BODY_CHARS = 300
_ssl_context: ssl.SSLContext | None = None


def _ssl() -> ssl.SSLContext:
    # Building the default SSL context costs ~10 ms (it loads the CA bundle): do it once per process.
    global _ssl_context
    if _ssl_context is None:
        _ssl_context = httpx.create_ssl_context()
    return _ssl_context


async def run(inv: Invocation) -> ActionOutput:
    config = inv.config
    method = str(config.get("method") or "GET").upper()
    url = config.get("endpoint") or config.get("url")
    if not url:
        raise ActionError("http step has no `endpoint` (or `url`)")
    headers = {str(k): _header_value(v) for k, v in (config.get("headers") or {}).items() if v is not None}
    try:
        auth = await resolve_single(inv.auth, inv.secrets, "http")
    except AuthError as exc:
        raise ActionError(str(exc)) from exc
    if auth is not None:
        headers.update(auth_headers(auth))
    timeout = inv.timeout if inv.timeout is not None else DEFAULT_TIMEOUT
    request = build_request(method, str(url), headers, inv.data)
    response = await send(request, timeout)
    result = response_result(response)
    if not 200 <= response.status_code < 300:
        raise ActionError(status_error(response, method), status_code=response.status_code, result=result)
    return ActionOutput(result)


def build_request(method: str, url: str, headers: dict[str, str], data: Any) -> dict[str, Any]:
    """The keyword arguments of httpx's `request` for this method, headers and step data."""
    query: Any = None
    body: Any = None
    if isinstance(data, dict) and ("query" in data or "body" in data):
        query = data.get("query")
        body = data.get("body")
        rest = {k: v for k, v in data.items() if k not in ("query", "body")}
        if rest:
            if method in _QUERY_METHODS:
                query = {**rest, **(query if isinstance(query, dict) else {})}
            elif body is None:
                body = rest
    elif method in _QUERY_METHODS:
        query = data or None
    else:
        body = data if data not in (None, {}) else None

    kwargs: dict[str, Any] = {"method": method, "url": url, "headers": headers}
    if query:
        kwargs["params"] = _query_params(query)
    if body is not None:
        kwargs.update(encode_body(body, headers))
    return kwargs


def _query_params(query: Any) -> Any:
    if not isinstance(query, dict):
        return query  # a ready query string
    params: list[tuple[str, str]] = []
    for key, value in query.items():
        for item in value if isinstance(value, list) else [value]:
            if item is not None:
                params.append((str(key), _scalar(item)))
    return params


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def encode_body(body: Any, headers: dict[str, str]) -> dict[str, Any]:
    content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "").lower()
    if isinstance(body, (bytes, str)) and "json" not in content_type:
        return {"content": body}       # raw text the user already encoded
    if "application/x-www-form-urlencoded" in content_type and isinstance(body, dict):
        return {"data": {str(k): _scalar(v) for k, v in body.items() if v is not None}}
    if "multipart/form-data" in content_type and isinstance(body, dict):
        # httpx writes its own Content-Type with the boundary; the user's has none.
        for k in [k for k in headers if k.lower() == "content-type"]:
            del headers[k]
        files: list[tuple[str, Any]] = []
        for key, value in body.items():
            if isinstance(value, dict) and "content" in value:
                content = value["content"]
                files.append((str(key), (value.get("filename") or key, content if isinstance(content, bytes)
                                         else str(content).encode(), value.get("content_type"))))
            elif value is not None:
                files.append((str(key), (None, _scalar(value))))
        return {"files": files}
    return {"content": json.dumps(body).encode(),
            "headers": {**headers, **({} if content_type else {"Content-Type": "application/json"})}}


async def send(request: dict[str, Any], timeout: float) -> httpx.Response:
    try:
        async with httpx.AsyncClient(timeout=timeout, verify=_ssl(), follow_redirects=True) as client:
            return await client.request(**request)
    except httpx.TimeoutException as exc:
        raise ActionError(f"timed out after {format_seconds(timeout)}s") from exc
    except httpx.HTTPError as exc:
        raise ActionError(f"request to {request['url']} failed: {type(exc).__name__}: {exc}") from exc


def response_result(response: httpx.Response) -> dict[str, Any]:
    return {
        "status_code": response.status_code,
        "headers": dict(response.headers.items()),
        "url": str(response.url),
        "elapsed": response.elapsed.total_seconds(),
        "data": response_data(response),
    }


def response_data(response: httpx.Response) -> Any:
    if not response.content:
        return None
    if "json" in response.headers.get("content-type", "").lower():
        try:
            return response.json()
        except ValueError:
            pass  # says JSON, is not: hand back the text rather than failing a successful call
    return response.text


def status_error(response: httpx.Response, method: str) -> str:
    body = response.text.strip().replace("\n", " ")
    if len(body) > _ERROR_BODY_CHARS:
        body = body[:_ERROR_BODY_CHARS] + "…"
    text = f"HTTP {response.status_code} {response.reason_phrase} from {method} {response.url}".rstrip()
    return f"{text}: {body}" if body else text


def auth_headers(auth: ResolvedAuth) -> dict[str, str]:
    """Headers for a resolved credential: bearer, basic, api_key, header (DSL §2.2)."""
    data, service = auth.data, auth.service
    if service in ("generic", "http", "token", "oauth2", "secret"):
        # An untyped credential: infer from its fields, the way a user would read it.
        if first(data, "token", "access_token", "bearer_token"):
            service = "bearer"
        elif first(data, "username", "user") and "password" in data:
            service = "basic"
        elif isinstance(data.get("headers"), dict):
            service = "header"
        elif first(data, "value"):
            service = "bearer"
    if service == "bearer":
        token = first(data, "token", "access_token", "bearer_token", "value")
        if token is None:
            raise ActionError(f"bearer credential {auth.name!r} has no `token`")
        return {"Authorization": f"Bearer {token}"}
    if service == "basic":
        user = first(data, "username", "user") or ""
        password = data.get("password") or ""
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    if service == "api_key":
        header = first(data, "header", "header_name", "key_name") or \
            (data.get("key") if data.get("value") is not None else None) or "X-API-Key"
        value = first(data, "value", "api_key", "token")
        if value is None:
            raise ActionError(f"api_key credential {auth.name!r} has no `value`")
        return {str(header): str(value)}
    if service == "header":
        source = data.get("headers") if isinstance(data.get("headers"), dict) else data
        return {str(k): _header_value(v) for k, v in source.items() if v is not None}
    raise ActionError(f"credential {auth.name!r} of type {auth.service!r} cannot authenticate an http "
                      f"request (use bearer, basic, api_key or header)")


def _header_value(value: Any) -> str:
    return value if isinstance(value, str) else _scalar(value)
