"""Raw playbook document -> the normalised model (DSL §2-§4).

Aliases are folded, workbook references resolved and each kind's keys moved into `Step.config`. Nothing
here raises on a bad document: what cannot be converted goes to `Issues` with its location path, and a
best-effort model is still built so that `validate` can check every step.
"""
from __future__ import annotations

from typing import Any

from noetl_common.caps import DEFAULT_STEP_MAX_VISITS, MAX_VISITS_SETTING
from noetl_common.merge import deep_merge

from .models import ACTION_TYPES, CONTROL_TYPES, Edge, IteratorSpec, Playbook, RetryPolicy, Step
from .save_block import code_of, headers_of, method_of, name_list, normalise_save
from .validate import ACTION_KEYS, AUTH_KEYS, CODE_KEYS, COMMON_KEYS, DATA_KEYS, SAVE_KEYS, SQL_KEYS, Issues, \
    as_expr, fold_data, identity, integer, join_sql, number

EDGE_DATA_KEYS = ("input", "payload", "args", "with", "data")   # later wins
EDGE_KEYS = frozenset({"step", "name", "when", "then", "else", *EDGE_DATA_KEYS})
LOOP_OUTER = ("step", "loop", "next", "desc", "description", "max_visits", "result")
MAX_WORKBOOK_DEPTH = 8


# ---------------------------------------------------------------- document

def workflow_key(doc: dict) -> str:
    return "workflow" if "workflow" in doc or "steps" not in doc else "steps"


def normalise(doc: Any, issues: Issues | None = None) -> Playbook:
    """Raw document -> Playbook, without the cross-step checks of `validate` (problems go to `issues`)."""
    issues = issues if issues is not None else Issues()
    if not isinstance(doc, dict):
        issues.error("", "a playbook must be a mapping")
        doc = {}
    return assemble(doc, normalise_steps(doc, issues))


def normalise_steps(doc: dict, issues: Issues) -> list[Step]:
    """Every workflow step in document order, duplicates included (validation reports them)."""
    key = workflow_key(doc)
    raw_steps = doc.get(key)
    if not isinstance(raw_steps, list):
        return []
    entries = list(enumerate(doc["workbook"])) if isinstance(doc.get("workbook"), list) else []
    ctx = _Ctx({e["name"]: (f"workbook[{i}]", e) for i, e in reversed(entries)     # the first entry wins
                if isinstance(e, dict) and isinstance(e.get("name"), str)}, issues)
    steps = []
    for i, raw in enumerate(raw_steps):
        path = f"{key}[{i}]"
        given = raw.get("step") if isinstance(raw, dict) else None
        name = given.strip() if isinstance(given, str) else ""
        if not name:
            issues.error(f"{path}.step" if given is not None else path, f"a step needs a name (step: <name>), "
                                                                       f"got {given!r}")
        steps.append(normalise_step(raw, name, path, ctx))
    return steps


def assemble(doc: dict, steps: list[Step]) -> Playbook:
    """The Playbook (the first definition of a duplicated step name wins)."""
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    version, description = meta.get("version"), meta.get("description", doc.get("description"))
    name, path = identity(doc)
    by_name: dict[str, Step] = {}
    for step in steps:
        if step.name:
            by_name.setdefault(step.name, step)
    return Playbook(api_version=str(doc.get("apiVersion") or ""), kind=str(doc.get("kind") or "Playbook"),
                    name=name, path=path,
                    version=None if version is None else str(version),
                    description=None if description is None else str(description),
                    workload=doc.get("workload") if isinstance(doc.get("workload"), dict) else {},
                    steps=by_name)


# ---------------------------------------------------------------- steps

class _Ctx:
    def __init__(self, workbook: dict[str, tuple[str, dict]], issues: Issues):
        self.workbook, self.issues = workbook, issues


def step_kind(raw: dict, path: str, issues: Issues, task: bool = False) -> str | None:
    """The step's kind: an action type, "workbook", or None (control). Reports an unusable `type`, and
    action keys on a step that would be a control step (it would run nothing, silently)."""
    value = raw.get("type")
    if value is None:
        if task and any(k in raw for k in CODE_KEYS):
            return "python"
        if task and "loop" not in raw:
            issues.error(path, "an iterator task needs an action type (type: python, http, …)")
        elif "loop" not in raw:
            _no_action_type(raw, path, issues, "it has no type")
        return None
    kind = value.strip().lower() if isinstance(value, str) else None
    if kind in CONTROL_TYPES:
        # `start`/`end`/`route` may carry an action: the unambiguous ones are inferred from their keys.
        if any(k in raw for k in CODE_KEYS):
            return "python"
        if "endpoint" in raw or "url" in raw:
            return "http"
        if "loop" not in raw:
            _no_action_type(raw, path, issues, f"type: {kind} is a control type")
        return None
    if kind in ACTION_TYPES or kind == "workbook":
        return kind
    issues.error(f"{path}.type", f"unknown step type {value!r} (expected one of: "
                                 f"{', '.join((*ACTION_TYPES, 'workbook', *CONTROL_TYPES))})")
    return None


