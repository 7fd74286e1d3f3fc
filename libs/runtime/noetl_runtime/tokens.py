"""API tokens: opaque bearer secrets, shown once, stored only as a SHA-256 hash (docs/security.md "Tokens").

    token  = "noetl_" + secrets.token_urlsafe(32)      (256 random bits; the prefix makes leaks greppable)
    stored = sha256(token) hex, name, role, created_at, expires_at (None: never), revoked_at, created_by

A fast hash is enough: the secret is 256 random bits, not a password, so there is nothing to brute-force
that a slow hash would protect. The public `id` of a token is the first 12 hex digits of its hash: it names
a token in `noetl token list` and in logs without revealing anything about the token itself.

Two stores with the same behaviour: `SqliteTokens` (embedded mode, a table in the SQLite store) and
`PostgresTokens` (a cluster: the `api_token` table of migration 0005).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

PREFIX = "noetl_"
# token_urlsafe(32) is 43 characters of the URL-safe base64 alphabet
TOKEN_FORMAT = re.compile(r"^noetl_[A-Za-z0-9_\-]{43}$")
NAME_FORMAT = re.compile(r"^[A-Za-z0-9_.@\-]{1,100}$")


@dataclass(frozen=True)
class TokenRecord:
    id: str                       # first 12 hex digits of the hash: a public name for the token
    name: str
    role: str
    created_at: float
    expires_at: float | None      # None: never expires
    revoked_at: float | None = None
    created_by: str | None = None

    def active(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


class TokenStore(Protocol):
    async def create(self, name: str, role: str, expires_at: float | None,
                     created_by: str | None = None) -> tuple[str, TokenRecord]: ...
    async def lookup(self, token: str) -> TokenRecord | None: ...
    async def list(self) -> list[TokenRecord]: ...
    async def revoke(self, name_or_id: str) -> bool: ...


def new_token() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def well_formed(token: str) -> bool:
    return bool(TOKEN_FORMAT.match(token))


def check_new(name: str, role: str, expires_at: float | None, now: float) -> None:
    """The rules for a new token, the same in both stores (ValueError with the reason)."""
    from noetl_runtime.auth import ROLES   # the role names live with the route table

    if not NAME_FORMAT.match(name):
        raise ValueError(f"token name {name!r}: use 1-100 letters, digits and . _ - @")
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    if expires_at is not None and expires_at <= now:
        raise ValueError("the expiry is in the past")


def _same(stored_hash: str, token: str) -> bool:
    # The row was found by its hash, so this cannot fail for a real match; compare in constant time anyway
    # so no code path ever compares token material with `==`.
    return hmac.compare_digest(stored_hash, token_hash(token))


# ----------------------------------------------------------------------------------------------------- SQLite
_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_tokens (
    token_hash  TEXT PRIMARY KEY,       -- sha256 of the token, hex; the token itself is never stored
    name        TEXT NOT NULL UNIQUE,
    role        TEXT NOT NULL,
    created_at  REAL NOT NULL,
    expires_at  REAL,                   -- NULL: never
    revoked_at  REAL,
    created_by  TEXT
);
"""
_COLUMNS = "token_hash, name, role, created_at, expires_at, revoked_at, created_by"


def _record(row: Any) -> TokenRecord:
    h, name, role, created, expires, revoked, by = tuple(row)
    return TokenRecord(id=h[:12], name=name, role=role, created_at=created, expires_at=expires,
                       revoked_at=revoked, created_by=by)


class SqliteTokens:
    """The token table of an embedded store (`SqliteStore`), on the store's connection and lock."""

    def __init__(self, store: Any, clock: Any = time.time) -> None:
        self._s = store
        self._clock = clock
        with store._tx() as db:
            db.execute(_SQLITE_SCHEMA)

    async def create(self, name: str, role: str, expires_at: float | None,
                     created_by: str | None = None) -> tuple[str, TokenRecord]:
        now = self._clock()
        check_new(name, role, expires_at, now)
        token = new_token()
        h = token_hash(token)
        import sqlite3

        try:
            with self._s._tx() as db:
                db.execute(f"INSERT INTO api_tokens ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, NULL, ?)",
                           (h, name, role, now, expires_at, created_by))
        except sqlite3.IntegrityError:
            raise ValueError(f"a token named {name!r} exists already (names are never reused)") from None
        return token, TokenRecord(h[:12], name, role, now, expires_at, None, created_by)

    async def lookup(self, token: str) -> TokenRecord | None:
        rows = self._s._query(f"SELECT {_COLUMNS} FROM api_tokens WHERE token_hash = ?", (token_hash(token),))
        return _record(rows[0]) if rows and _same(rows[0][0], token) else None

    async def list(self) -> list[TokenRecord]:
        return [_record(r) for r in self._s._query(f"SELECT {_COLUMNS} FROM api_tokens ORDER BY created_at")]

    async def revoke(self, name_or_id: str) -> bool:
        with self._s._tx() as db:
            return db.execute("UPDATE api_tokens SET revoked_at = ? WHERE revoked_at IS NULL AND"
                              " (name = ? OR substr(token_hash, 1, 12) = ?)",
                              (self._clock(), name_or_id, name_or_id)).rowcount > 0


