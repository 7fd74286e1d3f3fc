"""SQLite persistence for embedded mode: catalog, credentials, the event log and execution snapshots.

One file (default `~/.noetl/noetl.db`), WAL journal with synchronous=NORMAL: a commit is durable against
a process crash, and at worst loses the last transactions on a power cut, never corrupts. The engine writes
each fold batch (events + state snapshots) in one transaction with `commit_batch`, so after a restart the
snapshots and the log always agree.

The methods are `async` to satisfy the ports; the queries are short and run inline on one connection
guarded by a lock (sqlite3 releases the GIL, and WAL lets other processes read meanwhile).
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator, Mapping, Sequence

from cryptography.fernet import Fernet
from pydantic import BaseModel

from noetl_common.messages import TERMINAL_EVENTS, DeadLetter, Event
from noetl_common.state import ExecutionState
from noetl_common.ports import CatalogEntry, Claim, Credential
from noetl_common.refusals import Conflict
from noetl_runtime import secret_key

DEFAULT_PATH = Path("~/.noetl/noetl.db")
SCHEMA_VERSION = 3   # 2: the idempotency table; 3: state_playbooks (snapshots without their playbook)

_TERMINAL_STATUS = {
    "execution_complete": "COMPLETED",
    "execution_failed": "FAILED",
    "execution_cancelled": "CANCELLED",
}
_TERMINAL_SQL = ",".join(f"'{t}'" for t in TERMINAL_EVENTS)
# A snapshot to save: whole, or as ExecutionState.snapshot_parts (the playbook member is then kept once).
Snapshot = bytes | tuple[bytes, bytes]
_LOAD_STATES = ("SELECT s.execution_id, s.snapshot, p.playbook FROM states s"
                " LEFT JOIN state_playbooks p ON p.execution_id = s.execution_id")

# The events the logs API lists (noetl_common.attempt_logs.is_attempt_log, in SQL): every failed attempt, and
# the completed attempts that printed something. Queries repeat it verbatim so SQLite uses the partial index.
LOG_EVENTS_SQL = ("(event_type = 'action_error' OR (event_type IN ('action_completed', 'iteration_completed')"
                  " AND COALESCE(json_extract(body, '$.meta.log'), '') <> ''))")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS catalog (
    path        TEXT NOT NULL,
    version     INTEGER NOT NULL,
    content     TEXT NOT NULL,
    document    TEXT NOT NULL,
    created_at  REAL NOT NULL,
    registered_by TEXT,                 -- the principal that registered it (docs/security.md)
    PRIMARY KEY (path, version)
);
CREATE TABLE IF NOT EXISTS credentials (
    name        TEXT PRIMARY KEY,
    type        TEXT NOT NULL,
    description TEXT,
    secret      BLOB NOT NULL,          -- Fernet token of the JSON data, never the clear text
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    event_id     TEXT PRIMARY KEY,
    execution_id TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    event_type   TEXT NOT NULL,
    node_name    TEXT NOT NULL,
    status       TEXT NOT NULL,
    timestamp    TEXT NOT NULL,
    body         TEXT NOT NULL          -- the full event as JSON
);
CREATE INDEX IF NOT EXISTS events_by_execution ON events (execution_id, seq);
-- step output (GET /api/executions/{id}/logs): the events that end an attempt with output or an error, with
-- what the filters read (the same expressions as noetl_query.sqlite_reads), so a count or a filter reads no body
CREATE INDEX IF NOT EXISTS events_attempt_log ON events (execution_id, timestamp, seq, node_name,
    json_extract(body, '$.attempt'), json_extract(body, '$.current_index')) WHERE {log_events};
CREATE TABLE IF NOT EXISTS states (
    execution_id TEXT PRIMARY KEY,
    snapshot     BLOB NOT NULL,
    terminal     INTEGER NOT NULL DEFAULT 0,
    updated_at   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS states_active ON states (terminal);
-- The playbook member of an execution's snapshots, once: with a row here, states.snapshot is the snapshot
-- without it (ExecutionState.snapshot_parts). The document never changes after start, and writing it again
-- in every snapshot (one per fold batch, about one per step) was half of each one's bytes.
CREATE TABLE IF NOT EXISTS state_playbooks (
    execution_id TEXT PRIMARY KEY,
    playbook     BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (   -- messages the fold could not use (embedded mode's noetl.dlq)
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    execution_id TEXT,                    -- the message's key: its execution, when it had one
    source       TEXT NOT NULL,           -- inbound | commands | states (a snapshot read at resume)
    value        BLOB NOT NULL,           -- the original bytes
    reason       TEXT NOT NULL,
    time         REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS executions (   -- read model, maintained from the events in the same transaction
    execution_id        TEXT PRIMARY KEY,
    parent_execution_id TEXT,
    path                TEXT,
    status              TEXT NOT NULL DEFAULT 'PENDING',
    start_time          TEXT,
    end_time            TEXT,
    error               TEXT
);
CREATE TABLE IF NOT EXISTS idempotency (   -- submissions with an Idempotency-Key or a client-chosen id
    scope        TEXT PRIMARY KEY,      -- "key:<Idempotency-Key>" or "id:<execution_id>"
    request_hash TEXT NOT NULL,         -- sha256 of the canonical request: a reuse with another body is a 409
    execution_id TEXT NOT NULL UNIQUE,  -- one scope per execution: a second one naming it is a 409
    request      TEXT NOT NULL,         -- JSON: what a re-send of the start is rebuilt from
    answer       TEXT NOT NULL,         -- JSON: the answer a retry gets again
    created_at   REAL NOT NULL          -- the start's `time`
);
""".replace("{log_events}", LOG_EVENTS_SQL)


