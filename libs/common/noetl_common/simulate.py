"""A deterministic, pure driver for the fold: scripted workers, a virtual clock, any delivery order.

Used by the unit and property tests (given/when/then over messages) and by the fold benchmark. It does
what the runtimes do (route requests between executions, fire due timers) with no I/O and no real time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from noetl_common.caps import DEFAULT_CAPS, Caps
from noetl_common.engine import advance
from noetl_common.messages import (ActionCompleted, ActionFailed, ActionStarted, ChildStarted, Command, Event,
                                   StartExecution, TimerFired)
from noetl_common.state import ExecutionState


@dataclass
class Outcome:
    """What a scripted worker does with a command: complete, fail, or never answer (`hang`)."""
    ok: bool = True
    result: Any = None
    error: str = ""
    status_code: int | None = None
    hang: bool = False
    variables: dict[str, Any] = field(default_factory=dict)
    log: str | None = None       # the attempt's captured output
    suspended: dict[str, Any] | None = None   # a v10 pipeline stopped before a playbook task (composition.py)


Worker = Callable[[Command], Outcome]


def sim_key(execution_id: str) -> str:
    """A simulated execution's fact key: fixed, so a simulation replays exactly (the real ones are random,
    minted by the runtime adapters; the core has no randomness)."""
    return f"simulated-fact-key:{execution_id}"


def child_id(command_id: str) -> str:
    return f"child:{command_id}"


@dataclass
class Simulation:
    worker: Worker
    catalog: dict[str, dict[str, Any]] = field(default_factory=dict)   # path -> playbook document
    choose: Callable[[int], int] = lambda n: 0                          # which pending message goes next
    now: float = 1_000_000.0
    states: dict[str, ExecutionState] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    commands: list[Command] = field(default_factory=list)
    inbox: list[Any] = field(default_factory=list)
    stale: int = 0
    caps: Caps = DEFAULT_CAPS                                           # the runtime's (noetl_common.caps)

    def start(self, document: dict[str, Any], payload: dict[str, Any] | None = None,
              execution_id: str = "e1") -> str:
        self.inbox.append(StartExecution(execution_id=execution_id, time=self.now, playbook=document,
                                         path=str(document.get("metadata", {}).get("path", "p")),
                                         payload=payload or {}, fact_key=sim_key(execution_id)))
        return execution_id

    def deliver(self, message: Any) -> None:
        transition = advance(self.states.get(message.execution_id), message, self.caps)
        self.stale += transition.stale
        if transition.state is not None:
            self.states[message.execution_id] = transition.state
        self.events.extend(transition.events)
        self.inbox.extend(transition.requests)
        for command in transition.commands:
            self.commands.append(command)
            self.inbox.extend(self._work(command))

    def run(self, max_messages: int = 1_000_000) -> None:
        """Deliver messages (in the order `choose` picks) and fire timers until nothing is left."""
        for _ in range(max_messages):
            if not self.inbox and not self.fire_next_timer():
                return
            if self.inbox:
                self.deliver(self.inbox.pop(self.choose(len(self.inbox))))
        raise RuntimeError("simulation did not settle")

    def state(self, execution_id: str = "e1") -> ExecutionState:
        return self.states[execution_id]

    def log(self, execution_id: str = "e1") -> list[str]:
        return [f"{e.event_type}:{e.node_name}" for e in self.events if e.execution_id == execution_id]

    def fire_next_timer(self) -> bool:
        due = [(t, eid, key) for eid, s in self.states.items() if not s.terminal for key, t in s.timers.items()]
        if not due:
            return False
        when, eid, key = min(due)
        self.now = max(self.now, when)
        self.deliver(TimerFired(execution_id=eid, timer=key, time=self.now))
        return True

    def _work(self, command: Command) -> list[Any]:
        eid, cid, t, tok = command.execution_id, command.command_id, self.now, command.token
        started = ActionStarted(execution_id=eid, command_id=cid, time=t, token=tok)
        if command.action.type == "playbook" and command.phase == "action":
            child = child_id(cid)
            document = self.catalog[command.action.config["path"]]
            return [started, StartExecution(
                execution_id=child, time=t, playbook=document, path=command.action.config["path"],
                payload=command.action.data, parent_execution_id=eid, parent_command_id=cid,
                parent_step=command.step, return_step=command.action.config.get("return_step"),
                fact_key=sim_key(child), parent_token=tok),
                ChildStarted(execution_id=eid, command_id=cid, child_execution_id=child, time=t, token=tok)]
        if command.phase == "save":
            return [started, ActionCompleted(execution_id=eid, command_id=cid, time=t, result=command.result,
                                             token=tok)]
        outcome = self.worker(command)
        if outcome.hang:
            return [started]
        if outcome.ok:
            return [started, ActionCompleted(execution_id=eid, command_id=cid, time=t, result=outcome.result,
                                             variables=outcome.variables, log=outcome.log, token=tok,
                                             suspended=outcome.suspended)]
        return [started, ActionFailed(execution_id=eid, command_id=cid, time=t, error=outcome.error,
                                      status_code=outcome.status_code, result=outcome.result, log=outcome.log,
                                      token=tok)]
