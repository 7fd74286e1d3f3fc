"""A Tick is the fold's working set for one inbound message: the state, the compiled playbook, the
message's time, and the outputs (events, commands, requests to other executions, timers set)."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from noetl_common.dsl import load_playbook
from noetl_common.dsl.models import Playbook
from noetl_common.engine import v10
from noetl_common.engine.graph import Reach
from noetl_common.messages import Command, Event
from noetl_common.state import ExecutionState


@dataclass
class Compiled:
    playbook: Playbook
    reach: Reach


def compile_state(state: ExecutionState, playbook: Playbook | None = None) -> Compiled | None:
    """Normalise the state's playbook once per process (memoised on the state object; pure)."""
    compiled = state._compiled          # one read: a pydantic private attribute costs a __getattr__ call
    if compiled is None:
        if playbook is None:
            playbook, _problems = load_playbook(state.playbook, state.caps)   # the caps it started under
        if playbook is None:
            return None
        compiled = state._compiled = Compiled(playbook, Reach(playbook))
    return compiled


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Tick:
    state: ExecutionState
    compiled: Compiled | None
    time: float
    events: list[Event] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)      # inbound messages for other executions
    timers: dict[str, float] = field(default_factory=dict)  # deadlines set during this tick
    stale: bool = False
    variables_set: dict[str, Any] | None = None   # `save: {name: X}` values set by this message
    _context: dict[str, Any] | None = None
    _iso: str | None = None

    @property
    def playbook(self) -> Playbook:
        assert self.compiled is not None
        return self.compiled.playbook

    def emit(self, event_type: str, node_name: str, node_type: str, status: str, **fields: Any) -> None:
        s = self.state
        if self.variables_set and event_type in ("step_completed", "iteration_completed"):
            fields["meta"] = {**(fields.get("meta") or {}), "variables": self.variables_set}
            self.variables_set = None
        self.events.append(Event(
            event_id=f"{s.execution_id}:{s.seq}", execution_id=s.execution_id,
            parent_execution_id=s.parent_execution_id, seq=s.seq, event_type=event_type, node_name=node_name,
            node_type=node_type, status=status, timestamp=self._stamp(), time=self.time, **fields))
        s.seq += 1

    def set_timer(self, key: str, due: float) -> None:
        self.state.timers[key] = due
        self.timers[key] = due

    def clear_timer(self, key: str) -> None:
        self.state.timers.pop(key, None)

    def context(self) -> dict[str, Any]:
        """The render context of DSL §5 (without per-step names). Rebuilt after results/variables change."""
        if self._context is None and self.compiled is not None and self.compiled.playbook.dialect != "v1":
            s = self.state
            self._context = v10.context(s.variables, s.results, s.workload, s.execution_id,
                                        s.parent_execution_id, self._now, s.compact_results())
        if self._context is None:
            s = self.state
            ctx: dict[str, Any] = {**s.variables, **s.results}
            ctx.update(workload=s.workload, execution_id=s.execution_id,
                       parent_execution_id=s.parent_execution_id, vars=s.variables, now=self._now)
            self._context = ctx
        return self._context

    def invalidate(self) -> None:
        self._context = None

    def _now(self) -> str:
        return self._stamp()

    def _stamp(self) -> str:
        if self._iso is None:          # every event of one message shares its instant
            self._iso = iso(self.time)
        return self._iso
