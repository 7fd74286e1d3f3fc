"""The embedded runtime's lease rule on a restart: the workers that held leases died with the process, so a
resumed execution's lease gets a full lease from the restart for the redelivered attempt to heartbeat.
Real SQLite store, real fold, real worker and python pool."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import yaml

from noetl_common.messages import Event
from noetl_embedded.runtime import EmbeddedRuntime
from noetl_runtime.sqlite_store import SqliteStore

SLOW = yaml.safe_load("""
apiVersion: noetl.io/v1
kind: Playbook
metadata: {name: lease_resume, path: tests/embedded/lease_resume}
workflow:
  - step: start
    next: [{step: slow}]
  - step: slow
    type: python
    data: {marker: "{{ workload.marker }}"}
    code: |
      import time
      def main(marker):
          with open(marker, "a") as f:
              f.write("start\\n")
          time.sleep(1.5)
          return {"ok": True}
    next: [{step: end}]
  - step: end
""")


async def until(condition, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"no {what} within {timeout}s"
        await asyncio.sleep(0.01)
    return value


def runtime(path: Path, events: list[Event]) -> EmbeddedRuntime:
    # lease_retries=0: an expiry would fail the step at once, so the test sees any lease fired too early
    rt = EmbeddedRuntime(SqliteStore(path), python_processes=1, lease_seconds=1.0, lease_retries=0)
    rt.add_listener(events.append)
    return rt


async def test_a_restart_longer_than_the_lease_does_not_fail_the_redelivered_attempt(tmp_path: Path,
                                                                                      step_dir: Path) -> None:
    # the marker is shared with step code, which runs as the step user when tests run as root (tests/conftest.py)
    path, marker = tmp_path / "x.db", step_dir / "ran.log"
    before: list[Event] = []
    rt1 = runtime(path, before)
    await rt1.start()
    start = rt1.start_message(SLOW, "tests/embedded/lease_resume", None, {"marker": str(marker)}, time.time())
    assert (start.lease_seconds, start.lease_retries) == (1.0, 0)
    execution_id = rt1.submit(start)
    await until(lambda: any(e.event_type == "action_started" for e in before), what="action_started")
    await until(lambda: marker.exists(), what="the code to run")
    await rt1.stop()
    rt1.store.close()
    await asyncio.sleep(1.6)                 # down for longer than the lease: its deadline is overdue

    after: list[Event] = []
    rt2 = runtime(path, after)
    await rt2.start()
    try:
        state = await asyncio.wait_for(rt2.wait(execution_id), 20)
    finally:
        await rt2.stop()
        rt2.store.close()
    assert state.status == "COMPLETED", state.error
    assert [e.event_type for e in after if e.event_type.startswith("action_")] == ["action_completed"]
    assert marker.read_text().split() == ["start", "start"]   # the interrupted run and the redelivered one