def _private_file(path: Path) -> None:
    """The store readable by its owner only (0600; its folder 0700 when we create it), so step code running
    as another user (docs/security.md) cannot read the catalog, the events or the encrypted credentials.
    SQLite gives its -wal and -shm files the database file's mode; older ones are narrowed too."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for each in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            if each.stat().st_mode & 0o077:
                each.chmod(0o600)
        except FileNotFoundError:
            pass


class ExecutionSummary(BaseModel):
    execution_id: str
    parent_execution_id: str | None = None
    path: str | None = None
    status: str                      # PENDING | RUNNING | COMPLETED | FAILED | CANCELLED (DSL §7)
    start_time: str | None = None    # ISO-8601 UTC of execution_start
    end_time: str | None = None      # ISO-8601 UTC of the terminal event
    error: str | None = None


class SqliteStore:
    """CatalogPort + CredentialPort + the embedded engine's event log and state snapshots, in one file.

    The two ports both name methods `get` and `list`, so one object cannot be both: `store.catalog` is the
    CatalogPort and `store.credentials` the CredentialPort, sharing this store's connection.
    """

    def __init__(self, path: str | Path | None = None, *, key: bytes | None = None) -> None:
        self.path = Path(path).expanduser() if path is not None else DEFAULT_PATH.expanduser()
        _private_file(self.path)
        self._key = key
        self._fernet: Fernet | None = None
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._lock:   # executescript commits first, so the script brings its own transaction
            self._db.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}PRAGMA user_version={SCHEMA_VERSION};COMMIT;")
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(catalog)")}
            if "registered_by" not in columns:   # a store from before authentication
                self._db.execute("ALTER TABLE catalog ADD COLUMN registered_by TEXT")
        self.catalog = SqliteCatalog(self)
        self.credentials = SqliteCredentials(self)
        self.idempotency = SqliteIdempotency(self)

    # ----------------------------------------------------------------------------------------- plumbing
    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes the write lock up front (no upgrade deadlocks)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    def _crypto(self) -> Fernet:
        # Resolved lazily: a store used only for events never creates a key file.
        if self._fernet is None:
            self._fernet = Fernet(self._key) if self._key else secret_key.fernet(self.path.parent)
        return self._fernet

    def close(self) -> None:
        with self._lock:
            self._db.close()

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> "SqliteStore":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------- event log and snapshots
    async def append_events(self, events: Iterable[Event]) -> int:
        """Append events, ignoring ids already stored; returns how many were new."""
        with self._tx() as db:
            return self._insert_events(db, events)

    async def save_states(self, states: Mapping[str, Snapshot], terminal: Collection[str] = ()) -> None:
        """Upsert opaque snapshots. An execution is flagged terminal (for good) when its id is in `terminal`
        or its log holds a terminal event; `load_states()` skips terminal ones."""
        with self._tx() as db:
            self._upsert_states(db, states, terminal)

    async def commit_batch(self, events: Iterable[Event], states: Mapping[str, Snapshot],
                           terminal: Collection[str] = ()) -> int:
        """Append events and save snapshots in ONE transaction: either all of it is stored or none."""
        return self.commit_batch_sync(events, states, terminal)

    def commit_batch_sync(self, events: Iterable[Event], states: Mapping[str, Snapshot],
                          terminal: Collection[str] = (), *, bodies: Sequence[bytes] | None = None,
                          dead_letters: Iterable[DeadLetter] = ()) -> int:
        """commit_batch for callers that run it in a thread of their own (the embedded fold loop). `bodies`:
        the events already encoded (the batch fold encodes every effect), in the same order; `dead_letters`
        are written in the same transaction."""
        with self._tx() as db:
            added = self._insert_events(db, events, bodies)
            self._upsert_states(db, states, terminal)
            for letter in dead_letters:
                key = letter.original_key()
                db.execute("INSERT INTO dead_letters (execution_id, source, value, reason, time) VALUES (?, ?, ?, ?, ?)",
                           (key.decode("utf-8", "replace") if key is not None else None, letter.source_topic or "inbound",
                            letter.original_value(), letter.reason, letter.time))
            return added

    def dead_letters(self, limit: int = 1000) -> list[tuple[str | None, bytes, str]]:
        """The dead letters, oldest first: (execution id or None, the original bytes, the reason)."""
        rows = self._query("SELECT execution_id, value, reason FROM dead_letters ORDER BY id LIMIT ?", (limit,))
        return [(eid, bytes(value), reason) for eid, value, reason in rows]

    def load_state_sync(self, execution_id: str) -> bytes | None:
        """The execution's last snapshot, whole (`ExecutionState.from_bytes` reads it)."""
        rows = self._query(_LOAD_STATES + " WHERE s.execution_id = ?", (execution_id,))
        return _whole(rows[0][1], rows[0][2]) if rows else None

    async def events(self, execution_id: str, after_seq: int = -1) -> list[Event]:
        """The execution's log in seq order (only events with seq > after_seq)."""
        rows = self._query("SELECT body FROM events WHERE execution_id = ? AND seq > ? ORDER BY seq",
                           (execution_id, after_seq))
        return [Event.model_validate_json(body) for (body,) in rows]

    async def load_state(self, execution_id: str) -> bytes | None:
        return self.load_state_sync(execution_id)

    async def load_states(self, active_only: bool = True) -> dict[str, bytes]:
        sql = _LOAD_STATES + (" WHERE s.terminal = 0" if active_only else "")
        return {eid: _whole(snap, playbook) for eid, snap, playbook in self._query(sql)}

    async def executions(self, execution_id: str | None = None, limit: int | None = None) -> list[ExecutionSummary]:
        """Summaries, newest start first (or the one asked for)."""
        sql = "SELECT execution_id, parent_execution_id, path, status, start_time, end_time, error FROM executions"
        args: list[Any] = []
        if execution_id is not None:
            sql += " WHERE execution_id = ?"
            args.append(execution_id)
        sql += " ORDER BY start_time IS NULL, start_time DESC, rowid DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        cols = ExecutionSummary.model_fields.keys()
        return [ExecutionSummary(**dict(zip(cols, row))) for row in self._query(sql, args)]

    @staticmethod
    def _insert_events(db: sqlite3.Connection, events: Iterable[Event], bodies: Sequence[bytes] | None = None) -> int:
        added = 0
        for i, ev in enumerate(events):
            body = bodies[i].decode() if bodies is not None else ev.model_dump_json()
            cur = db.execute(
                "INSERT OR IGNORE INTO events (event_id, execution_id, seq, event_type, node_name, status,"
                " timestamp, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (ev.event_id, ev.execution_id, ev.seq, ev.event_type, ev.node_name, ev.status, ev.timestamp,
                 body))
            if cur.rowcount:            # a duplicate changes neither the log nor the read model
                added += 1
                _project(db, ev)
        return added

    @staticmethod
    def _upsert_states(db: sqlite3.Connection, states: Mapping[str, Snapshot], terminal: Collection[str]) -> None:
        now = time.time()
        for eid, snapshot in states.items():
            if isinstance(snapshot, tuple):
                snapshot, playbook = snapshot
                db.execute("INSERT INTO state_playbooks (execution_id, playbook) VALUES (?1, ?2) ON CONFLICT"
                           " (execution_id) DO UPDATE SET playbook = excluded.playbook"
                           " WHERE state_playbooks.playbook IS NOT excluded.playbook", (eid, playbook))
            else:   # a whole snapshot: nothing may be joined to it when it is read
                db.execute("DELETE FROM state_playbooks WHERE execution_id = ?", (eid,))
            db.execute(
                "INSERT INTO states (execution_id, snapshot, terminal, updated_at) VALUES (?1, ?2,"
                f" ?3 OR EXISTS (SELECT 1 FROM events WHERE execution_id = ?1 AND event_type IN ({_TERMINAL_SQL})),"
                " ?4) ON CONFLICT (execution_id) DO UPDATE SET snapshot = excluded.snapshot,"
                " terminal = MAX(states.terminal, excluded.terminal), updated_at = excluded.updated_at",
                (eid, snapshot, eid in terminal, now))


