"""Properties that try to break the batch fold (issue 8, scope 3).

Hypothesis writes valid playbooks full of hostile templates (values that are not JSON, unicode, dotted and
empty keys, huge numbers, undefined names) and feeds them, with a well-behaved canary execution, through a
runtime in miniature around `fold_batch`: random batch sizes, messages taken in random order, a scripted
worker whose answers are drawn too (hostile results, failures, silence), and chaos: duplicates, stale
attempts, unknown ids, garbage bytes, timers at random times. Both state shapes run the same script: the
broker's (a table of snapshots + StateCache) and the embedded runtime's (parsed states in memory).

Asserted: the batch fold never raises and never needs its error path (no input makes advance() raise); the
canary completes with its result; every execution ends, or says what it waits for (commands sent and not
answered); every log is 0..n-1 without gaps or repeats, with at most one terminal event, last; both state
shapes give the same events. The same playbooks (tests/hostile.py) go through the real embedded runtime in
test_poison_playbooks.py and through the real broker on Tansu in tests/integration/test_broker.py.
"""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostile import CANARY, RESULTS, playbooks

from noetl_common.batch import BatchOutput, Record, fold_batch
from noetl_common.state_access import StateCache, TableStates
from noetl_common.codec import decode_inbound, encode
from noetl_common.messages import (TERMINAL_EVENTS, ActionCompleted, ActionFailed, ActionStarted, CancelExecution,
                                   ChildStarted, StartExecution, TimerFired)
from noetl_common.state import ExecutionState

T0 = 1_700_000_000.0


class _Memory:
    """The embedded runtime's state shape: parsed states in a dict; snapshots only for a replay."""

    def __init__(self) -> None:
        self.states: dict[str, ExecutionState] = {}
        self.snapshots: dict[str, bytes] = {}

    def take(self, eid: str) -> ExecutionState | None:
        return self.states.get(eid)

    def snapshot(self, eid: str) -> bytes | None:
        return self.snapshots.get(eid)

    def give_back(self, eid: str, raw: bytes | None, state: ExecutionState | None) -> None:
        if state is None:
            self.states.pop(eid, None)
        else:
            self.states[eid] = state


