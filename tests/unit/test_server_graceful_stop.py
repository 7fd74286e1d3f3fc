"""A graceful stop of `noetl server` (SIGTERM) while a python step runs abandons the attempt and records no
failure; the restarted server on the same store reruns it and the execution completes (docs/embedded.md,
"Stopping"). Real `noetl server` processes, real SQLite store, real step processes.

SIGTERM to the process group is the case that failed before: it reaches the python pool's supervisors too
(as a systemd stop or `kill -- -PGID` does), they exit, and the attempt came back as
"python worker process exited with code 0", a step failure, before uvicorn stopped the runtime.
"""
from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support import NoetlServer, bearer, local_admin_token, until

NAP = textwrap.dedent("""\
    apiVersion: noetl.io/v1
    kind: Playbook
    metadata: {name: graceful_nap, path: tests/graceful_nap}
    workflow:
      - step: start
        next: [{step: nap}]
      - step: nap
        type: python
        data: {marker: "{{ workload.marker }}"}
        code: |
          import time
          def main(marker):
              with open(marker, "a") as f:
                  f.write("start\\n")
              time.sleep(3)
              with open(marker, "a") as f:
                  f.write("done\\n")
              return {"napped": True}
        next: [{step: end}]
      - step: end
        result: {napped: "{{ nap.napped }}"}
    """)
FAILURES = {"action_error", "action_retry", "step_failed", "execution_failed"}


@pytest.fixture
def home() -> Iterator[Path]:
    """The store's folder, outside pytest's 0700 tree (step processes may run as another user)."""
    path = Path(tempfile.mkdtemp(prefix="noetl-graceful-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def server(home: Path) -> NoetlServer:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOETL_")}
    return NoetlServer(["--store", home / "noetl.db"], env, home / "server.log").start()


def client(srv: NoetlServer, home: Path) -> httpx.Client:
    return httpx.Client(base_url=srv.url, timeout=30, headers=bearer(local_admin_token(home / "noetl.db")))


def event_types(store: Path, execution_id: str) -> list[str]:
    with sqlite3.connect(store) as db:
        return [row[0] for row in db.execute("SELECT event_type FROM events WHERE execution_id = ? ORDER BY seq",
                                             (execution_id,))]


@pytest.mark.parametrize("group", [True, False], ids=["process-group", "server-only"])
def test_sigterm_mid_step_abandons_the_attempt_and_the_restart_completes_it(home: Path, step_dir: Path,
                                                                          group: bool) -> None:
    marker = step_dir / "nap.log"
    first = server(home)
    try:
        with client(first, home) as api:
            assert api.post("/api/catalog/register", json={"content": NAP}).status_code == 200
            started = api.post("/api/executions/run", json={"path": "tests/graceful_nap",
                                                            "parameters": {"marker": str(marker)}})
            assert started.status_code == 200, started.text
            execution_id = started.json()["execution_id"]
            until(lambda: marker.exists() and "start" in marker.read_text(), 30, "the step code to run")
            until(lambda: "action_started" in event_types(home / "noetl.db", execution_id), 30, "action_started")
    finally:
        code = first.stop(signal.SIGTERM, group=group)
    assert code in (0, -signal.SIGTERM), first.logs()[-3000:]   # ended by the signal, not by SIGKILL
    assert marker.read_text().split() == ["start"], "the step was meant to be interrupted mid-run"
    before = event_types(home / "noetl.db", execution_id)
    assert not FAILURES & set(before), before

    second = server(home)
    try:
        with client(second, home) as api:
            def finished() -> dict | None:
                body = api.get(f"/api/executions/{execution_id}").json()
                return body if body["status"] != "RUNNING" else None
            done = until(finished, 60, "the resumed execution to finish")
    finally:
        second.stop()
    assert done["status"] == "COMPLETED", (done, second.logs()[-3000:])
    assert done["result"] == {"napped": True}
    after = event_types(home / "noetl.db", execution_id)
    assert not FAILURES & set(after), after
    assert after.count("action_completed") == 1 and after[-1] == "execution_complete", after
    assert marker.read_text().split() == ["start", "start", "done"]   # abandoned, then rerun to its end
