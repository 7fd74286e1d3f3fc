"""Which NoETL playbook dialect a document is written in, decided once, before any validation.

NoETL's syntax changed twice (contract: ../shared/docs/playbook-dsl-v10.md §1.1): "v1" (`type:` steps,
`next:` lists: what this engine's DSL page describes), "v2" (Nov 2025: `tool:` steps, `case:`, `sink:`,
`vars:`) and "v10" (Dec 2025 on: `next: {spec, arcs}`, pipelines, `set`/`input`). The dialect is read from
the keys of the steps, not from `apiVersion` (upstream published v2 playbooks under both `noetl.io/v1` and
`noetl.io/v2`). Deciding it up front means a document is never half-read as another dialect: a later-dialect
step read as v1 is a control step that runs nothing, and the run would report success without running.

Pure and cheap: it only looks at the step mappings (workflow steps, workbook entries and iterator tasks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Literal

DialectName = Literal["v1", "v2", "v10", "unknown"]

V2_STEP_KEYS = ("tool", "case", "sink", "vars")          # V10 §1.1: v2 markers on a step
V10_STEP_KEYS = ("set", "input")                         # V10 §1.1: v10 markers on a step (besides shapes)


@dataclass(frozen=True)
class Dialect:
    name: DialectName
    reason: str                 # what decided it, in words ("workflow[0].next is a mapping with 'arcs', …")
    path: str = ""              # where (a location path: problems point at its line)
    type_step: str | None = None   # a v2/v10 document's first `type:` step, if any (V10-1.1: mixing is an error)


def detect_dialect(doc: Any) -> Dialect:
    """The dialect of a parsed playbook document: the first v10 marker wins, else the first v2 marker,
    else v1. "unknown" when the document has no list of steps to judge by (the v1 validator then reports
    what is wrong with its shape)."""
    if not isinstance(doc, dict):
        return Dialect("unknown", f"the document is a {type(doc).__name__}, not a mapping")
    key = "workflow" if "workflow" in doc or "steps" not in doc else "steps"
    if not isinstance(doc.get(key), list):
        return Dialect("unknown", f"the document has no list of steps under '{key}'")
    steps = list(_step_mappings(doc, key))
    for path, step in steps:
        found = _v10_marker(step)
        if found:
            return Dialect("v10", f"{path}.{found[0]} {found[1]}", f"{path}.{found[0]}", _first_type_step(steps))
    for path, step in steps:
        for marker in V2_STEP_KEYS:
            if marker in step:
                return Dialect("v2", f"{path} has '{marker}:'", f"{path}.{marker}", _first_type_step(steps))
    return Dialect("v1", "no step uses v2/v10 keys (tool, case, sink, vars, set, input, next arcs)")


def _v10_marker(step: dict) -> tuple[str, str] | None:
    """(key, what it is) of the first v10 marker on one step, or None."""
    nxt, tool, loop = step.get("next"), step.get("tool"), step.get("loop")
    if isinstance(nxt, dict) and "arcs" in nxt:
        return "next", "is a mapping with 'arcs', the v10 router"
    if isinstance(tool, list):
        return "tool", "is a list, a v10 pipeline of tools"
    if isinstance(loop, dict) and "spec" in loop:
        return "loop", "has 'spec', a v10 step loop"
    if isinstance(tool, dict) and isinstance(tool.get("spec"), dict) and "policy" in tool["spec"]:
        return "tool", "has 'spec.policy', a v10 tool policy"
    for key in V10_STEP_KEYS:
        if key in step:
            return key, "is a v10 step key"
    return None


def _step_mappings(doc: dict, key: str) -> Iterator[tuple[str, dict]]:
    """Every step-like mapping with its location: workflow steps, workbook entries, iterator tasks."""
    sections = [(key, doc.get(key))]
    if isinstance(doc.get("workbook"), list):
        sections.append(("workbook", doc["workbook"]))
    for section, items in sections:
        for i, item in enumerate(items):
            yield from _with_tasks(f"{section}[{i}]", item, depth=0)


def _with_tasks(path: str, step: Any, depth: int) -> Iterator[tuple[str, dict]]:
    if not isinstance(step, dict) or depth > 8:      # bounded: a recursive YAML alias must not loop
        return
    yield path, step
    loop = step.get("loop")
    if isinstance(loop, dict) and "task" in loop:
        yield from _with_tasks(f"{path}.loop.task", loop["task"], depth + 1)
    if "task" in step:
        yield from _with_tasks(f"{path}.task", step["task"], depth + 1)


def _first_type_step(steps: list[tuple[str, dict]]) -> str | None:
    return next((path for path, step in steps if "type" in step), None)
