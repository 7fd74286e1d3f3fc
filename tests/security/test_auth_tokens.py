"""API tokens: shown once, stored hashed, expiring, revocable; hostile credentials get 401, never a 500.

The stores are real (SQLite here; Postgres when NOETL_TEST_PG_DSN is set), and the requests go through the
real middleware of the real `noetl server` app over ASGI: raw ASGI messages where a client library would
refuse to send the header (NUL, invalid UTF-8).
"""
from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from noetl_runtime.auth import Authenticator, AuthSettings, check_bind
from noetl_runtime.sqlite_store import SqliteStore
from noetl_runtime.tokens import SqliteTokens, ensure_local_admin, well_formed


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "noetl.db")
    yield s
    s.close()


def server_app(store: SqliteStore, auth: Authenticator) -> Any:
    from noetl_cli.server import build_app
    from noetl_embedded.runtime import EmbeddedRuntime

    return build_app(store, EmbeddedRuntime(store), auth=auth)


async def get(app: Any, token: str, path: str = "/api/executions") -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
        return await client.get(path, headers={"Authorization": f"Bearer {token}"})


async def raw(app: Any, headers: list[tuple[bytes, bytes]], method: str = "GET",
              path: str = "/api/executions") -> tuple[int, bytes]:
    """One request as raw ASGI messages: header bytes exactly as given."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": headers,
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8080)}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


# ------------------------------------------------------------------------------------------------- the store
async def test_a_token_is_shown_once_and_stored_only_as_its_hash(store: SqliteStore, tmp_path: Path) -> None:
    tokens = SqliteTokens(store)
    token, record = await tokens.create("ci", "operator", time.time() + 60)
    assert well_formed(token) and len(token) == len("noetl_") + 43
    assert record.id == hashlib.sha256(token.encode()).hexdigest()[:12]
    listed = await tokens.list()
    assert [(r.name, r.role) for r in listed] == [("ci", "operator")]
    assert token not in repr(listed)
    store.close()
    on_disk = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("noetl.db"))
    assert token.encode() not in on_disk and token[6:].encode() not in on_disk
    assert hashlib.sha256(token.encode()).hexdigest().encode() in on_disk


async def test_new_token_rules(store: SqliteStore) -> None:
    tokens = SqliteTokens(store)
    now = time.time()
    for name, role, expires in (("ok", "root", now + 60), ("", "viewer", now + 60), ("a b", "viewer", now + 60),
                                ("x" * 101, "viewer", now + 60), ("past", "viewer", now - 1)):
        with pytest.raises(ValueError):
            await tokens.create(name, role, expires)
    await tokens.create("once", "viewer", None)
    with pytest.raises(ValueError, match="exists already"):
        await tokens.create("once", "admin", None)
    assert [r.role for r in await tokens.list()] == ["viewer"]


async def test_expired_and_revoked_tokens_get_401(store: SqliteStore) -> None:
    tokens = SqliteTokens(store)
    now = time.time()
    short, _ = await tokens.create("short", "viewer", now + 30)
    kept, record = await tokens.create("kept", "viewer", None)
    app = server_app(store, Authenticator(tokens))
    assert (await get(app, short)).status_code == 200
    later = server_app(store, Authenticator(tokens, clock=lambda: now + 31))   # the same store, 31 s on
    expired = await get(later, short)
    assert expired.status_code == 401 and "expired" in expired.json()["detail"]
    assert (await get(later, kept)).status_code == 200
    assert await tokens.revoke(record.id)                     # by id; by name works too
    revoked = await get(app, kept)
    assert revoked.status_code == 401 and "revoked" in revoked.json()["detail"]
    assert not await tokens.revoke("kept")                    # already revoked
    assert (await get(app, "noetl_" + "A" * 43)).status_code == 401   # well formed, unknown


async def test_hostile_credentials_get_401_never_500(store: SqliteStore) -> None:
    tokens = SqliteTokens(store)
    good, _ = await tokens.create("good", "admin", None)
    app = server_app(store, Authenticator(tokens))
    hostile = [
        b"Bearer " + b"A" * 1_000_000,                        # huge
        b"Bearer " + good.encode()[:20] + b"\x00" + good.encode()[20:],   # NUL inside a real token
        b"Bearer " + good.encode() + b"\x00",
        "Bearer noetl_ünïcødé✓✓✓".encode(),                   # UTF-8
        b"Bearer \xff\xfe\xfd",                               # not UTF-8 at all
        b"Bearer " + good.encode().upper(),                   # close, but not the token
        good.encode(),                                        # no scheme
        b"Basic " + good.encode(),                            # another scheme
        b"Bearer",                                            # nothing
        b"Bearer a.b.c",                                      # a JWT shape without OIDC configured
        b"bearer    ",
        b"\x00" * 100,
    ]
    for value in hostile:
        status, body = await raw(app, [(b"host", b"127.0.0.1"), (b"authorization", value)])
        assert status == 401, (value[:40], status, body[:200])
        assert good.encode() not in body
    # two Authorization headers, one of them valid: refused, never "the first one wins"
    status, _ = await raw(app, [(b"authorization", b"Bearer " + good.encode()), (b"authorization", b"Bearer x")])
    assert status == 401
    status, _ = await raw(app, [(b"authorization", b"Bearer " + good.encode())])
    assert status == 200


def test_auth_off_is_refused_beyond_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    off = AuthSettings(auth="off")
    for host in ("127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"):
        check_bind(host, off)
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.com", ""):
        with pytest.raises(ValueError, match="NOETL_AUTH=off"):
            check_bind(host, off)
    check_bind("0.0.0.0", AuthSettings())                    # on: any address
    monkeypatch.setenv("NOETL_AUTH", "OFF")
    assert AuthSettings().auth == "off"
    monkeypatch.setenv("NOETL_AUTH", "maybe")
    with pytest.raises(ValueError):
        AuthSettings()


async def test_auth_off_lets_anonymous_callers_in_as_admin(store: SqliteStore) -> None:
    app = server_app(store, Authenticator(SqliteTokens(store), settings=AuthSettings(auth="off")))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
        assert (await client.get("/api/credentials")).status_code == 200


# --------------------------------------------------------------------------------------------- local admin
async def test_the_local_admin_token_is_created_once_0600_and_renewed_only_when_no_admin_is_left(
        store: SqliteStore, tmp_path: Path) -> None:
    tokens = SqliteTokens(store)
    path = tmp_path / "admin.token"
    now = time.time()
    created = await ensure_local_admin(tokens, path, now)
    assert created is not None and created.role == "admin" and created.name == "local-admin"
    assert path.stat().st_mode & 0o777 == 0o600
    first = path.read_text().strip()
    assert (await tokens.lookup(first)) is not None
    assert await ensure_local_admin(tokens, path, now + 10) is None          # a restart keeps it
    assert path.read_text().strip() == first
    # revoked while another admin token exists: left alone (the operator meant it)
    await tokens.create("ops-admin", "admin", None)
    await tokens.revoke("local-admin")
    assert await ensure_local_admin(tokens, path, now + 20) is None
    # no active admin token at all (the other one revoked too): a new local one
    await tokens.revoke("ops-admin")
    renewed = await ensure_local_admin(tokens, path, now + 30)
    assert renewed is not None and renewed.name != "local-admin"
    assert path.read_text().strip() != first and path.stat().st_mode & 0o777 == 0o600


# ---------------------------------------------------------------------------------------------- Postgres
@pytest.fixture
async def pg_pool() -> AsyncIterator[tuple[Any, str]]:
    dsn = os.environ.get("NOETL_TEST_PG_DSN")
    if not dsn:
        pytest.skip("NOETL_TEST_PG_DSN is not set (scripts/pg-start.sh)")
    import asyncpg

    from noetl_runtime.postgres_store import ensure_schema

    schema = f"auth_{uuid.uuid4().hex[:10]}"
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    await ensure_schema(pool, schema)
    try:
        yield pool, schema
    finally:
        await pool.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await pool.close()


@pytest.mark.postgres
async def test_postgres_tokens_behave_like_sqlite_ones(pg_pool: tuple[Any, str]) -> None:
    from noetl_runtime.tokens import PostgresTokens

    pool, schema = pg_pool
    tokens = PostgresTokens(pool, schema)
    token, record = await tokens.create("pg", "author", time.time() + 60, created_by="test")
    found = await tokens.lookup(token)
    assert found is not None and (found.name, found.role, found.created_by) == ("pg", "author", "test")
    assert found.expires_at == pytest.approx(record.expires_at, abs=1e-3)
    with pytest.raises(ValueError, match="exists already"):
        await tokens.create("pg", "viewer", None)
    stored = await pool.fetch(f'SELECT * FROM "{schema}".api_token')
    assert token not in repr(stored) and stored[0]["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    auth = Authenticator(tokens)
    assert (await auth.authenticate(f"Bearer {token}")).name == "token:pg"
    assert await tokens.revoke("pg") and not await tokens.revoke("pg")
    assert (await tokens.lookup(token)).revoked_at is not None
    with pytest.raises(Exception, match="revoked"):
        await auth.authenticate(f"Bearer {token}")


def test_the_cli_sends_its_token_and_the_local_admin_token_only_to_loopback(tmp_path: Path) -> None:
    from noetl_cli.remote import api_token

    (tmp_path / "admin.token").write_text("noetl_local\n")
    env = {"NOETL_STORE": str(tmp_path / "noetl.db")}
    for url in ("http://127.0.0.1:8080", "http://localhost:1", "http://[::1]:8080/"):
        assert api_token(url, env) == "noetl_local", url
    for url in ("http://10.0.0.5:8080", "https://noetl.example.com", "http://127.0.0.1.nip.io:80", "nonsense"):
        assert api_token(url, env) is None, url
    assert api_token("https://noetl.example.com", {**env, "NOETL_API_TOKEN": " noetl_env "}) == "noetl_env"
    assert api_token("http://127.0.0.1:1", {"NOETL_STORE": str(tmp_path / "elsewhere" / "x.db")}) is None


def test_the_token_command_refuses_bad_input_clearly(tmp_path: Path) -> None:
    import subprocess
    import sys

    noetl = str(Path(sys.executable).with_name("noetl"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOETL_")}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([noetl, "token", *args, "--store", str(tmp_path / "t.db")], capture_output=True,
                              text=True, timeout=60, env=env)
    for args, message in ((["create", "--name", "a", "--role", "root"], "unknown role"),
                          (["create", "--name", "a", "--role", "viewer", "--expires", "5x"], "--expires"),
                          (["create", "--name", "a", "--role", "viewer", "--expires", "0d"], "--expires"),
                          (["create", "--name", "../a\nb", "--role", "viewer"], "token name"),
                          (["create", "--name", "ü" * 300, "--role", "viewer"], "token name")):
        done = run(*args)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, (args, done)
        assert done.stdout == ""
    missing = run("revoke", "nobody")
    assert missing.returncode == 1 and "no active token" in missing.stderr
    pg = subprocess.run([noetl, "token", "list", "--postgres"], capture_output=True, text=True, timeout=60,
                        env={**env, "NOETL_DATABASE_URL": "postgresql://nobody@127.0.0.1:9/none"})
    assert pg.returncode == 2 and "Traceback" not in pg.stderr


async def test_a_token_store_that_cannot_be_read_is_503_not_500(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "noetl.db")
    tokens = SqliteTokens(store)
    token, _ = await tokens.create("t", "viewer", None)
    app = server_app(store, Authenticator(tokens))
    assert (await get(app, token)).status_code == 200
    store.close()                                   # the database goes away under the running app
    answer = await get(app, token)
    assert answer.status_code == 503 and "token store" in answer.json()["detail"]
