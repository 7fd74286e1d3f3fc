"""The second front end: a NoETL DSL v2/v10 document -> the same `Playbook` model the v1 front end builds.

Contract: ../shared/docs/playbook-dsl-v10.md (rules cited as V10-x.y); settled rules: docs/dialect-v10.md.
A step's tool (one mapping, or a pipeline list) becomes one `type: pipeline` action that a worker runs task
by task (rendering each task just before it runs, V10-4.2); `kind: playbook` is the v1 child action and
`kind: noop` a control step. `next: {spec, arcs}` becomes edges with `Step.next_mode`; `set` stays raw and is
applied by the fold (engine/v10.py). Nothing here raises: problems go to `Issues` with location paths.
"""
from __future__ import annotations

from typing import Any

from . import v10_gates as gates
from .models import Edge, IteratorSpec, Playbook, RetryPolicy, Step
from .v10_tools import RUNNABLE_KINDS, UNSUPPORTED_KINDS, action_of, duration, sets_of  # noqa: F401 (re-exported)
from .validate import Issues, identity


def v1_edges(value: Any, path: str, issues: Issues) -> list[Edge]:
    from .normalise import edges   # normalise imports validate, as this module does: no cycle at load
    return edges(value, path, issues)


def v1_retry(value: Any, path: str, issues: Issues) -> RetryPolicy | None:
    from .normalise import _retry
    return _retry(value, path, issues)


ROOT_KEYS = {"apiVersion", "kind", "metadata", "executor", "keychain", "workload", "workbook", "workflow", "ctx",
             "name", "path", "description"}
STEP_KEYS = {"step", "desc", "description", "spec", "input", "args", "loop", "tool", "set", "set_ctx", "next",
             "output"}
LEGACY_STEP_KEYS = ("type", "when", "case", "result", "outcome", "set_iter", "sink", "save", "vars")
RESERVED = {"execution_id", "catalog_id", "job", "event", "output", "result", "iter", "ctx", "workload", "input",
            "keychain", "secret"}
TOOL_KEYS = ("command", "code", "url", "query", "sql", "kind", "auth", "method", "headers", "path", "database")


def normalise_v10(doc: dict, dialect: str, issues: Issues) -> Playbook | None:
    """The Playbook of a v2/v10 document (None when a problem makes it unusable)."""
    for key in doc:
        if key not in ROOT_KEYS:
            issues.error(key, f"unknown root key '{key}' (NoETL DSL v2/v10 root keys: "
                              f"{', '.join(sorted(ROOT_KEYS - {'name', 'path', 'description'}))})")
    api = doc.get("apiVersion")
    if api not in ("noetl.io/v1", "noetl.io/v2", "noetl.io/v10"):
        issues.error("apiVersion", f"apiVersion must be noetl.io/v2 or noetl.io/v10 for this dialect, got {api!r}")
    elif api == "noetl.io/v1":
        issues.warn("apiVersion", "a NoETL DSL v2/v10 document under apiVersion noetl.io/v1: read as v10")
    if doc.get("kind") != "Playbook":
        issues.error("kind", f"kind must be 'Playbook', got {doc.get('kind')!r}")
    if not isinstance(doc.get("metadata"), dict) or not doc["metadata"].get("name"):
        issues.error("metadata", "metadata.name is required")
    raw_steps = doc.get("workflow")
    if not isinstance(raw_steps, list) or not raw_steps:
        issues.error("workflow", "workflow must be a non-empty list of steps")
        return None
    workbook = _workbook(doc.get("workbook"), issues)
    if dialect == "v2":
        _v2_unsupported(raw_steps, issues)
    steps: dict[str, Step] = {}
    for i, raw in enumerate(raw_steps):
        path = f"workflow[{i}]"
        step = _step(raw, path, dialect, workbook, issues)
        if step is None:
            continue
        if step.name in steps:
            issues.error(f"{path}.step", f"duplicate step name '{step.name}'")
            continue
        steps[step.name] = step
    _check_targets(steps, issues)
    entry = _entry(doc, raw_steps, steps, issues)
    final = gates.final_step(doc, steps, entry, issues)
    no_next_is_error = gates.no_next_is_error(doc, issues)
    gates.alias_clashes(raw_steps, steps, issues)
    if issues.error_count:
        return None
    name, path = identity(doc)
    meta = doc["metadata"]
    ctx = doc.get("ctx")
    return Playbook(api_version=str(api), name=name, path=path,
                    version=None if meta.get("version") is None else str(meta.get("version")),
                    description=None if meta.get("description") is None else str(meta.get("description")),
                    workload=doc.get("workload") if isinstance(doc.get("workload"), dict) else {},
                    steps=steps, dialect="v10" if dialect == "v10" else "v2", entry=entry,
                    ctx=ctx if isinstance(ctx, dict) else {}, final=final, no_next_is_error=no_next_is_error)


