"""Shared test support for the worker tests (no tests here): a real local HTTP server, in-memory
doubles of the credential and catalog ports, and a Command builder."""
from __future__ import annotations

import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from noetl_common.messages import ActionSpec, Command
from noetl_common.ports import CatalogEntry, Credential

BEARER = "s3cret-token-c13"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, code: int, payload: Any, content_type: str = "application/json") -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _handle(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = {k: v if len(v) > 1 else v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        headers = {k.lower(): v for k, v in self.headers.items()}
        call = {"method": self.command, "path": url.path, "query": query, "headers": headers, "json": body,
                "raw": raw.decode("utf-8", "replace")}
        self.server.calls.append(call)  # type: ignore[attr-defined]
        parts = [p for p in url.path.split("/") if p]
        head = parts[0] if parts else ""
        if head == "echo":
            return self._send(200, call)
        if head == "status":
            return self._send(int(parts[1]), {"code": int(parts[1])})
        if head == "slow":
            time.sleep(int(query.get("ms", 100)) / 1000)
            return self._send(200, {"slept": True})
        if head == "text":
            return self._send(200, b"plain words", "text/plain")
        if head == "auth":
            ok = headers.get("authorization") == f"Bearer {BEARER}"
            return self._send(200 if ok else 401, {"ok": ok})
        if head == "leak":   # an API that echoes the credential back in an error
            return self._send(500, {"detail": f"bad header {headers.get('x-api-key')}"})
        return self._send(404, {"error": "no such fixture"})

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle


class HttpFixture:
    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.calls = []  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def calls(self) -> list[dict[str, Any]]:
        return self.server.calls  # type: ignore[attr-defined]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class MemoryCredentials:
    """CredentialPort double: a dict."""

    def __init__(self, creds: dict[str, tuple[str, dict[str, Any]]] | None = None) -> None:
        self.items = {name: Credential(name=name, type=t, data=d) for name, (t, d) in (creds or {}).items()}

    async def put(self, name: str, type: str, data: dict[str, Any], description: str | None = None) -> Credential:
        self.items[name] = Credential(name=name, type=type, data=data, description=description)
        return self.items[name]

    async def get(self, name: str) -> Credential | None:
        return self.items.get(name)

    async def list(self) -> list[Credential]:
        return [c.model_copy(update={"data": {}}) for c in self.items.values()]

    async def delete(self, name: str) -> bool:
        return self.items.pop(name, None) is not None


class MemoryCatalog:
    """CatalogPort double: path -> list of versions."""

    def __init__(self) -> None:
        self.entries: dict[str, list[CatalogEntry]] = {}

    async def register(self, content: str, document: dict[str, Any], path: str) -> CatalogEntry:
        versions = self.entries.setdefault(path, [])
        entry = CatalogEntry(path=path, version=len(versions) + 1, content=content, document=document,
                             created_at=time.time())
        versions.append(entry)
        return entry

    async def get(self, path: str, version: int | None = None) -> CatalogEntry | None:
        versions = self.entries.get(path) or []
        if not versions:
            return None
        if version is None:
            return versions[-1]
        return next((e for e in versions if e.version == version), None)

    async def list(self) -> list[CatalogEntry]:
        return [v[-1] for v in self.entries.values()]


def command(type: str, *, data: dict | None = None, config: dict | None = None, auth: Any = None,
            timeout: float | None = None, save: dict | None = None, deferred: list[str] | None = None,
            context: dict | None = None, assert_returns: list[str] | None = None, phase: str = "action",
            result: Any = None, lease_seconds: float = 30.0, step: str = "step1", attempt: int = 1) -> Command:
    execution_id = "exec-1"
    return Command(
        command_id=f"{execution_id}:{step}:1:{attempt}", execution_id=execution_id, step=step, visit=1,
        attempt=attempt, phase=phase, result=result, time=1_700_000_000.0, lease_seconds=lease_seconds,
        action=ActionSpec(type=type, data=data or {}, config=config or {}, auth=auth, timeout=timeout,
                          save=save, deferred=deferred or [],
                          context=context if context is not None else {"execution_id": execution_id},
                          assert_returns=assert_returns or []))


def save_spec(**fields: Any) -> dict[str, Any]:
    """A SaveSpec dump, as the fold puts it on the command."""
    from noetl_common.dsl.models import SaveSpec
    return SaveSpec(**fields).model_dump()


class Emitted(list):
    """The emit port: an in-memory list of messages."""

    async def __call__(self, message: Any) -> None:
        self.append(message)

    def kinds(self) -> list[str]:
        return [m.kind for m in self]

    def last(self) -> Any:
        return self[-1]
