"""Raw playbook document -> the normalised model (DSL §2-§4).

Aliases are folded, workbook references resolved and each kind's keys moved into `Step.config`. Nothing
here raises on a bad document: what cannot be converted goes to `Issues` with its location path, and a
best-effort model is still built so that `validate` can check every step.
"""
from __future__ import annotations

import base64
import binascii
from typing import Any

from noetl_common.merge import deep_merge

from .models import ACTION_TYPES, CONTROL_TYPES, SAVE_STORAGES, Edge, IteratorSpec, Playbook, RetryPolicy, \
    SaveSpec, Step
from .validate import AUTH_KEYS, CODE_KEYS, COMMON_KEYS, DATA_KEYS, SAVE_KEYS, SQL_KEYS, Issues, as_expr, \
    fold_data, integer, join_sql, number

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
    by_name: dict[str, Step] = {}
    for step in steps:
        if step.name:
            by_name.setdefault(step.name, step)
    return Playbook(api_version=str(doc.get("apiVersion") or ""), kind=str(doc.get("kind") or "Playbook"),
                    name=str(meta.get("name") or ""), path=str(meta.get("path") or ""),
                    version=None if version is None else str(version),
                    description=None if description is None else str(description),
                    workload=doc.get("workload") if isinstance(doc.get("workload"), dict) else {},
                    steps=by_name)


# ---------------------------------------------------------------- steps

class _Ctx:
    def __init__(self, workbook: dict[str, tuple[str, dict]], issues: Issues):
        self.workbook, self.issues = workbook, issues


def step_kind(raw: dict, path: str, issues: Issues, task: bool = False) -> str | None:
    """The step's kind: an action type, "workbook", or None (control). Reports an unusable `type`."""
    value = raw.get("type")
    if value is None:
        if task and any(k in raw for k in CODE_KEYS):
            return "python"
        if task and "loop" not in raw:
            issues.error(path, "an iterator task needs an action type (type: python, http, …)")
        return None
    kind = value.strip().lower() if isinstance(value, str) else None
    if kind in CONTROL_TYPES:
        # `start`/`end`/`route` may carry an action: the unambiguous ones are inferred from their keys.
        if any(k in raw for k in CODE_KEYS):
            return "python"
        return "http" if ("endpoint" in raw or "url" in raw) else None
    if kind in ACTION_TYPES or kind == "workbook":
        return kind
    issues.error(f"{path}.type", f"unknown step type {value!r} (expected one of: "
                                 f"{', '.join((*ACTION_TYPES, 'workbook', *CONTROL_TYPES))})")
    return None


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
    merged["data"] = deep_merge(fold_data(entry, entry_path, ctx.issues), fold_data(raw, path, ctx.issues))
    if entry.get("type") is None:
        ctx.issues.error(entry_path, f"workbook entry '{ref}' has no type")
    return merged


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
    data = fold_data(raw, path, issues)
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
        max_visits=integer(raw.get("max_visits"), f"{path}.max_visits", issues, "max_visits") or 100,
        has_result="result" in raw, result=raw.get("result"),
        config=_config(kind, raw, data, path, issues), iterator=iterator)


def _config(kind: str | None, raw: dict, data: dict, path: str, issues: Issues) -> dict[str, Any]:
    """Each kind's own keys (their presence is checked by `validate` on the result)."""
    if kind == "python":
        return {"code": _code(raw, path, issues)}
    if kind == "http":
        return {"endpoint": raw.get("endpoint", raw.get("url")), "method": _method(raw, "GET"),
                "headers": _mapping(raw.get("headers"), f"{path}.headers", issues)}
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


# ---------------------------------------------------------------- next, retry, assert, save

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
    return _names(value.get("expects"), f"{path}.expects", issues), \
        _names(value.get("returns"), f"{path}.returns", issues)


def _names(value: Any, path: str, issues: Issues) -> list[str]:
    """A name or a list of names (save keys, assert paths)."""
    items = [value] if isinstance(value, str) else value or []
    if isinstance(items, list) and all(isinstance(x, str) for x in items):
        return items
    issues.error(path, f"expected a name or a list of names, got {value!r}")
    return []


