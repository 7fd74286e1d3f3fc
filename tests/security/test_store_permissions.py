"""Issue 9, finding: the SQLite store was created 0644, readable by every local user (step code running as
the step user included). Store files are 0600 and the folder made for them 0700, an older store is
narrowed when opened, and the key file stays 0600."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from noetl_runtime.sqlite_store import SqliteStore


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_store_is_private(tmp_path: Path) -> None:
    old = os.umask(0o022)            # the usual umask: what made it 0644
    try:
        store = SqliteStore(tmp_path / "new" / "noetl.db")
        store._crypto()               # creates secret.key beside it
        with store._tx() as db:       # a write creates the WAL and its index
            db.execute("CREATE TABLE probe (x)")
        files = sorted(p.name for p in (tmp_path / "new").iterdir())
        assert {"noetl.db", "noetl.db-wal", "noetl.db-shm", "secret.key"} <= set(files), files
        for name in files:
            assert _mode(tmp_path / "new" / name) == 0o600, name
        assert _mode(tmp_path / "new") == 0o700
        store.close()
    finally:
        os.umask(old)


def test_an_older_world_readable_store_is_narrowed_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "noetl.db"
    SqliteStore(path).close()
    for each in tmp_path.iterdir():
        each.chmod(0o644)
    SqliteStore(path).close()
    assert _mode(path) == 0o600
