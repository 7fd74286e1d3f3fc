"""EmbeddedRuntime end to end on a real SQLite store in tmp_path: restart/resume, durable timers, poison
messages and duplicate delivery. Real fold, real worker, real python pool; nothing is mocked."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from noetl_common.codec import decode_inbound
from noetl_common.engine import advance
from noetl_common.messages import ActionCompleted, Event
from noetl_common.state import ExecutionState
from noetl_embedded.runtime import EmbeddedRuntime
from noetl_runtime.sqlite_store import SqliteStore


async def until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
    return value


def doc(text: str) -> dict[str, Any]:
    return yaml.safe_load(text)


async def started(store_path: Path, events: list[Event] | None = None) -> EmbeddedRuntime:
    runtime = EmbeddedRuntime(SqliteStore(store_path), python_processes=1)
    if events is not None:
        runtime.add_listener(events.append)
    await runtime.start()
    return runtime


async def shut(runtime: EmbeddedRuntime) -> None:
    await runtime.stop()
    runtime.store.close()


def submit(runtime: EmbeddedRuntime, playbook: dict[str, Any], payload: dict[str, Any] | None = None) -> str:
    start = runtime.start_message(playbook, playbook["metadata"]["path"], None, payload or {}, time.time())
    return runtime.submit(start)


def assert_clean_log(events: list[Event]) -> None:
    """The log as stored: positions 0..n-1 without a gap, every event id once, exactly one terminal event."""
    assert [e.seq for e in events] == list(range(len(events)))
    assert len({e.event_id for e in events}) == len(events)
    terminal = [e for e in events if e.event_type in ("execution_complete", "execution_failed",
                                                        "execution_cancelled")]
    assert len(terminal) == 1 and events[-1] is terminal[0]


def letters(runtime: EmbeddedRuntime) -> list[tuple[bytes, str]]:
    """The dead letters in the runtime's store: (the original bytes, the reason)."""
    return [(raw, reason) for _eid, raw, reason in runtime.store.dead_letters()]


def kinds(events: list[Event], step: str | None = None) -> list[str]:
    return [e.event_type for e in events if step is None or e.node_name == step]


# -------------------------------------------------------------------------------------------------- (a)
SLOW = doc("""
apiVersion: noetl.io/v1
kind: Playbook
metadata: {name: resume, path: tests/embedded/resume}
workload: {x: 21}
workflow:
  - step: start
    next: [{step: slow}]
  - step: slow
    type: python
    data: {x: "{{ workload.x }}", marker: "{{ workload.marker }}"}
    code: |
      import time
      def main(x, marker):
          with open(marker, "a") as f:
              f.write("start\\n")
          time.sleep(1.5)
          with open(marker, "a") as f:
              f.write("done\\n")
          return {"doubled": x * 2}
    next: [{step: end}]
  - step: end
    result: {answer: "{{ slow.doubled }}"}
""")


async def test_a_restart_mid_step_resumes_the_execution(tmp_path: Path, step_dir: Path) -> None:
    path, marker = tmp_path / "x.db", step_dir / "ran.log"
    before: list[Event] = []
    rt1 = await started(path, before)
    execution_id = submit(rt1, SLOW, {"marker": str(marker)})
    await until(lambda: "action_started" in kinds(before, "slow"), what="the step to start")
    await until(lambda: marker.exists() and "start" in marker.read_text(), what="the code to run")
    await shut(rt1)                                  # mid-step: the attempt's process is killed
    assert execution_id not in rt1.final
    assert marker.read_text().split() == ["start"]

    after: list[Event] = []
    rt2 = await started(path, after)                 # a new runtime on the same file
    try:
        resumed_at = time.monotonic()
        state = await asyncio.wait_for(rt2.wait(execution_id), 15)
        took = time.monotonic() - resumed_at
        log = await rt2.store.events(execution_id)
    finally:
        await shut(rt2)

    assert state.status == "COMPLETED", state.error
    assert state.result == {"answer": 42}
    assert state.steps["slow"].result == {"doubled": 42}
    assert state.steps["slow"].attempt == 1          # the same attempt, redelivered with its own command id
    assert took >= 1.4                               # the step really ran again after the restart
    # Observed: the interrupted attempt was killed with the old runtime, the redelivered command ran the
    # code once more to the end: two starts, one completion, i.e. at most twice.
    assert marker.read_text().split() == ["start", "start", "done"]

    assert_clean_log(log)
    assert kinds(log, "slow") == ["step_started", "action_started", "action_completed", "step_completed"]
    # every event was emitted exactly once across both runtimes, and the log is exactly what they emitted
    ids_before, ids_after = [e.event_id for e in before], [e.event_id for e in after]
    assert not set(ids_before) & set(ids_after)
    assert ids_before + ids_after == [e.event_id for e in log]
    assert kinds(after) == ["action_completed", "step_completed", "step_started", "step_completed",
                            "execution_complete"]