def _entry(doc: dict, raw_steps: list, steps: dict[str, Step], issues: Issues) -> str:
    executor = doc.get("executor") if isinstance(doc.get("executor"), dict) else {}
    spec = executor.get("spec") if isinstance(executor.get("spec"), dict) else {}
    entry = spec.get("entry_step")
    if entry is not None:
        if not isinstance(entry, str) or entry not in steps:
            issues.error("executor.spec.entry_step", f"entry_step {entry!r} names no step")
        return str(entry)
    first = raw_steps[0].get("step") if isinstance(raw_steps[0], dict) else None
    if "start" in steps and first != "start":
        issues.warn("workflow", "a step named 'start' that is not the first step is not the entry (V10-1.7)")
    return str(first or "")


def _workbook(value: Any, issues: Issues) -> dict[str, tuple[str, dict]]:
    if value is None:
        return {}
    if not isinstance(value, list):
        issues.error("workbook", "workbook must be a list of {name, tool} entries")
        return {}
    out: dict[str, tuple[str, dict]] = {}
    for i, entry in enumerate(value):
        path = f"workbook[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            issues.error(path, "a workbook entry needs name: and tool:")
            continue
        out.setdefault(entry["name"], (path, entry))
    return out


def _step(raw: Any, path: str, dialect: str, workbook: dict, issues: Issues) -> Step | None:
    if not isinstance(raw, dict):
        issues.error(path, f"a step must be a mapping, got {type(raw).__name__}")
        return None
    name = raw.get("step")
    if not isinstance(name, str) or not name.strip():
        issues.error(f"{path}.step", f"a step needs a name (step: <name>), got {name!r}")
        return None
    name = name.strip()
    if dialect == "v2":
        raw = _from_v2(raw, name, path, issues)
        if raw is None:
            return Step(name=name, path=path)
    if name in RESERVED:
        issues.error(f"{path}.step", f"'{name}' is a reserved template name (V10-6.1): rename the step")
    allowed = STEP_KEYS | ({"retry", "timeout"} if dialect == "v2" else set())
    for key in raw:
        if key in allowed:
            continue
        if key in LEGACY_STEP_KEYS:
            issues.error(f"{path}.{key}", f"step '{name}': step key '{key}' is not part of NoETL DSL v10 (V10-2.1)")
        else:
            hint = " (it belongs inside tool:)" if key in TOOL_KEYS else ""
            issues.error(f"{path}.{key}", f"step '{name}': unknown step key '{key}'{hint} (NoETL DSL v2/v10 step "
                                          f"keys: {', '.join(sorted(STEP_KEYS))})")
    for alias in ("args", "set_ctx"):
        if alias in raw:
            issues.warn(f"{path}.{alias}", f"'{alias}' is an older v10 key: read as "
                                           f"{'input' if alias == 'args' else 'set with ctx. keys'}")
    data = _inputs(raw, path, issues)
    sets = sets_of(raw.get("set"), f"{path}.set", issues)
    alias = gates.output_alias(raw.get("output"), f"{path}.output", issues)
    if alias is not None:   # V10-10.3: an extra name for the step's result, an implicit step `set`
        sets = {alias: "{{ result }}", **sets}
    if isinstance(raw.get("set_ctx"), dict):
        sets.update({f"ctx.{k}": v for k, v in raw["set_ctx"].items()})
    if dialect == "v2" and not isinstance(raw.get("next"), dict):   # V10-5.10: a v2 list is v1's next
        edges, mode = v1_edges(raw.get("next"), f"{path}.next", issues), "all"
    else:
        edges, mode = _next(raw.get("next"), f"{path}.next", issues)
    timeout = _step_timeout(raw.get("spec"), f"{path}.spec", issues)
    tool = raw.get("tool")
    if tool is None and dialect == "v2" and name in ("start", "end"):   # V10-2.3: v2 control steps
        return Step(name=name, path=path, next=edges, next_mode=mode, set=sets, data=data)
    if tool is None:
        issues.error(f"{path}.tool", f"step '{name}' has no tool: every v10 step has one (use `kind: noop` "
                                     f"for pure routing)" + _misplaced(raw))
        return Step(name=name, path=path)   # still a step, so arcs to it are not reported as well
    action = action_of(name, tool, f"{path}.tool", workbook, issues)
    if action is None:   # still a step, so its arcs (and arcs to it) are checked too
        return Step(name=name, path=path, next=edges)
    if dialect == "v2":   # V10-9.5: v2 step retry/timeout are v1's
        timeout = duration(raw["timeout"], f"{path}.timeout", issues) if raw.get("timeout") is not None else timeout
    common = dict(name=name, desc=_text(raw.get("desc", raw.get("description"))), path=path, next=edges,
                  next_mode=mode, set=sets, timeout=timeout,
                  admit=gates.admit_rules(raw.get("spec"), f"{path}.spec", issues),
                  retry=v1_retry(raw.get("retry"), f"{path}.retry", issues) if dialect == "v2" else None)
    if isinstance(action.data, dict) and action.data:   # a child playbook's own input, under the step's
        data = _merge_data(action.data, data)
    loop = raw.get("loop")
    if loop is not None:
        task = action.model_copy(update=dict(name=name, data=data, path=f"{path}.tool"))
        spec = _loop(loop, f"{path}.loop", task, issues)
        if spec is None:
            return None
        return Step(type="iterator", iterator=spec, **common)
    return action.model_copy(update={**common, "data": data})


