"""Helpers shared by tests of every kind: `from support import free_port`.

Importable because pyproject's pytest settings put tests/ on sys.path (`pythonpath = ["tests"]`).
"""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Any


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