def _whole(snapshot: bytes, playbook: bytes | None) -> bytes:
    """A stored snapshot, whole again (a store written before state_playbooks holds whole ones only)."""
    return ExecutionState.join_snapshot(bytes(snapshot), bytes(playbook)) if playbook is not None else bytes(snapshot)


def _project(db: sqlite3.Connection, ev: Event) -> None:
    """Fold one new event into the `executions` read model (DSL §7: status derives from the events)."""
    db.execute("INSERT OR IGNORE INTO executions (execution_id, parent_execution_id) VALUES (?, ?)",
               (ev.execution_id, ev.parent_execution_id))
    if ev.event_type == "execution_start":
        path = (ev.meta or {}).get("path")
        db.execute("UPDATE executions SET path = COALESCE(?, path), start_time = ?,"
                   " parent_execution_id = COALESCE(?, parent_execution_id) WHERE execution_id = ?",
                   (path, ev.timestamp, ev.parent_execution_id, ev.execution_id))
    elif ev.event_type == "step_started":
        db.execute("UPDATE executions SET status = 'RUNNING' WHERE execution_id = ? AND status = 'PENDING'",
                   (ev.execution_id,))
    elif ev.event_type in _TERMINAL_STATUS:
        db.execute("UPDATE executions SET status = ?, end_time = ?, error = ? WHERE execution_id = ?",
                   (_TERMINAL_STATUS[ev.event_type], ev.timestamp, ev.error, ev.execution_id))