def normalise_save(value: Any, path: str, issues: Issues) -> SaveSpec | None:
    """Flat (`storage: postgres, table, …`) and nested (`storage: {type, table, …}`, `data` beside it)."""
    if value is None or value is False:
        return None
    if not isinstance(value, dict):
        issues.error(path, "save must be a mapping")
        return None
    flat = {k: v for k, v in value.items() if k not in ("storage", "type")}
    storage = value.get("storage", value.get("type"))
    spec, where = flat, path
    if isinstance(storage, dict):    # nested keys win; data falls back to the top level
        nested = {k: v for k, v in storage.items() if k != "type"}
        has_data = nested.get("data") is not None or nested.get("args") is not None
        spec = {**flat, **nested, **({} if has_data else {"data": flat.get("data"), "args": flat.get("args")})}
        storage, where = storage.get("type"), f"{path}.storage"
    for key in spec:
        if key not in SAVE_KEYS:
            issues.warn(f"{where}.{key}", f"unknown save key '{key}' (ignored)")
    if storage is None:
        kind = "variable" if spec.get("name") is not None else "event"
    else:
        kind = {"event_log": "event"}.get(str(storage).strip().lower(), str(storage).strip().lower())
        if kind not in SAVE_STORAGES:
            issues.error(f"{path}.storage", f"unknown save storage {storage!r} (expected one of: "
                                            f"{', '.join(SAVE_STORAGES)})")
    data = spec.get("data", spec.get("args"))
    if isinstance(spec.get("data"), dict) and isinstance(spec.get("args"), dict):
        data = {**spec["args"], **spec["data"]}
    keys = _names(spec.get("key", spec.get("keys")), f"{where}.key", issues)
    mode = str(spec.get("mode") or "insert").strip().lower()
    if mode not in ("insert", "upsert"):
        issues.error(f"{where}.mode", f"unknown save mode {spec.get('mode')!r} (insert or upsert)")
        mode = "insert"
    sql_key = next((k for k in ("command", "commands", "sql", "statement") if spec.get(k) is not None), None)
    command = join_sql(spec[sql_key], f"{where}.{sql_key}", issues) if sql_key else None
    name, table, url = spec.get("name"), spec.get("table"), spec.get("url", spec.get("endpoint"))
    if url is not None and not isinstance(url, str):
        issues.error(f"{where}.url", f"save url must be a string, got {url!r}")
        url = None
    auth_key = next((k for k in AUTH_KEYS if spec.get(k) is not None), None)
    code = _code({**spec, "code": spec.get("code", spec.get("script"))}, where, issues)
    return SaveSpec(storage=kind if kind in SAVE_STORAGES else "event", name=None if name is None else str(name),
                    data=data, table=None if table is None else str(table), mode=mode, key=keys,
                    auth=spec.get(auth_key) if auth_key else None, url=url,
                    method=_method(spec, "POST"), headers=_mapping(spec.get("headers"), f"{where}.headers", issues),
                    code=code, command=command,
                    database=None if spec.get("database") is None else str(spec["database"]))


def _code(raw: dict, path: str, issues: Issues) -> str | None:
    """`code`, else `code_b64`/`code_base64` decoded. Never rendered."""
    code, b64_key = raw.get("code"), next((k for k in ("code_b64", "code_base64") if raw.get(k)), None)
    if code is None and b64_key:
        try:
            return base64.b64decode(str(raw[b64_key]), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            issues.error(f"{path}.{b64_key}", f"{b64_key} is not valid base64-encoded UTF-8")
            return None
    if code is not None and not isinstance(code, str):
        issues.error(f"{path}.code", "code must be a string")
        return None
    return code


def _method(raw: dict, default: str) -> Any:
    """Upper-cased; a template stays as written (validate checks plain values)."""
    method = raw.get("method") or default
    if not isinstance(method, str):
        return str(method)       # reported by validate as an unknown method
    return method.strip().upper() if "{" not in method else method


def _mapping(value: Any, path: str, issues: Issues) -> dict[str, Any]:
    if value is None or isinstance(value, dict):
        return value or {}
    issues.error(path, "headers must be a mapping")
    return {}
