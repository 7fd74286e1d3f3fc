"""Fold primitives for the v10 constructs that gate a run (docs/dialect-v10.md, "Decisions"): the executor's
final step (V10-1.8), `no_next_is_error` (V10-1.8/5.6) and step admission (V10-5.9). Pure; called from the
fold, lifecycle and dispatch only for v10 playbooks that use them.

final step: it runs once, when nothing else is pending or in flight, whatever the workflow's outcome. A step
failure (one no failure arc handles) stops routing: no new step starts, the steps in flight finish (their
results are recorded, their arcs do not fire), then the final step runs and the execution ends FAILED with
the first failure. A cancel does not run it (a cancel stops everything now). Its input carries a summary of
the run under `workflow` (V10-1.8 leaves the shape open; upstream's spec asks for one).
"""
from __future__ import annotations

from typing import Any

from noetl_common.dsl.models import Step
from noetl_common.engine import v10
from noetl_common.engine.tick import Tick
from noetl_common.state import Pending

FINAL_INPUT = "workflow"


def final_due(tick: Tick) -> bool:
    """The playbook has a final step that has not started yet."""
    final = tick.playbook.final
    return final is not None and final not in tick.state.steps and final not in tick.state.pending


def start_final(tick: Tick) -> bool:
    """At quiescence: queue the final step (once) with the run's summary as its input. True if queued."""
    if not final_due(tick):
        return False
    s = tick.state
    done = [n for n, r in s.steps.items() if r.status == "completed"]
    failed = [n for n, r in s.steps.items() if r.status == "failed"]
    summary = {"status": "FAILED" if s.error else "COMPLETED", "error": s.error, "execution_id": s.execution_id,
               "completed_steps": done, "failed_steps": failed}
    s.pending[tick.playbook.final] = Pending(arrivals=[{FINAL_INPUT: summary}])
    return True


def wind_down(tick: Tick, name: str, error: str) -> bool:
    """A step failed and no failure arc took it. With a final step still to run, the run winds down instead
    of failing at once: True. (The final step's own failure, or any failure without one: False.)"""
    s = tick.state
    if s.winding_down:   # a second failure while winding down: the first one stays the execution's error
        return True
    if not final_due(tick):
        return False
    s.error = s.error or f"step '{name}' failed: {error}"
    s.winding_down = True
    s.pending.clear()    # arrivals queued before the failure start no step
    return True


def final_error(tick: Tick, name: str, error: str) -> str:
    """The execution's error when the final step fails: the workflow's first failure (if any) and this one."""
    own = f"final step '{name}' failed: {error}"
    return f"{tick.state.error}; {own}" if tick.state.error else own


def admission(step: Step, context: dict[str, Any], edge_data: dict[str, Any]) -> tuple[bool, str | None]:
    """V10-5.9: (allowed, the deciding rule's path). The first rule whose `when` holds (undefined = false, as
    every v10 `when`) or the else rule decides; no match allows. Raises StepError for a broken `when`."""
    scope = {**context, "input": edge_data, "args": edge_data, "event": {"name": "step.enter", "step": step.name}}
    for rule in step.admit:
        if v10.holds(rule["when"], scope, rule["path"]):
            return bool(rule["allow"]), rule["path"]
    return True, None


def no_match_error(tick: Tick, step: Step, fired: int) -> str | None:
    """`no_next_is_error: true`: a step with arcs none of which fired fails (a step without `next` still ends
    its branch: it has nothing to miss). None when routing is fine."""
    if not tick.playbook.no_next_is_error or not step.next or fired or tick.state.winding_down:
        return None
    return (f"no next arc matched ({len(step.next)} arc{'s' if len(step.next) != 1 else ''}) and "
            f"executor.spec.no_next_is_error is true")



def fire_list(edges: list, scope: dict[str, Any]) -> list:
    """A v2 list `next` (V10-5.10): exactly v1 §3 (every entry whose `when` holds fires, a then/else entry
    fires one of its lists, and only if nothing fired do the unconditional entries), with v10's lenient
    `when` (V10-5.3: undefined = false)."""
    fired: list = []
    defaults: list = []
    any_fired = False
    for edge in edges:
        if edge.then is not None or edge.otherwise is not None:
            chosen = edge.then if v10.holds(edge.when, scope, edge.path) else edge.otherwise
            fired.extend(fire_list(chosen or [], scope))
            any_fired = True
        elif edge.when is not None:
            if v10.holds(edge.when, scope, edge.path):
                fired.append(edge)
                any_fired = True
        else:
            defaults.append(edge)
    return fired if any_fired else defaults