def _no_action_type(raw: dict, path: str, issues: Issues, why: str) -> None:
    """DSL §2: a control step runs nothing. One with an action key was meant to run something: an error
    naming the key, never a step that completes at once while nothing ran."""
    key = next((k for k in ACTION_KEYS if k in raw), None)
    if key is None:
        return
    if key == "tool":
        issues.error(f"{path}.{key}", f"'{key}:' is NoETL DSL v2/v10 syntax, which this engine does not run: a "
                                      f"v1 step names its action with type: (python, http, postgres, …)")
    else:
        issues.error(f"{path}.{key}", f"'{key}' is an action key but {why}, so the step would run nothing: "
                                      f"add {ACTION_KEYS[key]} (a step without an action type is a control step)")


def _resolve_workbook(raw: dict, path: str, ctx: _Ctx, depth: int) -> dict | None:
    """The entry merged with the step: step keys replace the entry's; `data` deep-merges (step wins)."""
    ref_key = "name" if raw.get("name") is not None else "task"
    ref = raw.get(ref_key)
    where = f"{path}.{ref_key}" if ref_key in raw else path
    if not isinstance(ref, str) or not ref:
        ctx.issues.error(where, "a workbook step needs name: <workbook entry>")
        return None
    if ref not in ctx.workbook:
        known = ", ".join(sorted(ctx.workbook)) or "none"
        ctx.issues.error(where, f"workbook entry '{ref}' not found (workbook entries: {known})")
        return None
    if depth >= MAX_WORKBOOK_DEPTH:
        ctx.issues.error(where, f"workbook entry '{ref}' refers to workbook entries in a cycle")
        return None
    entry_path, entry = ctx.workbook[ref]
    merged = {k: v for k, v in entry.items() if k != "name" and k not in DATA_KEYS}
    merged.update({k: v for k, v in raw.items() if k not in ("type", "name", "task", *DATA_KEYS)})
    merged["data"] = _merge_inputs(fold_data(entry, entry_path, ctx.issues, whole=True),
                                   fold_data(raw, path, ctx.issues, whole=True), path, ctx.issues)
    if entry.get("type") is None:
        ctx.issues.error(entry_path, f"workbook entry '{ref}' has no type")
    return merged


def _merge_inputs(entry: dict | str, step: dict | str, path: str, issues: Issues) -> dict | str:
    """A workbook entry's inputs under the step's (deep merge, step wins). An input expression (text, rendered
    at dispatch) only stands alone: merging it with a mapping would need values known only at run time."""
    if isinstance(entry, dict) and isinstance(step, dict):
        return deep_merge(entry, step)
    if not entry or not step:
        return step or entry
    issues.error(f"{path}.data", "the workbook entry's inputs and the step's cannot be merged when one of them "
                                 "is a template expression ({{ … }}): give them as mappings, or only one")
    return step


def normalise_step(raw: Any, name: str, path: str, ctx: _Ctx, *, task: bool = False, depth: int = 0) -> Step:
    issues = ctx.issues
    if not isinstance(raw, dict):
        issues.error(path, f"a step must be a mapping, got {type(raw).__name__}")
        return Step(name=name, path=path)
    kind = step_kind(raw, path, issues, task)
    if kind == "workbook":
        resolved = _resolve_workbook(raw, path, ctx, depth)
        if resolved is not None:
            return normalise_step(resolved, name, path, ctx, task=task, depth=depth + 1)
        kind, raw = None, {k: v for k, v in raw.items() if k not in ("name", "task")}
    iterator = None
    if "loop" in raw:
        iterator, raw = _legacy_loop(raw, name, path, ctx, depth)
        kind = "iterator"
    elif kind == "iterator":
        if raw.get("collection") is None and raw.get("in") is None and raw.get("data") is not None \
                and not isinstance(raw.get("data"), dict):   # legacy: `data` is the collection
            raw = {**{k: v for k, v in raw.items() if k != "data"}, "collection": raw["data"]}
        iterator = _iterator(raw, raw.get("task"), name, path, f"{path}.task", ctx, depth, legacy=False)
    data = fold_data(raw, path, issues, whole=True)
    save = raw.get("save")
    if kind == "save" and "storage" not in raw and isinstance(save, dict):
        save = None   # `type: save` with only a save block: that block is the action
    expects, returns = _assert(raw.get("assert"), f"{path}.assert", issues)
    auth_key = next((k for k in AUTH_KEYS if raw.get(k) is not None), None)
    desc = raw.get("desc", raw.get("description"))
    return Step(
        name=name, type=kind, desc=None if desc is None else str(desc), data=data, path=path,
        next=[] if task else edges(raw.get("next"), f"{path}.next", issues),
        save=normalise_save(save, f"{path}.save", issues),
        retry=_retry(raw.get("retry"), f"{path}.retry", issues),
        timeout=number(raw.get("timeout"), f"{path}.timeout", issues, "timeout", positive=True),
        assert_expects=expects, assert_returns=returns, auth=raw.get(auth_key) if auth_key else None,
        max_visits=_max_visits(raw.get("max_visits"), f"{path}.max_visits", issues),
        has_result="result" in raw, result=raw.get("result"),
        config=_config(kind, raw, data, path, issues), iterator=iterator)


