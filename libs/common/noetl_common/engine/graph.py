"""The playbook graph: which steps can reach which (for joins), and which edges fire (routing, DSL §3)."""
from __future__ import annotations

from typing import Any

from noetl_common.dsl.models import Edge, Playbook
from noetl_common.engine.errors import StepError
from noetl_common.render import TemplateError, evaluate, render, truthy


def edge_targets(edges: list[Edge]) -> set[str]:
    targets: set[str] = set()
    for edge in edges:
        if edge.step:
            targets.add(edge.step)
        targets |= edge_targets(edge.then or []) | edge_targets(edge.otherwise or [])
    return targets


class Reach:
    """Which steps can reach which, as one integer bitset per step (fast to build, fast to query)."""

    def __init__(self, playbook: Playbook) -> None:
        names = list(playbook.steps)
        self.bit = {name: 1 << i for i, name in enumerate(names)}
        successors = {name: [t for t in edge_targets(step.next) if t in self.bit]
                      for name, step in playbook.steps.items()}
        reach = dict.fromkeys(names, 0)
        changed = True
        while changed:          # a fixpoint; reverse document order settles forward chains in one pass
            changed = False
            for name in reversed(names):
                bits = reach[name]
                for target in successors[name]:
                    bits |= self.bit[target] | reach[target]
                if bits != reach[name]:
                    reach[name], changed = bits, True
        self.reach = reach

    def can_reach(self, origin: str, target: str) -> bool:
        return bool(self.reach.get(origin, 0) & self.bit.get(target, 0))


def reachability(playbook: Playbook) -> Reach:
    return Reach(playbook)


def ready_steps(pending: list[str], active: set[str], reach: Reach) -> list[str]:
    """Pending steps that no other active or pending step can still reach (the join rule of DSL §3).

    A step whose previous visit is still active waits for it. If only pending steps block each other (a
    cycle in the graph with nothing running), the earliest one goes first so that nothing hangs.
    """
    ready = []
    for name in pending:
        if name in active:
            continue
        blocked = any(reach.can_reach(other, name) for other in active) or any(
            other != name and reach.can_reach(other, name) for other in pending)
        if not blocked:
            ready.append(name)
    if not ready and pending and not active:
        ready.append(pending[0])
    return ready


def fire(edges: list[Edge], context: dict[str, Any]) -> list[Edge]:
    """Every conditional entry whose `when` is truthy fires; a then/else entry always fires one list; if
    nothing fired, every unconditional entry fires (the default). Raises StepError on a bad `when`."""
    fired: list[Edge] = []
    defaults: list[Edge] = []
    any_fired = False
    for edge in edges:
        if edge.then is not None or edge.otherwise is not None:
            chosen = edge.then if (edge.when is None or _holds(edge, context)) else edge.otherwise
            fired.extend(fire(chosen or [], context))
            any_fired = True
        elif edge.when is not None:
            if _holds(edge, context):
                fired.append(edge)
                any_fired = True
        else:
            defaults.append(edge)
    return fired if any_fired else defaults


def _holds(edge: Edge, context: dict[str, Any]) -> bool:
    try:
        return truthy(evaluate(edge.when or "", context))
    except TemplateError as exc:
        raise StepError(f"when '{edge.when}' ({edge.path}) failed: {exc}") from exc


def edge_data(edge: Edge, context: dict[str, Any]) -> dict[str, Any]:
    try:
        return render(edge.data, context) if edge.data else {}
    except TemplateError as exc:
        raise StepError(f"edge data to '{edge.step}' ({edge.path}) failed: {exc}") from exc