class Miniature:
    """A runtime around fold_batch with a virtual clock, a scripted worker and a chaos monkey, all driven by
    the drawn script (`take`: which message next, how big a batch, what the worker does)."""

    def __init__(self, shape: str, script: dict[str, Any]) -> None:
        self.shape = shape
        self.table: dict[str, bytes] = {}
        self.memory = _Memory()
        self.cache = StateCache(script["cache"])
        self.script = {k: list(v) if isinstance(v, list) else v for k, v in script.items()}
        self.inbox: list[Any] = []              # Record or bytes
        self.history: list[bytes] = []          # every message delivered, for duplicates
        self.events: dict[str, list[Any]] = defaultdict(list)
        self.commands: dict[str, Any] = {}
        self.timers: dict[str, dict[str, float]] = {}
        self.clock = T0
        self.failures: list[Any] = []
        self.letters = 0

    def draw(self, name: str, default: int = 0) -> int:
        values = self.script[name]
        return values.pop(0) if values else default

    def states(self) -> Any:
        return TableStates(self.table, self.cache) if self.shape == "table" else self.memory

    def state(self, eid: str) -> ExecutionState | None:
        if self.shape == "table":
            raw = self.table.get(eid)
            return None if raw is None else ExecutionState.from_bytes(raw)
        return self.memory.states.get(eid)

    def send(self, message: Any) -> None:
        self.inbox.append(Record(encode(message), message.execution_id.encode()))

    def run(self, max_batches: int = 400) -> None:
        for _ in range(max_batches):
            if not self.inbox and not self._fire_timer():
                return
            size = 1 + self.draw("sizes", 3) % 8
            batch = [self.inbox.pop(self.draw("order") % len(self.inbox)) for _ in range(min(size, len(self.inbox)))]
            self._chaos(batch)
            out = fold_batch(self.states(), batch, now=self.clock)   # never raises: that is the first property
            self._absorb(out)
        raise AssertionError("the miniature runtime did not settle")

    def _chaos(self, batch: list[Any]) -> None:
        kind = self.draw("chaos", 99) % 10
        known = sorted(self.events)
        if kind == 0 and self.history:                                   # a duplicate
            batch.append(self.history[self.draw("pick") % len(self.history)])
        elif kind == 1:                                                  # garbage of every sort
            garbage = [b"", b"{", b"\xff\xfe", b'{"kind": "start"}', b'{"kind": "nope", "execution_id": "e"}',
                       b"[1, 2, 3]", b'{"kind": "cancel", "execution_id": 5, "time": 1}', b"null",
                       b'{"kind": "cancel", "execution_id": "canary", "time": NaN}',
                       b'{"kind": "heartbeat", "execution_id": "h0", "command_id": "h0:s0:1:1", "time": 1e300}']
            batch.append(garbage[self.draw("pick") % len(garbage)])
        elif kind == 2 and known:                                        # a stale or unknown attempt
            eid = known[self.draw("pick") % len(known)]
            cid = f"{eid}:s0:1:{self.draw('pick') % 4}"
            batch.append(encode(ActionCompleted(execution_id=eid, command_id=cid, time=self.clock, result=[1])))
        elif kind == 3:                                                  # an execution nobody started
            batch.append(encode(ActionFailed(execution_id="ghost", command_id="ghost:s0:1:1", time=self.clock,
                                             error="boo")))
        elif kind == 4 and known:                                        # a timer at a random time
            eid = known[self.draw("pick") % len(known)]
            keys = [*self.timers.get(eid, {}), "lease:nope", "retry:s0", "retry:s0:1"]
            batch.append(encode(TimerFired(execution_id=eid, timer=keys[self.draw("pick") % len(keys)],
                                           time=self.clock + self.draw("pick") % 100 - 50)))
        elif kind == 5 and known:                                        # a start again, another playbook
            eid = known[self.draw("pick") % len(known)]
            batch.append(encode(StartExecution(execution_id=eid, time=self.clock, playbook={"x": 1}, path="p")))

    def _absorb(self, out: BatchOutput) -> None:
        if self.shape == "table":
            self.table.update(out.states)
        else:
            self.memory.snapshots.update(out.states)
        self.failures += out.failures
        self.letters += len(out.dead_letters)
        for event in out.events:
            self.events[event.execution_id].append(event)
        for eid, timers in out.timers.items():
            self.timers[eid] = timers
        for raw in out.request_bytes:
            self.inbox.append(raw)
        for command, raw in zip(out.commands, out.command_bytes):
            assert decode_inbound is not None and json.loads(raw)
            self.commands[command.command_id] = command
            self._work(command)

    def _work(self, command: Any) -> None:
        eid, cid, t = command.execution_id, command.command_id, self.clock
        started = ActionStarted(execution_id=eid, command_id=cid, time=t)
        if command.action.type == "playbook" and command.phase == "action":
            child = f"child:{cid}"
            for message in (started, StartExecution(
                    execution_id=child, time=t, playbook=self.script["child"], path="t/child",
                    payload=command.action.data, parent_execution_id=eid, parent_command_id=cid,
                    parent_step=command.step), ChildStarted(execution_id=eid, command_id=cid,
                                                            child_execution_id=child, time=t)):
                self._deliver(message)
            return
        answer = self.draw("answers", 0) % 5
        if command.execution_id == "canary" or command.phase == "save":
            answer = 0
        result = self.script["results"][self.draw("pick") % len(self.script["results"])]
        if answer == 0:                                      # completes, with a result (and variables) of its own
            value = {"y": command.action.data.get("x", 0) + 1} if eid == "canary" else result
            variables = {} if eid == "canary" or not isinstance(result, dict) else result
            self._deliver(started, ActionCompleted(execution_id=eid, command_id=cid, time=t, result=value,
                                                   variables=variables))
        elif answer == 1:                                    # fails, maybe with an http status
            self._deliver(started, ActionFailed(execution_id=eid, command_id=cid, time=t, error="it broke \ud7ff",
                                                status_code=500, result=result))
        elif answer == 2:                                    # starts and goes silent: the lease fires
            self._deliver(started)
        elif answer == 3:                                    # completes without ever saying it started
            self._deliver(ActionCompleted(execution_id=eid, command_id=cid, time=t, result=result, started=t))
        # 4: never even starts: the execution waits for it, and says so (state.work)

    def _deliver(self, *messages: Any) -> None:
        for message in messages:
            raw = encode(message)
            self.history.append(raw)
            self.inbox.append(Record(raw, message.execution_id.encode()))

    def _fire_timer(self) -> bool:
        due = [(at, eid, key) for eid, timers in self.timers.items() for key, at in timers.items()]
        if not due:
            return False
        at, eid, key = min(due)
        self.clock = max(self.clock, at)
        del self.timers[eid][key]
        self.send(TimerFired(execution_id=eid, timer=key, time=self.clock))
        return True


