"""The second front end: a NoETL DSL v2/v10 document -> the same `Playbook` model the v1 front end builds.

Contract: ../shared/docs/playbook-dsl-v10.md (rules cited as V10-x.y); settled rules: docs/dialect-v10.md.
A step's tool (one mapping, or a pipeline list) becomes one `type: pipeline` action that a worker runs task
by task (rendering each task just before it runs, V10-4.2); `kind: playbook` is the v1 child action and
`kind: noop` a control step. `next: {spec, arcs}` becomes edges with `Step.next_mode`; `set` stays raw and is
applied by the fold (engine/v10.py). Nothing here raises: problems go to `Issues` with location paths.
"""
from __future__ import annotations

from typing import Any

from .models import Edge, IteratorSpec, Playbook, RetryPolicy, Step
from .validate import Issues, identity


def v1_edges(value: Any, path: str, issues: Issues) -> list[Edge]:
    from .normalise import edges   # normalise imports validate, as this module does: no cycle at load
    return edges(value, path, issues)


def v1_retry(value: Any, path: str, issues: Issues) -> RetryPolicy | None:
    from .normalise import _retry
    return _retry(value, path, issues)

RUNNABLE_KINDS = ("python", "http", "postgres", "duckdb", "secrets")   # run by the worker's pipeline action
# V10-2.14: kinds needing systems this project does not run: a load error naming step and kind.
UNSUPPORTED_KINDS = ("shell", "nats", "snowflake", "snowflake_transfer", "transfer", "gcs", "container",
                     "ducklake", "artifact", "subscription", "gateway", "agent", "mcp", "script", "rhai",
                     "result_fetch", "task_sequence", "iterator")
ROOT_KEYS = {"apiVersion", "kind", "metadata", "executor", "keychain", "workload", "workbook", "workflow", "ctx",
             "name", "path", "description"}
STEP_KEYS = {"step", "desc", "description", "spec", "input", "args", "loop", "tool", "set", "set_ctx", "next",
             "output"}
LEGACY_STEP_KEYS = ("type", "when", "case", "result", "outcome", "set_iter", "sink", "save", "vars")
RESERVED = {"execution_id", "catalog_id", "job", "event", "output", "result", "iter", "ctx", "workload", "input",
            "keychain", "secret"}
TOOL_KEYS = ("command", "code", "url", "query", "sql", "kind", "auth", "method", "headers", "path", "database")
TASK_META_KEYS = ("kind", "name", "spec", "output", "set")
MAX_TASKS = 100


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
                    ctx=ctx if isinstance(ctx, dict) else {})


