"""Playbook builders and statistics shared by the benchmarks."""
from __future__ import annotations

import statistics
from typing import Any

TRIVIAL = "def main(n=0):\n    return n\n"


def chain(steps: int) -> dict[str, Any]:
    names = [f"s{i}" for i in range(steps)]
    workflow: list[dict[str, Any]] = [{"step": "start", "next": [{"step": names[0]}]}]
    for i, name in enumerate(names):
        target = names[i + 1] if i + 1 < steps else "end"
        workflow.append({"step": name, "type": "python", "data": {"n": i}, "code": TRIVIAL,
                         "next": [{"step": target}]})
    workflow.append({"step": "end"})
    return {"apiVersion": "noetl.io/v1", "kind": "Playbook",
            "metadata": {"name": f"chain{steps}", "path": f"bench/chain{steps}"}, "workflow": workflow}


def iterator(items: int, concurrency: int = 32) -> dict[str, Any]:
    return {"apiVersion": "noetl.io/v1", "kind": "Playbook",
            "metadata": {"name": f"iter{items}", "path": f"bench/iter{items}"},
            "workflow": [
                {"step": "start", "next": [{"step": "each"}]},
                {"step": "each", "type": "iterator", "collection": f"{{{{ range({items}) | list }}}}",
                 "element": "n", "mode": "async", "concurrency": concurrency,
                 "task": {"type": "python", "data": {"n": "{{ n }}"}, "code": TRIVIAL},
                 "next": [{"step": "end"}]},
                {"step": "end"}]}


def describe(samples: list[float]) -> str:
    return (f"median {statistics.median(samples):.3f}  min {min(samples):.3f}  max {max(samples):.3f}  "
            f"(n={len(samples)})")


def chain_v10(steps: int) -> dict[str, Any]:
    """The same chain as `chain(steps)` in NoETL DSL v10 (script python, exclusive arcs, one `noop` end)."""
    names = [f"s{i}" for i in range(steps)]
    workflow: list[dict[str, Any]] = [{"step": "start", "tool": {"kind": "noop"},
                                       "next": {"spec": {"mode": "exclusive"}, "arcs": [{"step": names[0]}]}}]
    for i, name in enumerate(names):
        target = names[i + 1] if i + 1 < steps else "end"
        workflow.append({"step": name, "input": {"n": i}, "tool": {"kind": "python", "code": "result = n"},
                         "next": {"spec": {"mode": "exclusive"}, "arcs": [{"step": target}]}})
    workflow.append({"step": "end", "tool": {"kind": "noop"}})
    return {"apiVersion": "noetl.io/v2", "kind": "Playbook",
            "metadata": {"name": f"chain{steps}_v10", "path": f"bench/chain{steps}_v10"}, "workflow": workflow}