def check(runtime: Miniature, started: list[str]) -> None:
    assert runtime.failures == [], [(f.execution_id, f.reason) for f in runtime.failures]
    canary = runtime.state("canary")
    assert canary is not None and canary.status == "COMPLETED" and canary.result == {"y": 21}, canary
    for eid, events in runtime.events.items():
        assert [e.seq for e in events] == list(range(len(events))), eid
        assert len({e.event_id for e in events}) == len(events)
        terminal = [i for i, e in enumerate(events) if e.event_type in TERMINAL_EVENTS]
        state = runtime.state(eid)
        assert state is not None
        if state.terminal:
            assert terminal == [len(events) - 1] and events[-1].status == state.status
            if state.status == "FAILED":
                assert state.error
        else:   # it waits, and says for what: commands that were sent and never answered
            assert not terminal and state.work, (eid, state.pending, state.timers)
            assert all(work.command_id in runtime.commands for work in state.work.values())
    for eid in started:
        assert eid in runtime.events or runtime.state(eid) is None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_the_batch_fold_survives_hostile_playbooks_and_chaotic_delivery(data: Any) -> None:
    hostile = [data.draw(playbooks(f"h{i}"), label=f"playbook {i}") for i in range(data.draw(st.integers(1, 3)))]
    ints = st.lists(st.integers(0, 1000), max_size=200)
    script = {"sizes": data.draw(ints), "order": data.draw(ints), "chaos": data.draw(ints),
              "pick": data.draw(ints), "answers": data.draw(ints), "cache": data.draw(st.sampled_from([0, 2, 100])),
              "results": data.draw(st.lists(RESULTS, min_size=1, max_size=4)),
              "child": data.draw(playbooks("child", child=False), label="child")}
    cancel = data.draw(st.booleans(), label="cancel one")
    logs = []
    for shape in ("table", "memory"):
        runtime = Miniature(shape, script)
        runtime.send(StartExecution(execution_id="canary", time=T0, playbook=CANARY, path="t/canary"))
        ids = [f"h{i}" for i in range(len(hostile))]
        for eid, document in zip(ids, hostile):
            runtime.send(StartExecution(execution_id=eid, time=T0, playbook=document, path=f"t/{eid}"))
        if cancel:
            runtime.send(CancelExecution(execution_id=ids[0], time=T0 + 1, reason="chaos"))
        runtime.run()
        check(runtime, ids)
        logs.append({eid: [e.model_dump() for e in events] for eid, events in runtime.events.items()})
    assert logs[0] == logs[1]   # both state shapes fold the same script to the same events