V2_STEP_KEYS = {"step", "desc", "description", "tool", "args", "input", "loop", "next", "retry", "timeout"}
V2_UNSUPPORTED = {"case": "v2 `case` rules", "sink": "v2 `sink`", "save": "v2 `save` (a sink)",
                  "vars": "v2 `vars`", "assert": "v2 `assert`"}
V2_CONTROL_KINDS = ("router", "end")   # V10-2.14: v2 `router` = noop, v2 `end` = a control step


def _v2_unsupported(raw_steps: list, issues: Issues) -> None:
    """`case`, `sink`/`save`, `vars` and `assert` on v2 steps (v2 event rules, sinks and variables) are not run
    by this engine: one load error at the first use, naming each construct and the steps using it (a
    document is rejected once for what it needs, not once per step)."""
    first, parts = None, []
    for key, what in V2_UNSUPPORTED.items():
        users = [(i, raw.get("step")) for i, raw in enumerate(raw_steps) if isinstance(raw, dict) and key in raw]
        if users:
            first = min(first, users[0][0]) if first is not None else users[0][0]
            names = ", ".join(f"'{name}'" for _, name in users[:5]) + (", ..." if len(users) > 5 else "")
            parts.append(f"{what} (step{'s' if len(users) > 1 else ''} {names})")
    if parts:
        key = next(k for k in V2_UNSUPPORTED if k in raw_steps[first])
        issues.error(f"workflow[{first}].{key}", f"{'; '.join(parts)}: not supported by this engine (NoETL DSL "
                                                 f"v2); write the steps in the v10 dialect (next arcs, set, policies)")