def _entry(doc: dict, raw_steps: list, steps: dict[str, Step], issues: Issues) -> str:
    executor = doc.get("executor") if isinstance(doc.get("executor"), dict) else {}
    spec = executor.get("spec") if isinstance(executor.get("spec"), dict) else {}
    entry = spec.get("entry_step")
    if entry is not None:
        if entry not in steps:
            issues.error("executor.spec.entry_step", f"entry_step '{entry}' names no step")
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
    if "output" in raw:
        issues.warn(f"{path}.output", "step output (external result storage) is ignored: results stay inline")
    for alias in ("args", "set_ctx"):
        if alias in raw:
            issues.warn(f"{path}.{alias}", f"'{alias}' is an older v10 key: read as "
                                           f"{'input' if alias == 'args' else 'set with ctx. keys'}")
    data = _inputs(raw, path, issues)
    sets = _sets(raw.get("set"), f"{path}.set", issues)
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
    action = _action(name, tool, f"{path}.tool", workbook, issues)
    if action is None:   # still a step, so its arcs (and arcs to it) are checked too
        return Step(name=name, path=path, next=edges)
    if dialect == "v2":   # V10-9.5: v2 step retry/timeout are v1's
        timeout = duration(raw["timeout"], f"{path}.timeout", issues) if raw.get("timeout") is not None else timeout
    common = dict(name=name, desc=_text(raw.get("desc", raw.get("description"))), path=path, next=edges,
                  next_mode=mode, set=sets, timeout=timeout,
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
V2_UNSUPPORTED = {"case": "v2 `case` rules", "sink": "v2 `sink`", "vars": "v2 `vars`", "assert": "v2 `assert`"}


def _from_v2(raw: dict, name: str, path: str, issues: Issues) -> dict | None:
    """V10-2.2/2.6: a v2 step as the v10 shape: `tool: K` takes the step's kind keys; `case`, `sink` and
    `vars` (v2 event rules and variables) are not run by this engine: a load error naming them."""
    for key, what in V2_UNSUPPORTED.items():
        if key in raw:
            issues.error(f"{path}.{key}", f"step '{name}': {what} is not supported by this engine (NoETL DSL v2); "
                                          f"write the step in the v10 dialect (next arcs, set, policies)")
    if any(key in raw for key in V2_UNSUPPORTED):
        return None
    out = {k: v for k, v in raw.items() if k in V2_STEP_KEYS}
    tool = raw.get("tool")
    moved = {k: v for k, v in raw.items() if k not in V2_STEP_KEYS}
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


def _sets(value: Any, path: str, issues: Issues) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        issues.error(path, "set must be a mapping of scope.key: value")
        return {}
    return {str(k): v for k, v in value.items()}


def _step_timeout(spec: Any, path: str, issues: Issues) -> float | None:
    if not isinstance(spec, dict) or spec.get("timeout") is None:
        return None
    return duration(spec["timeout"], f"{path}.timeout", issues)


def duration(value: Any, path: str, issues: Issues) -> float | None:
    """`30`, `"30s"`, `"5m"`, `"1h"` -> seconds (V10-9.7)."""
    text = str(value).strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(text[-1:], None)
    try:
        seconds = float(text[:-1]) * scale if scale else float(text)
    except ValueError:
        issues.error(path, f"timeout must be seconds or '30s'/'5m'/'1h', got {value!r}")
        return None
    if seconds <= 0:
        issues.error(path, f"timeout must be positive, got {value!r}")
        return None
    return seconds


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
        edges.append(Edge(step=arc["step"], when=when, data=data, set=_sets(arc.get("set"), f"{where}.set", issues),
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


# ---------------------------------------------------------------- tools

def _action(name: str, tool: Any, path: str, workbook: dict, issues: Issues) -> Step | None:
    """The step's action: a `pipeline` step (tasks kept raw), a child playbook, or a noop control step."""
    if isinstance(tool, str):
        tool = {"kind": tool}
    if isinstance(tool, dict):
        kind = tool.get("kind")
        if kind == "workbook":
            tool = _from_workbook(tool, path, workbook, issues)
            if tool is None:
                return None
            kind = tool.get("kind")
        if kind == "noop":
            return Step(name=name, type=None, has_result="result" in tool, result=tool.get("result"), path=path)
        if kind == "playbook":
            return _playbook(name, tool, path, issues)
        task = _task(tool, f"{name}_task", path, issues)
        if task is None:
            return None
        single = not (isinstance(tool.get("spec"), dict) and tool["spec"].get("policy"))
        return Step(name=name, type="pipeline", config={"tasks": [task], "single": single, "whole": True},
                    path=path)
    if isinstance(tool, list):
        if not tool:
            issues.error(path, "a pipeline needs at least one task")
            return None
        if len(tool) > MAX_TASKS:
            issues.error(path, f"a pipeline has {len(tool)} tasks, over the limit of {MAX_TASKS}")
            return None
        tasks, names = [], set()
        for i, raw in enumerate(tool):
            where = f"{path}[{i}]"
            if isinstance(raw, dict) and "kind" not in raw and len(raw) == 1:
                issues.error(where, "the `- label: {kind: ...}` pipeline form was removed from NoETL DSL v10: "
                                    "write `- name: label` with `kind:` (V10-2.7)")
                continue
            if isinstance(raw, dict) and raw.get("kind") == "workbook":
                raw = _from_workbook(raw, where, workbook, issues)
                if raw is None:
                    continue
            task = _task(raw, f"task_{i}", where, issues)
            if task is None:
                continue
            if task["name"] in names:
                issues.error(f"{where}.name", f"task name '{task['name']}' is used twice in this pipeline")
            names.add(task["name"])
            tasks.append(task)
        for i, task in enumerate(tasks):
            _check_jumps(task, names, f"{path}[{i}]", issues)
        return Step(name=name, type="pipeline", config={"tasks": tasks, "single": False, "whole": False},
                    path=path)
    issues.error(path, f"tool must be a mapping, a kind name or a list of tasks, got {type(tool).__name__}")
    return None


def _from_workbook(tool: dict, path: str, workbook: dict, issues: Issues) -> dict | None:
    ref = tool.get("name")
    if ref not in workbook:
        issues.error(f"{path}.name", f"workbook entry {ref!r} not found (entries: {', '.join(workbook) or 'none'})")
        return None
    entry_path, entry = workbook[ref]
    inner = entry.get("tool")
    if not isinstance(inner, dict) or inner.get("kind") in (None, "workbook"):
        issues.error(f"{entry_path}.tool", f"workbook entry '{ref}' needs tool: {{kind: ...}}")
        return None
    merged = dict(inner)
    entry_assert = entry.get("assert", inner.get("assert"))
    merged.pop("assert", None)
    if entry_assert is not None:
        merged["_assert"] = entry_assert
    given = tool.get("input", tool.get("args"))
    if isinstance(given, dict):   # the caller's inputs win key by key (V10-2.12)
        base = merged.get("input") if isinstance(merged.get("input"), dict) else {}
        merged["input"] = {**base, **given}
    if "name" in tool and tool is not None:
        merged.setdefault("name", tool.get("name"))
    return merged


def _task(raw: Any, default_name: str, path: str, issues: Issues) -> dict | None:
    if not isinstance(raw, dict):
        issues.error(path, f"a task must be a mapping with kind:, got {type(raw).__name__}")
        return None
    kind = raw.get("kind")
    if not isinstance(kind, str):
        issues.error(f"{path}.kind", "a tool needs kind: (python, http, postgres, duckdb, playbook, workbook, noop)")
        return None
    kind = kind.strip().lower()
    if kind in UNSUPPORTED_KINDS:
        issues.error(f"{path}.kind", f"tool kind '{kind}' is not supported by this engine (NoETL DSL v2/v10 kinds "
                                     f"run here: {', '.join((*RUNNABLE_KINDS, 'playbook', 'workbook', 'noop'))})")
        return None
    if kind not in RUNNABLE_KINDS:
        what = "inside a pipeline" if kind in ("playbook", "noop") else "(unknown kind)"
        issues.error(f"{path}.kind", f"tool kind '{kind}' is not supported {what} (kinds: "
                                     f"{', '.join(RUNNABLE_KINDS)}; playbook and noop as a step's only tool)")
        return None
    spec = raw.get("spec") if isinstance(raw.get("spec"), dict) else {}
    if "output" in raw:
        issues.warn(f"{path}.output", "tool output (external result storage) is ignored: results stay inline")
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name:
        issues.error(f"{path}.name", f"a task name must be text, got {name!r}")
        return None
    task = {"name": name, "kind": kind, "config": {k: v for k, v in raw.items() if k not in TASK_META_KEYS},
            "set": _sets(raw.get("set"), f"{path}.set", issues),
            "rules": _rules(spec.get("policy"), f"{path}.spec.policy", issues)}
    if kind == "python":
        code = raw.get("code")
        if code is None and raw.get("code_b64", raw.get("code_base64")) is not None:
            import base64
            try:
                code = base64.b64decode(str(raw.get("code_b64", raw.get("code_base64")))).decode()
            except ValueError:
                issues.error(f"{path}.code_b64", "code_b64 is not valid base64 text")
        script = raw.get("script")
        if code is None and isinstance(script, dict):
            source = script.get("source") if isinstance(script.get("source"), dict) else {}
            if source.get("type") == "inline" and "code" in source:
                task["config"]["code_template"] = source["code"]
                code = ""
        if code is None:
            issues.error(path, "a python tool needs code: (or script: {source: {type: inline, code}})")
            return None
        task["config"]["code"] = code
        libs = raw.get("libs")
        if libs is not None and not isinstance(libs, dict):
            issues.error(f"{path}.libs", "libs must be a mapping alias: module")
    timeout = raw.get("timeout", raw.get("timeout_seconds"))
    if isinstance(spec.get("timeout"), dict):
        timeout = sum(float(v) for v in spec["timeout"].values() if isinstance(v, (int, float))) or timeout
    if timeout is not None:
        task["timeout"] = duration(timeout, f"{path}.timeout", issues)
    return task


DIRECTIVES = ("continue", "retry", "jump", "break", "fail")


def _rules(policy: Any, path: str, issues: Issues) -> list[dict]:
    if policy is None:
        return []
    rules = policy.get("rules") if isinstance(policy, dict) else None
    if not isinstance(rules, list):
        issues.error(path, "policy needs rules: [...]")
        return []
    out = []
    for i, rule in enumerate(rules):
        where = f"{path}.rules[{i}]"
        if not isinstance(rule, dict):
            issues.error(where, "a policy rule must be a mapping (when/then or else)")
            continue
        if "else" in rule:
            body = rule["else"] if isinstance(rule["else"], dict) else {}
            then = body.get("then", body if "do" in body else None)
            when = None
        else:
            then, when = rule.get("then"), rule.get("when")
            if when is None:
                issues.error(f"{where}.when", "a policy rule needs when: (or is an else: rule)")
                continue
            if not isinstance(when, str):
                when = "true" if when is True else "false" if when is False else str(when)
        if not isinstance(then, dict) or then.get("do") not in DIRECTIVES:
            issues.error(f"{where}.then.do", f"a policy rule needs then.do: one of {', '.join(DIRECTIVES)}")
            continue
        sets = _sets(then.get("set"), f"{where}.then.set", issues)
        for alias, prefix in (("set_ctx", "ctx."), ("set_iter", "iter.")):
            if isinstance(then.get(alias), dict):
                issues.warn(f"{where}.then.{alias}", f"'{alias}' is an older v10 key: read as set with {prefix} keys")
                sets.update({f"{prefix}{k}": v for k, v in then[alias].items()})
        out.append({"when": when, "do": then["do"], "attempts": then.get("attempts", 3),
                    "backoff": str(then.get("backoff") or "none"), "delay": then.get("delay", 1.0),
                    "to": then.get("to"), "set": sets, "path": where})
    return out


def _check_jumps(task: dict, names: set[str], path: str, issues: Issues) -> None:
    for rule in task["rules"]:
        if rule["do"] == "jump" and rule["to"] != "previous" and rule["to"] not in names:
            issues.error(f"{rule['path']}.then.to", f"jump target {rule['to']!r} names no task of this pipeline")


def _playbook(name: str, tool: dict, path: str, issues: Issues) -> Step:
    data = tool.get("input", tool.get("args", tool.get("payload"))) or {}
    retry = tool.get("retry")
    policy = None
    if isinstance(retry, dict):
        if "retry_on" in retry:
            issues.warn(f"{path}.retry.retry_on", "retry_on is not enforced: the child is retried on any failure")
        policy = RetryPolicy(max_attempts=int(retry.get("max_attempts", 3)),
                             initial_delay=float(retry.get("backoff", 0) or 0))
    timeout = tool.get("timeout")
    return Step(name=name, type="playbook", data=data if isinstance(data, (dict, str)) else {}, path=path,
                config={"path": tool.get("path"), "version": tool.get("version"),
                        "return_step": tool.get("return_step")},
                retry=policy, timeout=duration(timeout, f"{path}.timeout", issues) if timeout is not None else None)
