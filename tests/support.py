"""Helpers shared by tests of every kind: `from support import free_port`.

Importable because pyproject's pytest settings put tests/ on sys.path (`pythonpath = ["tests"]`).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a server the test is about to start.
    Another process may take it in between; the servers tested fail loudly when that happens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_admin_token(store: "str | Path") -> str:
    """The admin token a `noetl server --store STORE` wrote beside its store on first start (it is written
    before the server listens, so once /ready answers it is there)."""
    from noetl_runtime.tokens import ADMIN_TOKEN_FILE

    return (Path(store).parent / ADMIN_TOKEN_FILE).read_text().strip()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def new_pg_token(pool: Any, schema: str, role: str = "admin") -> str:
    """A new token in a migrated cluster schema (pool or connection), as `noetl token create --postgres`."""
    import uuid

    from noetl_runtime.tokens import PostgresTokens

    token, _ = await PostgresTokens(pool, schema).create(f"test-{role}-{uuid.uuid4().hex[:8]}", role, None)
    return token


def pg_token(dsn: str, schema: str, role: str = "admin") -> str:
    """new_pg_token from synchronous code: connects, migrates the schema first, creates the token."""
    import asyncio

    import asyncpg

    from noetl_runtime.postgres_store import ensure_schema

    async def go() -> str:
        conn = await asyncpg.connect(dsn)
        try:
            await ensure_schema(conn, schema)
            return await new_pg_token(conn, schema, role)
        finally:
            await conn.close()
    return asyncio.run(go())


# ------------------------------------------------------------------------------------ Postgres, synchronously
def pg_execute(dsn: str, sql: str) -> None:
    """Run one statement (or several, without arguments) on its own connection."""
    import asyncio

    import asyncpg

    async def go() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()
    asyncio.run(go())


def pg_rows(dsn: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    import asyncio

    import asyncpg

    async def go() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(dsn)
        try:
            return [dict(row) for row in await conn.fetch(sql, *args)]
        finally:
            await conn.close()
    return asyncio.run(go())


@contextmanager
def scratch_database(dsn: str, prefix: str) -> Iterator[str]:
    """A database of its own on the Postgres server of `dsn` (for a module whose playbooks create tables in
    `public`), dropped with its connections afterwards; yields its DSN."""
    import urllib.parse
    import uuid

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    pg_execute(dsn, f"CREATE DATABASE {name}")
    try:
        yield urllib.parse.urlsplit(dsn)._replace(path=f"/{name}").geturl()
    finally:
        pg_execute(dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def postgres_credentials(dsn: str, names: Sequence[str]) -> dict[str, Any]:
    """`noetl run --credentials` content: each name a `postgres` credential for the database of `dsn`."""
    import urllib.parse

    p = urllib.parse.urlsplit(dsn)
    data = {"dsn": dsn, "host": p.hostname, "port": p.port or 5432, "user": p.username or "postgres",
            "password": urllib.parse.unquote(p.password or ""), "database": p.path.lstrip("/")}
    return {name: {"type": "postgres", "data": data} for name in names}


# ------------------------------------------------------------------------------ the API's OpenAPI document
def _document_valid(document: dict[str, Any], schema: dict[str, Any], value: Any) -> bool:
    from jsonschema import Draft202012Validator

    # the document's $refs (#/components/...) resolve against a root that carries its components
    return Draft202012Validator({**schema, "components": document["components"]}).is_valid(value)


def declared(document: dict[str, Any], method: str, template: str, response: Any) -> None:
    """Assert that the OpenAPI `document` lists the status of this httpx `response` for the operation, with
    its content type, and that the body matches the schema it gives (what schemathesis checks in CI)."""
    operation = document["paths"][template][method.lower()]
    status = str(response.status_code)
    assert status in operation["responses"], f"{method} {template}: {status} is not declared"
    content = operation["responses"][status].get("content", {})
    kind = response.headers.get("content-type", "").split(";")[0]
    assert not content or kind in {k.split(";")[0] for k in content}, f"{method} {template}: {kind} not declared"
    schema = content.get("application/json", {}).get("schema")
    if schema and kind == "application/json":
        assert _document_valid(document, schema, response.json()), \
            f"{method} {template}: {response.text} violates {schema}"


def body_valid(document: dict[str, Any], template: str, body: Any) -> bool:
    """Whether the document's request body schema of POST `template` allows `body`."""
    schema = document["paths"][template]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return _document_valid(document, schema, body)


def printed_traceback(text: str) -> bool:
    """A Python traceback printed by the process itself (a crash). A step's captured output may hold its own
    traceback, but in a `--json` report it is a JSON string, so its newlines are escaped (`\\n`) and it does
    not match."""
    return "Traceback (most recent call last):\n" in text


# ------------------------------------------------------------------------------------ a real `noetl server`
NOETL = Path(sys.executable).with_name("noetl")


def until(check: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy (returned), failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)
    return value


class NoetlServer:
    """`noetl server --port PORT ARGS` in its own process group (its python step processes with it, as a
    supervisor would hold them), its output appended to `log`. `start()` returns once /ready answers 200 and
    fails with the log's tail when the process exits first."""

    def __init__(self, args: Sequence[str | Path], env: dict[str, str], log: Path, *, port: int | None = None,
                 cwd: Path | None = None) -> None:
        self.args, self.env, self.log, self.cwd = list(args), env, log, cwd
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> Any:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([str(NOETL), "server", "--port", str(self.port), *map(str, self.args)],
                                         env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        until(self.ready, timeout, f"noetl server on {self.url} to be ready")
        return self

    def ready(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, \
            f"noetl server exited ({self.proc and self.proc.returncode}):\n{self.logs()[-3000:]}"
        try:
            return httpx.get(self.url + "/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30, *, group: bool = True) -> int | None:
        """Send `sig` to the process group (or the server alone), wait for the exit and return its status. A
        server still running after `timeout` is SIGKILLed with its group and fails the test: a stop that
        hangs is a fault."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            (os.killpg if group else os.kill)(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise AssertionError(f"noetl server did not end within {timeout}s of signal {sig}:\n"
                                     f"{self.logs()[-3000:]}") from None
        return self.proc.returncode

    def kill(self) -> None:
        """A crash: SIGKILL to the whole group, nothing gets to clean up."""
        self.stop(signal.SIGKILL)

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
