"""Contract suite for the embedded SQLite store: a real database file in tmp_path, no mocks."""
from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from noetl_common.messages import Event
from noetl_common.state import ExecutionState
from noetl_runtime import secret_key
from noetl_runtime.sqlite_store import SqliteStore

SECRET = "s3cr3t-Pa55word-that-must-not-leak"


@pytest.fixture
def db_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv(secret_key.ENV_VAR, raising=False)
    return tmp_path / "store" / "noetl.db"


@pytest.fixture
def store(db_path: Path):
    s = SqliteStore(db_path)
    yield s
    s.close()


def ev(execution_id: str, seq: int, event_type: str, node: str = "a", status: str = "RUNNING", **kw) -> Event:
    return Event(event_id=f"{execution_id}:{seq}:{event_type}:{node}", execution_id=execution_id, seq=seq,
                 event_type=event_type, node_name=node, node_type="step", status=status,
                 timestamp=f"2024-01-01T00:00:{seq:02d}Z", time=1704067200.0 + seq, **kw)


def start(execution_id: str, path: str = "tests/hello", ts_seq: int = 0, **kw) -> Event:
    return ev(execution_id, ts_seq, "execution_start", node="hello", status="STARTED",
              meta={"path": path, "version": 1}, **kw)


# ------------------------------------------------------------------------------------------------ setup
def test_creates_parent_dirs_and_uses_wal(db_path: Path, store: SqliteStore) -> None:
    assert db_path.exists()
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_default_location_is_home_noetl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    s = SqliteStore()
    try:
        assert s.path == tmp_path / ".noetl" / "noetl.db"
        assert s.path.exists()
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------- catalog
async def test_catalog_versions_increment_per_path(store: SqliteStore) -> None:
    cat = store.catalog
    e1 = await cat.register("v: 1", {"v": 1}, "a/b")
    e2 = await cat.register("v: 2", {"v": 2}, "a/b")
    other = await cat.register("x: 1", {"x": 1}, "c")
    assert (e1.version, e2.version, other.version) == (1, 2, 1)

    latest = await cat.get("a/b")
    assert latest is not None and latest.version == 2 and latest.document == {"v": 2} and latest.content == "v: 2"
    first = await cat.get("a/b", 1)
    assert first is not None and first.document == {"v": 1}
    assert await cat.get("a/b", 3) is None
    assert await cat.get("missing") is None
    assert [(e.path, e.version) for e in await cat.list()] == [("a/b", 1), ("a/b", 2), ("c", 1)]


async def test_catalog_survives_reopen(db_path: Path) -> None:
    s = SqliteStore(db_path)
    await s.catalog.register("k: v", {"k": "v"}, "p")
    s.close()
    s = SqliteStore(db_path)
    try:
        assert (await s.catalog.register("k: w", {"k": "w"}, "p")).version == 2
    finally:
        s.close()


# ------------------------------------------------------------------------------------------ credentials
async def test_credentials_round_trip_and_upsert(store: SqliteStore) -> None:
    creds = store.credentials
    c = await creds.put("pg", "postgres", {"user": "u", "password": SECRET}, "local db")
    assert c.data["password"] == SECRET
    got = await creds.get("pg")
    assert got is not None and got.type == "postgres" and got.data == {"user": "u", "password": SECRET}
    assert got.description == "local db"

    updated = await creds.put("pg", "postgres", {"user": "u2", "password": "other"})
    assert updated.created_at == got.created_at and updated.updated_at >= got.updated_at
    got = await creds.get("pg")
    assert got is not None and got.data == {"user": "u2", "password": "other"} and got.description is None
    assert await creds.get("missing") is None


async def test_credentials_list_has_no_data(store: SqliteStore) -> None:
    await store.credentials.put("b", "bearer", {"token": SECRET})
    await store.credentials.put("a", "basic", {"username": "x", "password": SECRET})
    listed = await store.credentials.list()
    assert [(c.name, c.type, c.data) for c in listed] == [("a", "basic", {}), ("b", "bearer", {})]


