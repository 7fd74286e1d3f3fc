"""Why is this execution not progressing? A pure reading of its state: what it waits for, and until when.

    explain(state, now) -> Explanation(items=[Item(kind, step, index, text, fields), ...])

Each item is one thing the execution waits for, with a human sentence (`text`) and the same facts as data
(`fields`, times as epoch seconds and ISO-8601 UTC) so that a UI can render it its own way. Kinds:

    attempt   a command in flight: dispatched (no worker yet) or running on a worker, with its lease; or
              lost with its worker (lease expired) and about to be sent again (an infrastructure retry)
    save      a result being saved by a worker (a control step's save, a child's result, an iterator's save)
    child     a child execution the step started and waits for
    retry     a retry timer: the step (or one iteration) runs again at `due`
    iterator  an iterator's progress: done, running, waiting to retry, failed, concurrency
    pending   a step some edge targeted that waits for the steps that can still reach it (a join)
    timer     a deadline none of the above explains (kept so that nothing the fold waits for is hidden)
    idle      running, yet nothing in flight or pending (the fold completes such an execution at once)
    finished  the execution is terminal: nothing to wait for

No clock here (the core's rule): `now` is an argument; the API passes its own time.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from noetl_common.engine.graph import edge_targets
from noetl_common.engine.tick import Compiled, compile_state, iso
from noetl_common.state import ExecutionState, StepRun, Work

ItemKind = Literal["attempt", "save", "child", "retry", "iterator", "pending", "timer", "idle", "finished"]
DETAIL_LIMIT = 20   # iterations in flight described one by one; the rest are counted (a 5,000-item iterator)


class Item(BaseModel):
    kind: ItemKind
    step: str | None = None
    index: int | None = None           # the iteration, for an iterator's item
    text: str
    fields: dict[str, Any] = Field(default_factory=dict)


class Explanation(BaseModel):
    execution_id: str
    status: str
    now: float
    items: list[Item]

    @property
    def text(self) -> str:
        return "\n".join(item.text for item in self.items)

    def as_json(self) -> dict[str, Any]:
        """What the API answers: the fields, `now` as ISO too, and `text` (the sentences, one per line)."""
        return {**self.model_dump(mode="json"), "now_iso": iso(self.now), "text": self.text}


def explain(state: ExecutionState, now: float) -> Explanation:
    if state.terminal:
        return finished_explanation(state.execution_id, state.status, now, state.finished, state.error)
    return Explanation(execution_id=state.execution_id, status=state.status, now=now, items=_waiting(state, now))


def finished_explanation(execution_id: str, status: str, now: float, finished: float | None = None,
                         error: str | None = None) -> Explanation:
    """A terminal execution (also when only its projected summary is at hand: the API's read model)."""
    fields: dict[str, Any] = {"status": status, "error": error}
    text = f"execution {status.lower()}: nothing to wait for"
    if finished is not None:
        fields["finished"] = _at(finished)
        text = f"execution {status.lower()} at {_clock(finished)}: nothing to wait for"
    return Explanation(execution_id=execution_id, status=status, now=now,
                       items=[Item(kind="finished", text=text, fields=fields)])


# ------------------------------------------------------------------------------------------------ helpers
def _at(t: float) -> dict[str, Any]:
    return {"epoch": t, "iso": iso(t)}


def _clock(t: float) -> str:
    """12:04:35 for a sentence (UTC); the date is in the fields."""
    return iso(t)[11:19]


def _ago(now: float, t: float) -> str:
    return f"{_seconds(max(0.0, now - t))} ago"


def _until(now: float, t: float) -> str:
    delta = t - now
    return f"in {_seconds(delta)}" if delta >= 0 else f"{_seconds(-delta)} overdue"


def _seconds(s: float) -> str:
    if s < 10:
        return f"{s:.1f} s".replace(".0 s", " s")
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _short(execution_id: str) -> str:
    return execution_id if len(execution_id) <= 12 else execution_id[:8] + "…"


# ------------------------------------------------------------------------------------------------ running
class _Reader:
    """One explanation's working set: the state, its compiled playbook, what has been described."""

    def __init__(self, state: ExecutionState, now: float) -> None:
        self.s = state
        self.now = now
        self.compiled: Compiled | None = compile_state(state)
        self.timers_seen: set[str] = set()
        self.work_seen: set[str] = set()
        self.items: list[Item] = []

    def add(self, kind: ItemKind, step: str | None, text: str, index: int | None = None, **fields: Any) -> None:
        self.items.append(Item(kind=kind, step=step, index=index, text=text, fields=fields))

    def step_spec(self, name: str) -> Any:
        return self.compiled.playbook.steps.get(name) if self.compiled else None

    def max_attempts(self, name: str, item: bool) -> int | None:
        step = self.step_spec(name)
        if step is None:
            return None
        if step.iterator is not None:
            policy = step.iterator.task.retry if item else None
        else:
            policy = step.retry
        return policy.max_attempts if policy else None

    def timer(self, key: str) -> float | None:
        due = self.s.timers.get(key)
        if due is not None:
            self.timers_seen.add(key)
        return due


def _waiting(state: ExecutionState, now: float) -> list[Item]:
    r = _Reader(state, now)
    by_step: dict[str, list[Work]] = {}
    for work in state.work.values():
        by_step.setdefault(work.step, []).append(work)
    for name, run in state.steps.items():
        if name not in state.active:
            continue
        if run.status == "retry_wait":
            _step_retry(r, name, run)
        elif run.iteration is not None:
            _iterator(r, name, run, by_step.get(name, []))
        for work in by_step.get(name, []):
            if work.command_id not in r.work_seen:
                _work(r, work)
    for work in state.work.values():       # work of a step that is not active: never expected, never hidden
        if work.command_id not in r.work_seen:
            _work(r, work)
    for name in state.pending:
        _pending(r, name)
    for key, due in state.timers.items():
        if key not in r.timers_seen:
            r.add("timer", None, f"timer `{key}` due at {_clock(due)} ({_until(now, due)})", key=key, due=_at(due))
    if not r.items:
        r.add("idle", None, "nothing in flight and nothing pending: the execution completes on its next message")
    return r.items


def _work(r: _Reader, work: Work) -> None:
    """One command in flight: who has it, since when, and the deadline that ends it if nobody answers."""
    r.work_seen.add(work.command_id)
    now = r.now
    who = f"step `{work.step}`" + (f" item {work.index}" if work.index is not None else "")
    max_attempts = r.max_attempts(work.step, work.index is not None)
    of = f" of {max_attempts}" if max_attempts else ""
    lease_key = f"lease:{work.command_id}"
    due = r.timer(lease_key)
    fields: dict[str, Any] = {"command_id": work.command_id, "attempt": work.attempt, "max_attempts": max_attempts,
                              "visit": work.visit, "phase": work.phase, "dispatched": _at(work.dispatched),
                              "worker_id": work.worker_id}
    if due is not None:
        fields["lease_until"] = _at(due)
    if work.child_execution_id:
        fields["child_execution_id"] = work.child_execution_id
        text = f"{who} waits for child execution `{_short(work.child_execution_id)}` (running)"
        if due is not None:
            text += f"; timer of step timeout at {_clock(due)} ({_until(now, due)})"
        else:
            text += ", no timeout"
        r.add("child", work.step, text, work.index, **fields)
        return
    kind: ItemKind = "save" if work.phase == "save" and not _is_control(r, work.step) else "attempt"
    what = f"{who} saving its result" if kind == "save" else f"{who} attempt {work.attempt}{of}"
    if work.infra_retries:
        fields.update(infra_retries=work.infra_retries, lease_retries=r.s.lease_retries)
    if work.started is None:
        resend = r.timer(f"resend:{work.command_id}")
        infra = f"infrastructure retry {work.infra_retries} of {r.s.lease_retries}"
        if resend is not None:
            fields["resend_at"] = _at(resend)
            last = f" (`{work.worker_id}`)" if work.worker_id else ""
            text = (f"{what} lost its worker{last}: lease expired; sent again at {_clock(resend)} "
                    f"({_until(now, resend)}), {infra}")
        elif work.infra_retries:
            text = (f"{what} sent again {_ago(now, work.dispatched)} after a lost lease ({infra}), not yet taken "
                    f"by a worker")
        else:
            text = (f"{what} dispatched {_ago(now, work.dispatched)}, not yet taken by a worker "
                    f"(no lease until a worker starts it)")
        r.add(kind, work.step, text, work.index, **fields)
        return
    fields["started"] = _at(work.started)
    parts = [f"{what} on worker `{work.worker_id}`" if work.worker_id else what, f"started {_ago(now, work.started)}"]
    if work.infra_retries:
        parts[0] += f" (sent {work.infra_retries + 1} times: lost leases)"
    if work.heartbeat is not None:
        fields["heartbeat"] = _at(work.heartbeat)
        parts.append(f"last heartbeat {_ago(now, work.heartbeat)}")
    else:
        parts.append("no heartbeat yet")
    if due is not None:
        timeout = _timeout(r, work)
        reason = f" (step timeout {timeout:g} s + grace)" if timeout is not None else ""
        parts.append(f"lease until {_clock(due)}{reason}, {_until(now, due)}")
        fields["timeout"] = timeout
    r.add(kind, work.step, ", ".join(parts), work.index, **fields)


def _is_control(r: _Reader, name: str) -> bool:
    step = r.step_spec(name)
    return step is not None and step.is_control


def _timeout(r: _Reader, work: Work) -> float | None:
    run = r.s.steps.get(work.step)
    if run is None:
        return None
    if work.index is not None:
        action = run.iteration.actions.get(work.index) if run.iteration else None
    else:
        action = run.action
    return action.timeout if action is not None else None


def _step_retry(r: _Reader, name: str, run: StepRun) -> None:
    max_attempts = r.max_attempts(name, item=False)
    of = f" of {max_attempts}" if max_attempts else ""
    due = r.timer(f"retry:{name}")
    fields: dict[str, Any] = {"attempt": run.attempt, "max_attempts": max_attempts, "visit": run.visit}
    if due is None:   # a zero delay retries at once, so a waiting step always has its timer; say so if not
        r.add("retry", name, f"retry of `{name}` waits (attempt {run.attempt}{of}) with no timer", **fields)
        return
    fields["due"] = _at(due)
    r.add("retry", name, f"retry of `{name}` due at {_clock(due)} ({_until(r.now, due)}) (attempt {run.attempt}{of})",
          **fields)


def _iterator(r: _Reader, name: str, run: StepRun, works: list[Work]) -> None:
    it = run.iteration
    assert it is not None
    step = r.step_spec(name)
    spec = step.iterator if step is not None else None
    concurrency = (spec.concurrency if spec.mode == "async" else 1) if spec is not None else None
    waiting = {i for i in it.attempts if f"retry:{name}:{i}" in r.s.timers}
    running = len(it.attempts) - len(waiting)
    parts = [f"{len(it.results)} of {it.size} done", f"{running} running"]
    if waiting:
        parts.append(f"{len(waiting)} waiting to retry")
    if it.failed:
        parts.append(f"{len(it.failed)} failed (no new item starts; the step fails once the running ones settle)")
    if concurrency is not None:
        parts.append(f"concurrency {concurrency}")
    r.add("iterator", name, f"iterator `{name}`: " + ", ".join(parts), size=it.size, done=len(it.results),
          running=running, retry_wait=len(waiting), failed=sorted(it.failed), concurrency=concurrency,
          next_index=it.next_index)
    summary = r.items[-1]
    items = sorted(works, key=lambda w: (w.index is None, w.index or 0))
    described = 0
    for index in sorted(waiting):
        if described < DETAIL_LIMIT:
            due = r.timer(f"retry:{name}:{index}")
            assert due is not None
            max_attempts = r.max_attempts(name, item=True)
            of = f" of {max_attempts}" if max_attempts else ""
            r.add("retry", name, f"retry of `{name}` item {index} due at {_clock(due)} ({_until(r.now, due)}) "
                  f"(attempt {it.attempts[index]}{of})", index, attempt=it.attempts[index],
                  max_attempts=max_attempts, due=_at(due))
        else:
            r.timers_seen.add(f"retry:{name}:{index}")
        described += 1
    for work in items:
        if work.index is None or described < DETAIL_LIMIT:
            _work(r, work)
        else:
            r.work_seen.add(work.command_id)
            r.timers_seen.add(f"lease:{work.command_id}")
        described += work.index is not None
    hidden = described - DETAIL_LIMIT
    if hidden > 0:
        summary.fields["not_listed"] = hidden
        summary.text += f" ({hidden} item(s) in flight or waiting not listed below)"


def _pending(r: _Reader, name: str) -> None:
    """A step targeted by an edge that waits for every step that can still reach it (DSL §3's join rule)."""
    s = r.s
    arrivals = len(s.pending[name].arrivals)
    reach = r.compiled.reach if r.compiled else None
    blockers: list[str] = []
    described: list[str] = []
    if name in s.active:
        blockers.append(name)
        described.append(f"its previous visit (`{name}`, {s.steps[name].status.replace('_', ' ')})")
    if reach is not None:
        for other in s.active:
            if other != name and reach.can_reach(other, name):
                blockers.append(other)
                described.append(f"`{other}` ({s.steps[other].status.replace('_', ' ')})")
        for other in s.pending:
            if other != name and reach.can_reach(other, name):
                behind = sorted(a for a in s.active if reach.can_reach(a, other))
                blockers.append(other)
                if behind:
                    described.append(f"`{other}` (pending behind {_names(behind)})")
                else:
                    described.append(f"`{other}` (pending)")
    join = _incoming(r, name) > 1
    label = f"join `{name}`" if join else f"step `{name}`"
    if described:
        text = f"{label} waits for {_and(described)}"
    else:
        text = f"{label} is ready and is dispatched on the next message"
    text += f" ({arrivals} arrival{'s' if arrivals != 1 else ''} so far)" if join else ""
    r.add("pending", name, text, arrivals=arrivals, join=join, blocked_by=sorted(set(blockers)))


def _incoming(r: _Reader, name: str) -> int:
    if r.compiled is None:
        return 0
    return sum(1 for step in r.compiled.playbook.steps.values() if name in edge_targets(step.next))


def _names(names: list[str]) -> str:
    return _and([f"`{n}`" for n in names])


def _and(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
