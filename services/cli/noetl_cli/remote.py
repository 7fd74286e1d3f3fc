"""`noetl run FILE --server URL`: the command contract (shared/conformance/README.md) against a running
`noetl server` or cluster, over its HTTP API only.

1. register every `kind: Playbook` under --catalog, then FILE (a 400 for FILE = INVALID with its errors);
2. upload every NOETL_SECRET_<NAME> of this environment as credential NAME, type "secret", data {"value"}
   (the workers do not share this environment; their `{{ secret.NAME }}` lookup falls back to that
   credential), then the --credentials entries (so an explicit credential wins a name clash);
3. POST /api/executions/run with an Idempotency-Key (a new UUID per command), retried with the same key
   on a connection error, a timeout, 429 (after its Retry-After) and 503 for up to SUBMIT_RETRY_FOR
   seconds: a retry of a start the server did take returns the same execution, never a second one;
   then poll the execution (cancel it once --timeout has passed), print the report of
   embedded mode from the API's data. Exit 0 COMPLETED, 1 FAILED/CANCELLED, 2 INVALID or unusable input
   (also when the server cannot be reached).
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from rich.console import Console
from rich.markup import escape

from noetl_cli.live import LiveView, summary
from noetl_cli.running import EXIT, UsageError, load_credentials, read_playbook_text, register_catalogs
from noetl_common.messages import Event
from noetl_runtime.report import invalid_report

SECRET_PREFIX = "NOETL_SECRET_"
# NOETL_SECRET_KEY is the local store's encryption key, not a playbook secret: never uploaded.
NOT_SECRETS = {"NOETL_SECRET_KEY"}
POLL_FIRST, POLL_MAX = 0.01, 0.2          # seconds: quick runs report fast, long ones cost little
UNREACHABLE_FOR = 120.0                   # give up after the server has not answered for this long
UNSEEN_FOR = 60.0                         # ... or has not shown the accepted execution for this long
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED"}
SUBMIT_RETRY_FOR = 120.0                  # keep retrying the start (same Idempotency-Key) for this long
SUBMIT_BACKOFF = (0.2, 5.0)               # first and longest pause between two tries, seconds


class RemoteError(UsageError):
    """The server cannot be used (unreachable, or an answer that makes no sense): exit status 2."""


class _Api:
    def __init__(self, client: httpx.AsyncClient, server: str) -> None:
        self.client = client
        self.server = server

    async def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise RemoteError(f"cannot reach the server at {self.server}: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def ok(response: httpx.Response, what: str) -> Any:
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text[:500]
            hint = ""
            if response.status_code == 401:
                hint = (" (set NOETL_API_TOKEN to a token of this server: `noetl token create`; a local `noetl "
                        "server` writes one to admin.token beside its store, which is read for loopback URLs)")
            raise RemoteError(f"{what}: HTTP {response.status_code}: {detail}{hint}")
        return response.json()


class _Catalog:
    """The CatalogPort slice `register_catalogs` uses, over HTTP: the same file rule as embedded mode."""

    def __init__(self, api: _Api, err: Console) -> None:
        self.api, self.err = api, err

    async def register(self, content: str, document: dict[str, Any], path: str) -> None:
        response = await self.api.call("POST", "/api/catalog/register", json={"content": content})
        if response.status_code == 400:   # an invalid playbook in the folder: running FILE decides what matters
            self.err.print(f"[yellow]skipped[/] invalid playbook {escape(path)} in --catalog")
            return
        self.api.ok(response, f"registering {path}")


class _Credentials:
    def __init__(self, api: _Api) -> None:
        self.api = api

    async def put(self, name: str, type: str, data: dict[str, Any], description: str | None = None) -> None:
        body = {"name": name, "type": type, "data": data, "description": description}
        self.api.ok(await self.api.call("POST", "/api/credentials", json=body), f"storing credential {name!r}")


class _RemoteStore:
    def __init__(self, api: _Api, err: Console) -> None:
        self.catalog = _Catalog(api, err)
        self.credentials = _Credentials(api)


def run_remote(server: str, file: Path, payload: dict[str, Any], catalogs: list[Path], credentials: Path | None,
               as_json: bool, timeout: float | None) -> int:
    out = Console(file=sys.stdout if not as_json else sys.stderr, highlight=False, soft_wrap=True)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    started = time.monotonic()
    text = read_playbook_text(file)
    report = asyncio.run(_run(server.rstrip("/"), text, file, payload, catalogs, credentials, out, err, as_json,
                              timeout, started))
    if as_json:
        print(json.dumps(report, default=str))
    elif report["status"] == "INVALID":
        out.print(f"[red]INVALID[/] {escape(str(file))}: {len(report['errors'])} error(s)")
        for e in report["errors"]:
            out.print(escape(f"  {e.get('path')} (line {e.get('line')}): {e.get('message')}"))
    else:
        summary(out, report)
    return EXIT[report["status"]]


async def _run(server: str, text: str, file: Path, payload: dict[str, Any], catalogs: list[Path],
               credentials: Path | None, out: Console, err: Console, as_json: bool, timeout: float | None,
               started: float) -> dict[str, Any]:
    token = api_token(server, os.environ)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=server, timeout=30.0, headers=headers) as client:
        api = _Api(client, server)
        store = _RemoteStore(api, err)
        await register_catalogs(store, catalogs)   # type: ignore[arg-type]  # duck-typed: catalog.register
        response = await api.call("POST", "/api/catalog/register", json={"content": text})
        if response.status_code == 400:
            body = response.json()
            if "errors" in body:
                return invalid_report(body["errors"], _ms(started))
        entry = api.ok(response, f"registering {file}")
        for name, value in _secrets(os.environ).items():
            await store.credentials.put(name, "secret", {"value": value},
                                        f"uploaded by noetl run --server from {SECRET_PREFIX}{name}")
        if credentials is not None:
            await load_credentials(store, credentials)   # type: ignore[arg-type]  # duck-typed: credentials.put
        run = await _submit(api, {"path": entry["path"], "version": entry["version"], "parameters": payload}, err)
        if run.status_code == 400 and "errors" in run.json():
            return invalid_report(run.json()["errors"], _ms(started))
        execution_id = api.ok(run, f"starting {entry['path']}")["execution_id"]
        if not as_json:
            out.print(f"[bold]{escape(entry['path'])}[/] v{entry['version']} execution {execution_id}")
        try:
            detail = await _follow(api, execution_id, timeout, None if as_json else LiveView(out, execution_id))
        except asyncio.CancelledError:   # Ctrl-C: do not leave the execution running on the server
            await asyncio.shield(_cancel(api, execution_id, "cancelled by the client (interrupted)"))
            raise
    return {"execution_id": execution_id, "status": detail["status"], "result": detail.get("result"),
            "error": detail.get("error"), "steps": detail.get("steps", {}), "events": detail.get("events", []),
            "duration_ms": _ms(started)}


def api_token(server: str, environ: Mapping[str, str]) -> str | None:
    """NOETL_API_TOKEN; else, for a server on this machine (a loopback URL), the admin token a local
    `noetl server` wrote beside the default store (NOETL_STORE's folder, else ~/.noetl)."""
    token = environ.get("NOETL_API_TOKEN", "").strip()
    if token:
        return token
    from noetl_runtime.auth import is_loopback
    from noetl_runtime.tokens import ADMIN_TOKEN_FILE
    from noetl_runtime.sqlite_store import DEFAULT_PATH

    if not is_loopback(urlsplit(server).hostname or ""):
        return None
    path = Path(environ.get("NOETL_STORE") or DEFAULT_PATH).expanduser().parent / ADMIN_TOKEN_FILE
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


async def _submit(api: _Api, body: dict[str, Any], err: Console) -> httpx.Response:
    """POST /api/executions/run, retried with one Idempotency-Key while the server cannot answer."""
    key = str(uuid.uuid4())
    give_up_at = time.monotonic() + SUBMIT_RETRY_FOR
    delay = SUBMIT_BACKOFF[0]
    while True:
        try:
            response = await api.client.post("/api/executions/run", json=body, headers={"Idempotency-Key": key})
        except httpx.TransportError as exc:   # refused, reset, timed out: maybe taken, maybe not
            why, pause = f"{type(exc).__name__}: {exc}", delay
            if time.monotonic() + pause > give_up_at:
                raise RemoteError(f"cannot reach the server at {api.server}: {why}") from exc
        else:
            if response.status_code not in (429, 503):
                return response
            why, pause = f"HTTP {response.status_code}", _retry_after(response) or delay
            if time.monotonic() + pause > give_up_at:
                return response
        err.print(f"[yellow]retrying the start[/] ({escape(why)}) in {pause:.1f} s")
        await asyncio.sleep(pause)
        delay = min(SUBMIT_BACKOFF[1], delay * 2)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    return min(float(value), SUBMIT_BACKOFF[1] * 6) if value.isdigit() else None


def _secrets(environ: Mapping[str, str]) -> dict[str, str]:
    return {key[len(SECRET_PREFIX):]: value for key, value in environ.items()
            if key.startswith(SECRET_PREFIX) and key not in NOT_SECRETS and len(key) > len(SECRET_PREFIX)}


async def _cancel(api: _Api, execution_id: str, reason: str) -> None:
    try:
        await api.call("POST", f"/api/executions/{execution_id}/cancel", json={"reason": reason})
    except RemoteError:
        pass


async def _follow(api: _Api, execution_id: str, timeout: float | None, live: LiveView | None) -> dict[str, Any]:
    """Poll until the execution is terminal; then its full detail (summary, steps, events)."""
    begun = time.monotonic()
    cancel_at = begun + timeout if timeout is not None else None
    give_up_at: float | None = None          # set once cancelled: the cancel must land within 30 s
    unreachable_since: float | None = None
    seen = -1
    delay = POLL_FIRST
    while True:
        try:
            if live is not None:
                response = await api.call("GET", f"/api/executions/{execution_id}/events",
                                          params={"after_seq": seen})
                if response.status_code == 200:
                    for raw in response.json()["events"]:
                        event = Event.model_validate(raw)
                        seen = max(seen, event.seq)
                        live(event)
            response = await api.call("GET", f"/api/executions/{execution_id}", params={"events": "false"})
            unreachable_since = None
        except RemoteError:
            # the server restarting: it resumes the execution, so keep asking for a while
            unreachable_since = unreachable_since or time.monotonic()
            if time.monotonic() - unreachable_since > UNREACHABLE_FOR:
                raise
            response = None
        if response is not None and response.status_code == 404:   # accepted, not folded (or projected) yet
            if time.monotonic() - begun > UNSEEN_FOR:
                raise RemoteError(f"execution {execution_id} was accepted but has not appeared in "
                                  f"{UNSEEN_FOR:g} s (was the server restarted before it started?)")
        elif response is not None:
            if api.ok(response, f"reading execution {execution_id}")["status"] in TERMINAL:
                detail = api.ok(await api.call("GET", f"/api/executions/{execution_id}"),
                                f"reading execution {execution_id}")
                if live is not None:
                    for raw in detail.get("events", []):
                        if raw["seq"] > seen:
                            live(Event.model_validate(raw))
                return detail
        now = time.monotonic()
        if cancel_at is not None and now >= cancel_at and give_up_at is None:
            await _cancel(api, execution_id, f"timed out after {timeout:g}s (--timeout)")
            give_up_at = now + 30
        if give_up_at is not None and now >= give_up_at:
            raise RemoteError(f"execution {execution_id} did not stop within 30 s of its cancel")
        await asyncio.sleep(delay)
        delay = min(POLL_MAX, delay * 1.5)


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