# -------------------------------------------------------------------------------------------------- (b)
FLAKY = doc("""
apiVersion: noetl.io/v1
kind: Playbook
metadata: {name: backoff, path: tests/embedded/backoff}
workflow:
  - step: start
    next: [{step: flaky}]
  - step: flaky
    type: python
    data: {counter: "{{ workload.counter }}"}
    retry: {max_attempts: 3, initial_delay: 1.0}
    code: |
      import time
      def main(counter):
          with open(counter, "a") as f:
              f.write(f"{time.time()}\\n")
          with open(counter) as f:
              calls = len(f.read().split())
          if calls == 1:
              raise RuntimeError("first call fails")
          return {"calls": calls}
    next: [{step: end}]
  - step: end
""")


@pytest.mark.parametrize("down_for", [0.1, 1.4], ids=["restart_before_due", "restart_after_due"])
async def test_b_a_durable_backoff_survives_a_restart(tmp_path: Path, step_dir: Path, down_for: float) -> None:
    path, counter = tmp_path / "x.db", step_dir / "calls.log"
    before: list[Event] = []
    rt1 = await started(path, before)
    execution_id = submit(rt1, FLAKY, {"counter": str(counter)})
    retry = await until(lambda: next((e for e in before if e.event_type == "action_retry"), None),
                        what="the retry decision")
    due = rt1.states[execution_id].timers["retry:flaky"]
    assert due == pytest.approx(retry.time + 1.0)
    await shut(rt1)                                  # the timer heap dies with it; the deadline is in the state
    stopped_at = time.time()
    await asyncio.sleep(down_for)

    persisted = ExecutionState.from_bytes((await _states(path))[execution_id])
    assert persisted.timers == {"retry:flaky": due} and persisted.steps["flaky"].status == "retry_wait"

    after: list[Event] = []
    rt2 = await started(path, after)
    try:
        state = await asyncio.wait_for(rt2.wait(execution_id), 10)
        log = await rt2.store.events(execution_id)
    finally:
        await shut(rt2)

    assert state.status == "COMPLETED", state.error
    assert state.steps["flaky"].attempt == 2 and state.steps["flaky"].result == {"calls": 2}
    calls = [float(t) for t in counter.read_text().split()]
    assert len(calls) == 2                           # attempt 1, then exactly one retry: not lost, not doubled
    assert calls[1] >= due - 0.05                    # the backoff was honoured across the restart ...
    assert calls[1] <= max(due, stopped_at + down_for) + 1.5   # ... and the rescheduled timer did fire
    assert_clean_log(log)
    assert kinds(log, "flaky") == ["step_started", "action_started", "action_error", "action_retry",
                                   "action_started", "action_completed", "step_completed"]
    assert not {e.event_id for e in before} & {e.event_id for e in after}


async def _states(path: Path) -> dict[str, bytes]:
    store = SqliteStore(path)
    try:
        return await store.load_states()
    finally:
        store.close()


# -------------------------------------------------------------------------------------------------- (c)
QUICK = doc("""
apiVersion: noetl.io/v1
kind: Playbook
metadata: {name: quick, path: tests/embedded/quick}
workflow:
  - step: start
    next: [{step: work}]
  - step: work
    type: python
    code: |
      def main():
          return {"ok": True}
    next: [{step: end}]
  - step: end
""")


async def test_c_malformed_messages_are_dead_lettered_and_the_runtime_goes_on(tmp_path: Path) -> None:
    rt = await started(tmp_path / "x.db")
    try:
        rt.bus.publish(rt.topics.requests, "k", b"garbage")
        rt.bus.publish(rt.topics.requests, "k", b'{"kind": "action_completed", "execution_id": "e"}')
        rt.bus.publish(rt.topics.commands("default"), "k", b"\x00junk command")
        execution_id = submit(rt, QUICK)              # in the same batch as the poison messages
        state = await asyncio.wait_for(rt.wait(execution_id), 10)
        assert state.status == "COMPLETED" and state.steps["work"].result == {"ok": True}

        assert [raw for raw, _ in letters(rt)] == [b"garbage", b'{"kind": "action_completed", '
                                                       b'"execution_id": "e"}', b"\x00junk command"]
        reasons = [reason for _, reason in letters(rt)]
        assert reasons[0].startswith("invalid message") and "Invalid JSON" in reasons[0]
        assert reasons[1].startswith("invalid message") and "Field required at action_completed.command_id" in reasons[1]
        assert reasons[2].startswith("invalid message") and "Invalid JSON" in reasons[2]

        second = submit(rt, QUICK)                    # and the one after still completes
        assert (await asyncio.wait_for(rt.wait(second), 10)).status == "COMPLETED"
        assert rt.crashed is None and len(letters(rt)) == 3 == rt.dead_lettered
    finally:
        await shut(rt)