def _max_visits(value: Any, path: str, issues: Issues) -> int:
    """The step's max_visits, within the operator's cap (docs/security.md, Limits): a loop's visits are
    events and commands, so a bound at load keeps one playbook from asking for millions. Undeclared: 100,
    or the cap when the operator set it lower."""
    cap = issues.caps.max_visits
    declared = integer(value, path, issues, "max_visits")
    if declared is not None and declared > cap:
        issues.error(path, f"max_visits {declared:,} is over the cap of {cap:,} ({MAX_VISITS_SETTING}); "
                           f"lower it, or ask the operator to raise the cap")
        return cap
    return declared or min(DEFAULT_STEP_MAX_VISITS, cap)


def _config(kind: str | None, raw: dict, data: dict | str, path: str, issues: Issues) -> dict[str, Any]:
    """Each kind's own keys (their presence is checked by `validate` on the result)."""
    if kind == "python":   # `limits:` is the step's own resource limits (validate.check_limits, the worker)
        limits = {"limits": raw["limits"]} if raw.get("limits") is not None else {}
        return {"code": code_of(raw, path, issues), **limits}
    if kind == "http":
        return {"endpoint": raw.get("endpoint", raw.get("url")), "method": method_of(raw, "GET"),
                "headers": headers_of(raw.get("headers"), f"{path}.headers", issues)}
    if kind in ("postgres", "duckdb"):
        key = next((k for k in SQL_KEYS if raw.get(k) is not None), None)
        return {"command": join_sql(raw[key], f"{path}.{key}", issues) if key else None,
                "database": raw.get("database")}
    if kind == "playbook":
        key = next((k for k in ("path", "resource_path", "playbook_path") if raw.get(k) is not None), "path")
        return {"path": raw.get(key), "version": raw.get("version"), "return_step": raw.get("return_step")}
    if kind == "secrets":
        return {k: v for k, v in raw.items() if k not in COMMON_KEYS}
    if kind == "save":
        action = raw["save"] if "storage" not in raw and isinstance(raw.get("save"), dict) else \
            {**{k: v for k, v in raw.items() if k in SAVE_KEYS and k not in ("type", *DATA_KEYS)}, "data": data}
        spec = normalise_save(action, path, issues)
        return spec.model_dump() if spec is not None else {}
    return {}


def _legacy_loop(raw: dict, name: str, path: str, ctx: _Ctx, depth: int) -> tuple[IteratorSpec | None, dict]:
    """`loop: {in, iterator, task, ...}`. Without `task`, the step's own action is the per-item task."""
    loop = raw["loop"]
    if not isinstance(loop, dict):
        ctx.issues.error(f"{path}.loop", "loop must be a mapping (in, iterator, task)")
        return None, raw
    if loop.get("task") is not None:
        return _iterator(loop, loop["task"], name, f"{path}.loop", f"{path}.loop.task", ctx, depth, True), raw
    task = {k: v for k, v in raw.items() if k not in LOOP_OUTER}
    outer = {k: v for k, v in raw.items() if k in LOOP_OUTER}
    return _iterator(loop, task, name, f"{path}.loop", path, ctx, depth, True), outer


