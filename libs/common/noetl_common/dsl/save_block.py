"""The `save` block (DSL §2.7) and the small value readers that steps share with it.

Flat (`storage: postgres, table, …`) and nested (`storage: {type, table, …}`, `data` beside it) forms fold
into one SaveSpec; problems go to `Issues` with their location, nothing raises.
"""
from __future__ import annotations

import base64
import binascii
from typing import Any

from .models import SAVE_STORAGES, SaveSpec
from .validate import AUTH_KEYS, SAVE_KEYS, Issues, join_sql


def name_list(value: Any, path: str, issues: Issues) -> list[str]:
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
    keys = name_list(spec.get("key", spec.get("keys")), f"{where}.key", issues)
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
    code = code_of({**spec, "code": spec.get("code", spec.get("script"))}, where, issues)
    return SaveSpec(storage=kind if kind in SAVE_STORAGES else "event", name=None if name is None else str(name),
                    data=data, table=None if table is None else str(table), mode=mode, key=keys,
                    auth=spec.get(auth_key) if auth_key else None, url=url,
                    method=method_of(spec, "POST"), headers=headers_of(spec.get("headers"), f"{where}.headers", issues),
                    code=code, command=command,
                    database=None if spec.get("database") is None else str(spec["database"]))


def code_of(raw: dict, path: str, issues: Issues) -> str | None:
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


def method_of(raw: dict, default: str) -> Any:
    """Upper-cased; a template stays as written (validate checks plain values)."""
    method = raw.get("method") or default
    if not isinstance(method, str):
        return str(method)       # reported by validate as an unknown method
    return method.strip().upper() if "{" not in method else method


def headers_of(value: Any, path: str, issues: Issues) -> dict[str, Any]:
    if value is None or isinstance(value, dict):
        return value or {}
    issues.error(path, "headers must be a mapping")
    return {}