def _entry(row: tuple[Any, ...]) -> CatalogEntry:
    path, version, content, document, created_at, registered_by = row
    return CatalogEntry(path=path, version=version, content=content, document=json.loads(document),
                        created_at=created_at, registered_by=registered_by)


class SqliteCatalog:
    """CatalogPort: every registration of a path gets the next version (max + 1)."""

    def __init__(self, store: SqliteStore) -> None:
        self._s = store

    async def register(self, content: str, document: dict[str, Any], path: str,
                       registered_by: str | None = None) -> CatalogEntry:
        now = time.time()
        with self._s._tx() as db:
            (current,) = db.execute("SELECT COALESCE(MAX(version), 0) FROM catalog WHERE path = ?", (path,)).fetchone()
            version = current + 1
            db.execute("INSERT INTO catalog (path, version, content, document, created_at, registered_by)"
                       " VALUES (?, ?, ?, ?, ?, ?)", (path, version, content, json.dumps(document), now, registered_by))
        return CatalogEntry(path=path, version=version, content=content, document=document, created_at=now,
                            registered_by=registered_by)

    async def get(self, path: str, version: int | None = None) -> CatalogEntry | None:
        """The given version, or the latest when `version` is None."""
        sql = "SELECT path, version, content, document, created_at, registered_by FROM catalog WHERE path = ?"
        if version is None:
            rows = self._s._query(sql + " ORDER BY version DESC LIMIT 1", (path,))
        else:
            rows = self._s._query(sql + " AND version = ?", (path, version))
        return _entry(rows[0]) if rows else None

    async def list(self) -> list[CatalogEntry]:
        """Every registered version, by path then version."""
        rows = self._s._query("SELECT path, version, content, document, created_at, registered_by FROM catalog"
                              " ORDER BY path, version")
        return [_entry(r) for r in rows]