def _from_v2(raw: dict, name: str, path: str, issues: Issues) -> dict | None:
    """V10-2.2/2.6: a v2 step as the v10 shape: `tool: K` takes the step's kind keys; a step using what this
    engine does not run (V2_UNSUPPORTED, reported once by `_v2_unsupported`) is None."""
    if any(key in raw for key in V2_UNSUPPORTED):
        return None
    out = {k: v for k, v in raw.items() if k in V2_STEP_KEYS}
    tool = raw.get("tool")
    moved = {k: v for k, v in raw.items() if k not in V2_STEP_KEYS}
    if tool in V2_CONTROL_KINDS or (isinstance(tool, dict) and tool.get("kind") in V2_CONTROL_KINDS):
        tool = "noop"
    if isinstance(tool, str):
        out["tool"] = {"kind": tool, **moved}
    elif moved:
        for key in moved:
            issues.error(f"{path}.{key}", f"step '{name}': unknown step key '{key}' (NoETL DSL v2)")
        return None
    return out


def _misplaced(raw: dict) -> str:
    keys = [k for k in ("command", "code", "url", "query", "kind") if k in raw]
    return f"; '{keys[0]}' belongs inside tool:" if keys else ""


def _merge_data(base: dict, data: dict | str) -> dict | str:
    if isinstance(data, str):
        return data
    return {**base, **data}


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _inputs(raw: dict, path: str, issues: Issues) -> dict | str:
    value = raw.get("input", raw.get("args"))
    if value is None:
        return {}
    if isinstance(value, (dict, str)):
        return value
    issues.error(f"{path}.input", f"input must be a mapping (or one {{{{ expr }}}}), got {type(value).__name__}")
    return {}


STEP_SPEC_KEYS = {"timeout", "policy"}
STEP_POLICY_KEYS = {"admit"}
STEP_POLICY_IGNORABLE = {"lifecycle", "failure", "emit"}   # V10-2.4: hints for upstream's runtime