def _iterator(src: dict, task_raw: Any, name: str, path: str, task_path: str, ctx: _Ctx, depth: int,
              legacy: bool) -> IteratorSpec | None:
    issues, before = ctx.issues, ctx.issues.error_count
    collection = src.get("collection", src.get("in"))
    element = src.get("element", src.get("iterator") if legacy else None)
    for key, value in (("collection", collection), ("element", element), ("task", task_raw)):
        if value is None:
            issues.error(path, f"iterator step '{name}' has no '{key}'")
    if element is not None and (not isinstance(element, str) or not element.isidentifier()):
        issues.error(f"{path}.element", f"element must be a plain name, got {element!r}")
    mode = str(src.get("mode") or "sequential").strip().lower()
    mode = "async" if mode == "parallel" else mode
    if mode not in ("sequential", "async"):
        issues.error(f"{path}.mode", f"unknown iterator mode {src.get('mode')!r} (sequential or async)")
    concurrency = integer(src.get("concurrency"), f"{path}.concurrency", issues, "concurrency")
    if mode == "sequential" and concurrency not in (None, 1):
        issues.warn(f"{path}.concurrency", "concurrency applies to mode: async only (ignored)")
    limit = integer(src.get("limit"), f"{path}.limit", issues, "limit")
    chunk = integer(src.get("chunk"), f"{path}.chunk", issues, "chunk")
    where, order_by = as_expr(src.get("where"), f"{path}.where", issues), \
        as_expr(src.get("order_by"), f"{path}.order_by", issues)
    task = None
    if isinstance(task_raw, list):
        issues.error(task_path, "an iterator task must be one mapping (a single action), not a list")
    elif task_raw is not None:
        task = normalise_step(task_raw, name, task_path, ctx, task=True, depth=depth)
    if issues.error_count > before or task is None:
        return None
    return IteratorSpec(collection=collection, element=element, mode=mode,
                        concurrency=(concurrency or 8) if mode == "async" else 1,
                        where=where, order_by=order_by, limit=limit, chunk=chunk, task=task)


# ---------------------------------------------------------------- next, retry, assert

def edges(value: Any, path: str, issues: Issues) -> list[Edge]:
    """`next` (or a then/else list): a list or a single entry; an entry is a step name or a mapping."""
    if value is None:
        return []
    items = [value] if isinstance(value, (str, dict)) else value
    if not isinstance(items, list):
        issues.error(path, f"next must be a list of steps, got {type(value).__name__}")
        return []
    found = [_edge(item, f"{path}[{i}]", issues) for i, item in enumerate(items)]
    return [edge for edge in found if edge is not None]


def _edge(item: Any, path: str, issues: Issues) -> Edge | None:
    if isinstance(item, str) and item.strip():
        return Edge(step=item.strip(), path=path)
    if not isinstance(item, dict):
        issues.error(path, f"a next entry must be a step name or a mapping, got {item!r}")
        return None
    target = item.get("step", item.get("name"))
    when = as_expr(item.get("when"), f"{path}.when", issues)
    data = fold_data(item, path, issues, EDGE_DATA_KEYS)
    for key in item:
        if key not in EDGE_KEYS:
            issues.warn(f"{path}.{key}", f"key '{key}' does not apply to a next entry (ignored)")
    if "then" in item or "else" in item:
        if target is not None:
            issues.error(path, "a next entry with then/else cannot also name a step")
        if data:
            issues.warn(path, "edge data on a then/else entry is ignored: put it on the entries of its lists")
        return Edge(when=when, then=edges(item.get("then"), f"{path}.then", issues),
                    otherwise=edges(item.get("else"), f"{path}.else", issues), path=path)
    if not isinstance(target, str) or not target.strip():
        issues.error(f"{path}.step", f"a next entry needs step: <name> (or then/else), got {target!r}")
        return None
    return Edge(step=target.strip(), when=when, data=data, path=path)


def _retry(value: Any, path: str, issues: Issues) -> RetryPolicy | None:
    if value is None or value is False:
        return None
    if value is True:
        return RetryPolicy()
    if isinstance(value, (int, float)):
        return RetryPolicy(max_attempts=integer(value, path, issues, "retry max_attempts") or 1)
    if not isinstance(value, dict):
        issues.error(path, "retry must be true, a number of attempts or a mapping")
        return None
    fields: dict[str, Any] = {}
    for key, item in value.items():
        where = f"{path}.{key}"
        if key == "max_attempts":
            fields[key] = integer(item, where, issues, "max_attempts")
        elif key in ("initial_delay", "backoff_multiplier", "max_delay"):
            fields[key] = number(item, where, issues, key)
        elif key == "jitter":
            fields[key] = item if isinstance(item, bool) else issues.error(where, "jitter must be true or false")
        elif key in ("retry_when", "stop_when"):
            fields[key] = as_expr(item, where, issues)
        else:
            issues.warn(where, f"unknown retry key '{key}' (ignored)")
    return RetryPolicy(**{k: v for k, v in fields.items() if v is not None})


def _assert(value: Any, path: str, issues: Issues) -> tuple[list[str], list[str]]:
    if value is not None and not isinstance(value, dict):
        issues.error(path, "assert must be a mapping with expects and/or returns")
    value = value if isinstance(value, dict) else {}
    for key in set(value) - {"expects", "returns"}:
        issues.warn(f"{path}.{key}", f"unknown assert key '{key}' (ignored)")
    return name_list(value.get("expects"), f"{path}.expects", issues), \
        name_list(value.get("returns"), f"{path}.returns", issues)