class SqliteCredentials:
    """CredentialPort: `data` is stored only as a Fernet token (see `secret_key`)."""

    def __init__(self, store: SqliteStore) -> None:
        self._s = store

    async def put(self, name: str, type: str, data: dict[str, Any], description: str | None = None) -> Credential:
        """Create or replace by name (created_at is kept on replace)."""
        now = time.time()
        token = secret_key.encrypt_json(self._s._crypto(), data)
        with self._s._tx() as db:
            db.execute(
                "INSERT INTO credentials (name, type, description, secret, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET type = excluded.type,"
                " description = excluded.description, secret = excluded.secret, updated_at = excluded.updated_at",
                (name, type, description, token, now, now))
            (created,) = db.execute("SELECT created_at FROM credentials WHERE name = ?", (name,)).fetchone()
        return Credential(name=name, type=type, data=dict(data), description=description,
                          created_at=created, updated_at=now)

    async def get(self, name: str) -> Credential | None:
        rows = self._s._query("SELECT name, type, description, secret, created_at, updated_at FROM credentials"
                              " WHERE name = ?", (name,))
        if not rows:
            return None
        n, t, d, token, c, u = rows[0]
        return Credential(name=n, type=t, data=secret_key.decrypt_json(self._s._crypto(), token), description=d,
                          created_at=c, updated_at=u)

    async def list(self) -> list[Credential]:
        """All credentials by name, with `data` emptied (nothing is decrypted)."""
        rows = self._s._query("SELECT name, type, description, created_at, updated_at FROM credentials"
                              " ORDER BY name")
        return [Credential(name=n, type=t, data={}, description=d, created_at=c, updated_at=u)
                for n, t, d, c, u in rows]

    async def delete(self, name: str) -> bool:
        with self._s._tx() as db:
            return db.execute("DELETE FROM credentials WHERE name = ?", (name,)).rowcount > 0


class SqliteIdempotency:
    """IdempotencyPort: one row per scope, kept (a retry may come after a restart, days later)."""

    def __init__(self, store: SqliteStore) -> None:
        self._s = store

    async def get(self, scope: str) -> Claim | None:
        rows = self._s._query("SELECT scope, request_hash, execution_id, request, answer, created_at"
                              " FROM idempotency WHERE scope = ?", (scope,))
        if not rows:
            return None
        scope, digest, eid, request, answer, created = rows[0]
        return Claim(scope=scope, request_hash=digest, execution_id=eid, request=json.loads(request),
                     answer=json.loads(answer), created_at=created)

    async def claim(self, claim: Claim) -> Claim | None:
        with self._s._tx() as db:
            if db.execute("SELECT 1 FROM idempotency WHERE scope = ?", (claim.scope,)).fetchone():
                existing = True
            elif db.execute("SELECT 1 FROM idempotency WHERE execution_id = ?", (claim.execution_id,)).fetchone():
                raise Conflict(f"execution_id {claim.execution_id!r} already names another execution")
            else:
                existing = False
                db.execute("INSERT INTO idempotency (scope, request_hash, execution_id, request, answer, created_at)"
                           " VALUES (?, ?, ?, ?, ?, ?)",
                           (claim.scope, claim.request_hash, claim.execution_id, json.dumps(claim.request),
                            json.dumps(claim.answer), claim.created_at))
        return await self.get(claim.scope) if existing else None