def _step_timeout(spec: Any, path: str, issues: Issues) -> float | None:
    """Step `spec` (V10-2.4): `timeout` is read here, `policy.admit` by gates.admit_rules. Any other key is a
    load error (V10-1.3: never silently ignored); `policy.lifecycle/failure/emit` are ignorable (a warning)."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        issues.error(path, f"step spec must be a mapping (timeout, policy), got {type(spec).__name__}")
        return None
    for key in spec:
        if key not in STEP_SPEC_KEYS:
            issues.error(f"{path}.{key}", f"unknown step spec key '{key}' (NoETL DSL v2/v10 step spec keys: "
                                          f"{', '.join(sorted(STEP_SPEC_KEYS))})")
    policy = spec.get("policy")
    if policy is not None and not isinstance(policy, dict):
        issues.error(f"{path}.policy", f"step spec.policy must be a mapping (admit), got {type(policy).__name__}")
    elif isinstance(policy, dict):
        for key in policy:
            if key in STEP_POLICY_IGNORABLE:
                issues.warn(f"{path}.policy.{key}", f"step spec.policy.{key} is a runtime hint: ignored (V10-2.4)")
            elif key not in STEP_POLICY_KEYS:
                issues.error(f"{path}.policy.{key}", f"unknown step spec.policy key '{key}' (NoETL DSL v2/v10: "
                                                     f"admit; ignorable: {', '.join(sorted(STEP_POLICY_IGNORABLE))})")
    if spec.get("timeout") is None:
        return None
    return duration(spec["timeout"], f"{path}.timeout", issues)


def _next(value: Any, path: str, issues: Issues) -> tuple[list[Edge], str]:
    if value is None:
        return [], "exclusive"
    if not isinstance(value, dict) or not isinstance(value.get("arcs"), list):
        issues.error(path, "next must be a mapping with arcs: [...] (V10-5.1)")
        return [], "exclusive"
    spec = value.get("spec") if isinstance(value.get("spec"), dict) else {}
    mode = str(spec.get("mode") or "exclusive").lower()
    if mode not in ("exclusive", "inclusive"):
        issues.error(f"{path}.spec.mode", f"next mode must be exclusive or inclusive, got {spec.get('mode')!r}")
        mode = "exclusive"
    edges = []
    for i, arc in enumerate(value["arcs"]):
        where = f"{path}.arcs[{i}]"
        if not isinstance(arc, dict) or not isinstance(arc.get("step"), str):
            issues.error(where, "an arc needs step: <name>")
            continue
        for key in arc:
            if key not in ("step", "when", "set", "args", "input"):
                issues.error(f"{where}.{key}", f"unknown arc key '{key}' (step, when, set)")
        when = arc.get("when")
        if when is not None and not isinstance(when, str):
            when = "true" if when is True else "false" if when is False else str(when)
        data = arc.get("args", arc.get("input")) or {}
        if not isinstance(data, dict):
            issues.error(f"{where}.args", "arc args must be a mapping")
            data = {}
        edges.append(Edge(step=arc["step"], when=when, data=data, set=sets_of(arc.get("set"), f"{where}.set", issues),
                          path=where))
    return edges, mode


def _check_targets(steps: dict[str, Step], issues: Issues) -> None:
    for step in steps.values():
        for edge in step.next:
            if edge.step not in steps:
                issues.error(f"{edge.path}.step", f"arc target '{edge.step}' names no step")
        for key in step.set:
            head = key.split(".", 1)[0] if key.startswith(("ctx.", "step.")) else None
            target = key.split(".", 1)[1].split(".")[0] if head else key.split(".")[0]
            if target in steps and not key.startswith("iter."):
                issues.error(f"{step.path}.set.{key}", f"set key '{key}' names step '{target}' (V10-7.7)")


def _loop(loop: Any, path: str, task: Step, issues: Issues) -> IteratorSpec | None:
    if not isinstance(loop, dict):
        issues.error(path, "loop must be a mapping (in, iterator, spec)")
        return None
    if "cursor" in loop:
        issues.error(f"{path}.cursor", "loop.cursor (cursor loops over an external database) is not supported by "
                                       "this engine (V10-8.7)")
        return None
    element = loop.get("iterator")
    if not isinstance(element, str) or not element.isidentifier():
        issues.error(f"{path}.iterator", f"loop needs iterator: <plain name>, got {element!r}")
        return None
    if "in" not in loop:
        issues.error(path, "loop needs in: <list or {{ expr }}>")
        return None
    spec = loop.get("spec") if isinstance(loop.get("spec"), dict) else {}
    mode = str(spec.get("mode", loop.get("mode")) or "sequential").lower()
    if mode == "cursor":
        issues.error(f"{path}.spec.mode", "loop mode cursor is not supported by this engine (V10-8.7)")
        return None
    mode = "async" if mode in ("parallel", "async") else "sequential"
    cap = spec.get("max_in_flight", 1)
    if not isinstance(cap, int) or cap < 1:
        if isinstance(cap, str) and cap.strip().isdigit():
            cap = int(cap)
        else:
            issues.warn(f"{path}.spec.max_in_flight", f"max_in_flight {cap!r} is not a fixed integer: 1 is used")
            cap = 1
    if mode == "async" and "max_in_flight" not in spec:
        issues.warn(f"{path}.spec", "a parallel loop without max_in_flight runs one iteration at a time (V10-8.3)")
    return IteratorSpec(collection=loop["in"], element=element, mode=mode, concurrency=cap if mode == "async" else 1,
                        task=task, collect_all=True)