# --------------------------------------------------------------------------------------------------- Postgres
class PostgresTokens:
    """The `api_token` table of a cluster's schema (migration 0005)."""

    def __init__(self, pool: Any, schema: str = "noetl", clock: Any = time.time) -> None:
        from noetl_runtime.postgres_schema import qualify

        self.pool = pool
        self._clock = clock
        q = qualify(schema)
        cols = ("token_hash, name, role, extract(epoch FROM created_at)::float8,"
                " extract(epoch FROM expires_at)::float8, extract(epoch FROM revoked_at)::float8, created_by")
        self._sql_insert = (f"INSERT INTO {q}.api_token (token_hash, name, role, created_at, expires_at, created_by)"
                            f" VALUES ($1, $2, $3, to_timestamp($4), to_timestamp($5), $6)")
        self._sql_lookup = f"SELECT {cols} FROM {q}.api_token WHERE token_hash = $1"
        self._sql_list = f"SELECT {cols} FROM {q}.api_token ORDER BY created_at"
        self._sql_revoke = (f"UPDATE {q}.api_token SET revoked_at = now() WHERE revoked_at IS NULL AND"
                            f" (name = $1 OR left(token_hash, 12) = $1)")

    async def create(self, name: str, role: str, expires_at: float | None,
                     created_by: str | None = None) -> tuple[str, TokenRecord]:
        import asyncpg

        now = self._clock()
        check_new(name, role, expires_at, now)
        token = new_token()
        h = token_hash(token)
        try:
            await self.pool.execute(self._sql_insert, h, name, role, now, expires_at, created_by)
        except asyncpg.UniqueViolationError:
            raise ValueError(f"a token named {name!r} exists already (names are never reused)") from None
        return token, TokenRecord(h[:12], name, role, now, expires_at, None, created_by)

    async def lookup(self, token: str) -> TokenRecord | None:
        row = await self.pool.fetchrow(self._sql_lookup, token_hash(token))
        return _record(row) if row is not None and _same(row[0], token) else None

    async def list(self) -> list[TokenRecord]:
        return [_record(r) for r in await self.pool.fetch(self._sql_list)]

    async def revoke(self, name_or_id: str) -> bool:
        return await self.pool.execute(self._sql_revoke, name_or_id) != "UPDATE 0"


# ------------------------------------------------------------------------------------------ the local admin
ADMIN_TOKEN_FILE = "admin.token"
LOCAL_ADMIN_SECONDS = 365 * 86400


def local_token_file(store_path: str | Path | None = None) -> Path:
    """`admin.token` beside a store (default: beside NOETL_STORE, else ~/.noetl/noetl.db)."""
    from noetl_runtime.sqlite_store import DEFAULT_PATH

    path = Path(store_path or os.environ.get("NOETL_STORE") or DEFAULT_PATH).expanduser()
    return path.parent / ADMIN_TOKEN_FILE


async def ensure_local_admin(store: TokenStore, path: Path, now: float) -> TokenRecord | None:
    """`noetl server`'s first start: when the token in `path` is not an active admin token of `store` and
    the store has no active admin token at all (a new store, or the local one expired), create one (a year)
    and write it to `path`, mode 0600. Returns the record created, or None when nothing was needed. An
    installation whose admin revoked the local token but keeps another admin token is left alone."""
    if path.is_file():
        current = await store.lookup(path.read_text(encoding="utf-8", errors="replace").strip())
        if current is not None and current.role == "admin" and current.active(now):
            return None
    records = await store.list()
    if any(r.role == "admin" and r.active(now) for r in records):
        return None
    taken = {r.name for r in records}
    name = "local-admin" if "local-admin" not in taken else f"local-admin-{int(now)}"
    token, record = await store.create(name, "admin", now + LOCAL_ADMIN_SECONDS, created_by="noetl server")
    write_secret(path, token + "\n")
    return record


def write_secret(path: Path, text: str) -> None:
    """Write a file only its owner can read (0600), atomically (a reader sees the old or the new file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)   # whatever the umask was
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(temporary, path)