# -------------------------------------------------------------------------------------------------- (d)
TWO_STEPS = doc("""
apiVersion: noetl.io/v1
kind: Playbook
metadata: {name: dup, path: tests/embedded/dup}
workflow:
  - step: start
    next: [{step: a}]
  - step: a
    type: python
    code: |
      def main():
          return {"v": 1}
    next: [{step: b}]
  - step: b
    type: python
    code: |
      import time
      def main():
          time.sleep(0.6)
          return {"w": 2}
    next: [{step: end}]
  - step: end
""")


async def test_d_a_duplicate_action_completed_changes_nothing(tmp_path: Path) -> None:
    rt = await started(tmp_path / "x.db")
    inbound: list[bytes] = []                         # a tap on the real bus: what the worker sent
    publish = rt.bus.publish

    def tap(topic: str, key: str, value: bytes) -> None:
        if topic == rt.topics.requests:
            inbound.append(value)
        publish(topic, key, value)

    rt.bus.publish = tap  # type: ignore[method-assign]
    injected: dict[str, Any] = {}

    def on_event(event: Event) -> None:
        if event.event_type == "step_started" and event.node_name == "b" and event.execution_id == target:
            raw = next(r for r in inbound if b'"action_completed"' in r and b':a:1:1"' in r
                       and target.encode() in r)
            injected["raw"] = raw
            for _ in range(2):                       # the same bytes, twice, while the execution runs
                rt.bus.publish(rt.topics.requests, target, raw)
            rt.bus.publish(rt.topics.requests, target, b"sentinel")   # dead-lettered after the two above

    try:
        reference = submit(rt, TWO_STEPS)            # the same playbook without duplicates
        clean = await asyncio.wait_for(rt.wait(reference), 10)
        target = ""
        rt.add_listener(on_event)
        target = submit(rt, TWO_STEPS)
        await until(lambda: any(raw == b"sentinel" for raw, _ in letters(rt)), what="the duplicates")
        assert target in rt.states and target not in rt.final   # they reached the fold mid-execution

        # the engine's verdict on the same bytes, on a copy of the live state: stale, nothing to do
        live = rt.states[target]
        copy = ExecutionState.from_bytes(live.to_bytes())
        duplicate = decode_inbound(injected["raw"])
        assert isinstance(duplicate, ActionCompleted) and duplicate.result == {"v": 1}
        transition = advance(copy, duplicate)
        assert transition.stale and not transition.events and not transition.commands
        assert transition.state.to_bytes() == live.to_bytes()

        state = await asyncio.wait_for(rt.wait(target), 10)
        log = await rt.store.events(target)
        clean_log = await rt.store.events(reference)
        dead = letters(rt)
    finally:
        await shut(rt)

    assert state.status == "COMPLETED" and state.steps["a"].visit == 1 and state.results["a"] == {"v": 1}
    assert_clean_log(log)
    assert [(e.event_type, e.node_name) for e in log] == [(e.event_type, e.node_name) for e in clean_log]
    assert kinds(log, "a").count("action_completed") == 1 and kinds(log, "b").count("step_started") == 1
    assert clean.status == "COMPLETED"
    assert [raw for raw, _ in dead] == [b"sentinel"]   # the duplicates were not poison either


# ------------------------------------------------------------------------------------------ listeners
async def test_a_failing_listener_does_not_take_the_runtime_down(tmp_path: Path) -> None:
    """A listener is an observer (the CLI's live view is one): its exception is logged, the fold goes on.
    Before the fix, a listener that raised killed the fold loop and every execution with it."""
    rt = await started(tmp_path / "x.db")
    seen: list[str] = []

    def broken(event: Event) -> None:
        raise ValueError(f"listener bug on {event.event_type}")

    rt.add_listener(broken)
    rt.add_listener(lambda event: seen.append(event.event_type))   # later listeners still hear everything
    try:
        state = await asyncio.wait_for(rt.wait(submit(rt, QUICK)), 10)
    finally:
        await shut(rt)
    assert state.status == "COMPLETED" and rt.crashed is None
    assert seen[0] == "execution_start" and seen[-1] == "execution_complete"