async def test_credentials_delete(store: SqliteStore) -> None:
    await store.credentials.put("tok", "bearer", {"token": SECRET})
    assert await store.credentials.delete("tok") is True
    assert await store.credentials.get("tok") is None
    assert await store.credentials.delete("tok") is False
    assert await store.credentials.list() == []


async def test_credentials_encrypted_at_rest(db_path: Path) -> None:
    s = SqliteStore(db_path)
    await s.credentials.put("api", "bearer", {"token": SECRET})
    # Read the bytes before close too: with WAL the fresh rows live in the -wal file first.
    files = [p for p in db_path.parent.iterdir() if p.name.startswith(db_path.name)]
    before = b"".join(p.read_bytes() for p in files)
    s.close()
    after = db_path.read_bytes()
    for raw in (before, after):
        assert b"api" in raw                      # the row is there ...
        assert SECRET.encode() not in raw         # ... but not the secret
    key_file = db_path.parent / secret_key.KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    s = SqliteStore(db_path)                      # the same key file decrypts after a reopen
    try:
        got = await s.credentials.get("api")
        assert got is not None and got.data == {"token": SECRET}
    finally:
        s.close()


async def test_credentials_wrong_key_cannot_decrypt(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(secret_key.ENV_VAR, Fernet.generate_key().decode())
    s = SqliteStore(db_path)
    await s.credentials.put("api", "bearer", {"token": SECRET})
    s.close()
    assert not (db_path.parent / secret_key.KEY_FILE).exists()   # the env key wins; no file written
    monkeypatch.setenv(secret_key.ENV_VAR, Fernet.generate_key().decode())
    s = SqliteStore(db_path)
    try:
        with pytest.raises(secret_key.InvalidToken):
            await s.credentials.get("api")
    finally:
        s.close()


def test_secret_key_file_is_created_once(tmp_path: Path) -> None:
    k1 = secret_key.load_key(tmp_path / "d", env={})
    k2 = secret_key.load_key(tmp_path / "d", env={})
    assert k1 == k2
    assert stat.S_IMODE(os.stat(tmp_path / "d" / "secret.key").st_mode) == 0o600
    f = Fernet(k1)
    assert secret_key.decrypt_json(f, secret_key.encrypt_json(f, {"a": [1, 2]})) == {"a": [1, 2]}


def test_secret_key_env_must_be_valid(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        secret_key.load_key(tmp_path, env={secret_key.ENV_VAR: "not-a-key"})


# ----------------------------------------------------------------------------------------------- events
async def test_events_are_idempotent_by_event_id(store: SqliteStore) -> None:
    batch = [start("e1"), ev("e1", 1, "step_started"), ev("e1", 2, "action_started")]
    assert await store.append_events(batch) == 3
    assert await store.append_events(batch) == 0
    assert await store.append_events([batch[1], ev("e1", 3, "action_completed", status="COMPLETED")]) == 1
    assert [e.seq for e in await store.events("e1")] == [0, 1, 2, 3]


async def test_events_come_back_in_seq_order_and_whole(store: SqliteStore) -> None:
    e3 = ev("e1", 3, "action_completed", status="COMPLETED", result={"rows": [1, 2]}, attempt=1, duration=0.5)
    await store.append_events([e3, ev("e1", 1, "step_started"), start("e1"), ev("e1", 2, "action_started")])
    await store.append_events([ev("other", 0, "execution_start", node="x")])
    got = await store.events("e1")
    assert [e.seq for e in got] == [0, 1, 2, 3]
    assert got[3] == e3                              # every field survives
    assert [e.seq for e in await store.events("e1", after_seq=1)] == [2, 3]
    assert await store.events("nope") == []


# ----------------------------------------------------------------------------------------------- states
async def test_states_round_trip_and_active_only(store: SqliteStore) -> None:
    blob = bytes(range(256))
    await store.save_states({"a": blob, "b": b"\x00b1", "c": b"c1"}, terminal={"c"})
    await store.save_states({"b": b"b2"})
    assert await store.load_states() == {"a": blob, "b": b"b2"}
    assert await store.load_states(active_only=False) == {"a": blob, "b": b"b2", "c": b"c1"}


async def test_state_becomes_terminal_from_its_log_and_stays_terminal(store: SqliteStore) -> None:
    await store.save_states({"x": b"1"})
    await store.append_events([start("x"), ev("x", 1, "execution_complete", status="COMPLETED")])
    await store.save_states({"x": b"2"})
    assert await store.load_states() == {}
    await store.save_states({"x": b"3"})
    assert await store.load_states(active_only=False) == {"x": b"3"}
    assert await store.load_states() == {}


async def test_states_survive_reopen(db_path: Path) -> None:
    s = SqliteStore(db_path)
    await s.commit_batch([start("r")], {"r": b"snap"})
    s.close()
    s = SqliteStore(db_path)
    try:
        assert await s.load_states() == {"r": b"snap"}
        assert [e.event_type for e in await s.events("r")] == ["execution_start"]
    finally:
        s.close()


def real_state(execution_id: str = "p") -> ExecutionState:
    return ExecutionState(execution_id=execution_id, path="t/p", started=1.0, workload={"w": 1},
                          playbook={"apiVersion": "noetl.io/v1", "workload": {"w": 1, "pad": "p" * 5000},
                                    "workflow": [{"step": "start"}]})


async def test_a_snapshot_in_parts_keeps_its_playbook_once_and_reads_back_whole(db_path: Path,
                                                                               store: SqliteStore) -> None:
    # given a state saved in parts twice (two fold batches)
    state = real_state()
    store.commit_batch_sync([], {"p": state.snapshot_parts()})
    state.seq = 7
    store.commit_batch_sync([], {"p": state.snapshot_parts()})
    # then each read gives the whole snapshot, the same bytes as to_bytes()
    assert store.load_state_sync("p") == state.to_bytes()
    assert await store.load_states() == {"p": state.to_bytes()}
    assert ExecutionState.from_bytes(store.load_state_sync("p")).seq == 7
    # and the snapshot row holds no playbook: it is stored once, beside it
    conn = sqlite3.connect(db_path)
    (snapshot,) = conn.execute("SELECT snapshot FROM states WHERE execution_id = 'p'").fetchone()
    (count,) = conn.execute("SELECT count(*) FROM state_playbooks").fetchone()
    conn.close()
    assert b"p" * 5000 not in bytes(snapshot) and count == 1


async def test_a_whole_snapshot_after_parts_is_read_as_it_was_written(store: SqliteStore) -> None:
    # a failure path writes a whole snapshot: no playbook may be joined to it on the way back
    state = real_state()
    store.commit_batch_sync([], {"p": state.snapshot_parts()})
    state.seq = 3
    store.commit_batch_sync([], {"p": state.to_bytes()})
    assert store.load_state_sync("p") == state.to_bytes()
    assert ExecutionState.from_bytes(store.load_state_sync("p")).seq == 3


async def test_a_store_written_before_snapshots_in_parts_still_reads(db_path: Path) -> None:
    # given a store as the previous version left it: whole snapshots, no state_playbooks table
    state = real_state("old")
    db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(db_path)
    conn.executescript("CREATE TABLE states (execution_id TEXT PRIMARY KEY, snapshot BLOB NOT NULL,"
                       " terminal INTEGER NOT NULL DEFAULT 0, updated_at REAL NOT NULL);"
                       "PRAGMA user_version=2;")
    conn.execute("INSERT INTO states VALUES (?, ?, 0, 1.0)", ("old", state.to_bytes()))
    conn.commit()
    conn.close()
    # when this version opens it, the snapshot reads back whole, and a new batch is saved in parts
    s = SqliteStore(db_path)
    try:
        assert await s.load_states() == {"old": state.to_bytes()}
        state.seq = 9
        s.commit_batch_sync([], {"old": state.snapshot_parts()})
        assert ExecutionState.from_bytes(s.load_state_sync("old")).seq == 9
    finally:
        s.close()


# ------------------------------------------------------------------------------------------ commit_batch
async def test_commit_batch_writes_events_and_states_together(store: SqliteStore) -> None:
    added = await store.commit_batch([start("e"), ev("e", 1, "step_started")], {"e": b"s1"})
    assert added == 2
    assert [e.seq for e in await store.events("e")] == [0, 1]
    assert await store.load_states() == {"e": b"s1"}
    # Replaying the same batch (crash before the offset commit) changes nothing but the snapshot.
    assert await store.commit_batch([start("e"), ev("e", 1, "step_started")], {"e": b"s1"}) == 0


async def test_commit_batch_terminal_event_flags_state_in_same_transaction(store: SqliteStore) -> None:
    await store.commit_batch([start("t"), ev("t", 1, "execution_failed", status="FAILED", error="boom")],
                             {"t": b"final"})
    assert await store.load_states() == {}


async def test_failing_batch_leaves_nothing(store: SqliteStore) -> None:
    await store.commit_batch([start("keep")], {"keep": b"k"})
    with pytest.raises(Exception):
        # The events insert fine; the second snapshot cannot be bound, so the whole batch must roll back.
        await store.commit_batch([start("bad"), ev("bad", 1, "step_started")],
                                 {"bad": b"ok", "bad2": object()})  # type: ignore[dict-item]
    assert await store.events("bad") == []
    assert await store.load_states(active_only=False) == {"keep": b"k"}
    assert [x.execution_id for x in await store.executions()] == ["keep"]
    # The store is still usable after the rollback.
    assert await store.commit_batch([start("bad")], {"bad": b"ok"}) == 1


async def test_failing_batch_rolls_back_on_a_database_error(db_path: Path, store: SqliteStore) -> None:
    # A real constraint failure inside SQLite, after the events were written.
    conn = sqlite3.connect(db_path)
    conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON states WHEN NEW.execution_id = 'boom'"
                 " BEGIN SELECT RAISE(ABORT, 'refused'); END")
    conn.commit()
    conn.close()
    with pytest.raises(sqlite3.DatabaseError):
        await store.commit_batch([start("boom"), ev("boom", 1, "step_started")], {"boom": b"x"})
    assert await store.events("boom") == []
    assert await store.executions() == []


# --------------------------------------------------------------------------------------- executions view
async def test_execution_status_is_derived_from_events(store: SqliteStore) -> None:
    await store.append_events([start("p", path="flows/p")])
    (row,) = await store.executions("p")
    assert (row.status, row.path, row.start_time, row.end_time) == ("PENDING", "flows/p", "2024-01-01T00:00:00Z", None)

    await store.append_events([ev("p", 1, "step_started", node="start")])
    assert (await store.executions("p"))[0].status == "RUNNING"

    await store.append_events([ev("p", 2, "step_completed", node="start", status="COMPLETED")])
    assert (await store.executions("p"))[0].status == "RUNNING"   # never "the latest event's status"

    await store.append_events([ev("p", 3, "execution_complete", node="hello", status="COMPLETED")])
    (row,) = await store.executions("p")
    assert (row.status, row.end_time) == ("COMPLETED", "2024-01-01T00:00:03Z")


@pytest.mark.parametrize("event_type,status", [("execution_failed", "FAILED"),
                                               ("execution_cancelled", "CANCELLED"),
                                               ("execution_complete", "COMPLETED")])
async def test_terminal_event_decides_status(store: SqliteStore, event_type: str, status: str) -> None:
    await store.append_events([start("x"), ev("x", 1, "step_started"),
                               ev("x", 2, event_type, node="hello", status=status, error="why")])
    (row,) = await store.executions("x")
    assert row.status == status
    # A late duplicate of an earlier event does not move the status back.
    await store.append_events([ev("x", 1, "step_started")])
    assert (await store.executions("x"))[0].status == status


async def test_executions_lists_all_newest_first_with_parent(store: SqliteStore) -> None:
    await store.append_events([start("old", path="a", ts_seq=1)])
    await store.append_events([start("new", path="b", ts_seq=5)])
    await store.append_events([start("child", path="c", ts_seq=3, parent_execution_id="new")])
    rows = await store.executions()
    assert [r.execution_id for r in rows] == ["new", "child", "old"]
    assert rows[1].parent_execution_id == "new"
    assert [r.execution_id for r in await store.executions(limit=1)] == ["new"]
    assert await store.executions("missing") == []
