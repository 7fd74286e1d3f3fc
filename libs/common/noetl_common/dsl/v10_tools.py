"""The tools of a NoETL DSL v2/v10 step (V10 §2.1-2.2, §9.1): a mapping, a kind name or a pipeline list
-> one `pipeline` action (tasks kept raw, rendered by the worker), a child playbook, or a noop control step.
Unsupported kinds are load errors naming the kind (V10-2.14). Part of the second front end (dsl/v10.py).
"""
from __future__ import annotations

from typing import Any

from .models import RetryPolicy, Step
from .v10_gates import output_alias
from .validate import Issues, integer, number

RUNNABLE_KINDS = ("python", "http", "postgres", "duckdb", "secrets")   # run by the worker's pipeline action
# V10-2.14: kinds needing systems this project does not run: a load error naming step and kind.
UNSUPPORTED_KINDS = ("shell", "nats", "snowflake", "snowflake_transfer", "transfer", "gcs", "container",
                     "ducklake", "artifact", "subscription", "gateway", "agent", "mcp", "script", "rhai",
                     "result_fetch", "task_sequence", "iterator")
TASK_META_KEYS = ("kind", "name", "spec", "output", "set")
MAX_TASKS = 100
PIPELINE_ONLY_KINDS = ("playbook", "noop")   # tasks of a pipeline list; as a mapping tool they are steps


def sets_of(value: Any, path: str, issues: Issues) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        issues.error(path, "set must be a mapping of scope.key: value")
        return {}
    return {str(k): v for k, v in value.items()}


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


def action_of(name: str, tool: Any, path: str, workbook: dict, issues: Issues) -> Step | None:
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
            task = _task(raw, f"task_{i}", where, issues, in_pipeline=True)
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
    if isinstance(inner, str):   # v2 (V10-2.6): `tool: K` with the kind's keys on the entry itself
        inner = {"kind": inner, **{k: v for k, v in entry.items() if k not in ("name", "desc", "description",
                                                                               "tool", "assert")}}
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


def _task(raw: Any, default_name: str, path: str, issues: Issues, in_pipeline: bool = False) -> dict | None:
    """One task of a pipeline (or the only task of a mapping tool). Inside a pipeline `playbook` and `noop`
    are tasks too: a `playbook` task splits the pipeline (the fold starts the child between two worker
    segments, docs/dialect-v10.md "Pipelines with a child playbook"), a `noop` task's result is its rendered
    `result` key, else null (V10 §2.2)."""
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
    if kind not in RUNNABLE_KINDS and not (in_pipeline and kind in PIPELINE_ONLY_KINDS):
        issues.error(f"{path}.kind", f"tool kind '{kind}' is not supported (unknown kind; kinds: "
                                     f"{', '.join(RUNNABLE_KINDS)}, playbook, noop)")
        return None
    if kind == "playbook":
        if not isinstance(raw.get("path"), str) or not raw.get("path"):
            issues.error(f"{path}.path", "a playbook task needs path: (the child playbook's catalog path)")
            return None
        if "retry" in raw:
            issues.warn(f"{path}.retry", "retry on a playbook task inside a pipeline is not read: use the task's "
                                         "spec.policy rules (do: retry)")
    spec = raw.get("spec") if isinstance(raw.get("spec"), dict) else {}
    alias = output_alias(raw.get("output"), f"{path}.output", issues)
    name = raw.get("name", default_name)
    if not isinstance(name, str) or not name:
        issues.error(f"{path}.name", f"a task name must be text, got {name!r}")
        return None
    task = {"name": name, "kind": kind, "config": {k: v for k, v in raw.items() if k not in TASK_META_KEYS},
            "set": sets_of(raw.get("set"), f"{path}.set", issues),
            "rules": _rules(spec.get("policy"), f"{path}.spec.policy", issues)}
    if alias is not None:   # V10-10.3: an extra name for the task's result, a task `set` (V10-2.15) before its own
        task["set"] = {alias: "{{ output }}", **task["set"]}
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
        sets = sets_of(then.get("set"), f"{where}.then.set", issues)
        for alias, prefix in (("set_ctx", "ctx."), ("set_iter", "iter.")):
            if isinstance(then.get(alias), dict):
                issues.warn(f"{where}.then.{alias}", f"'{alias}' is an older v10 key: read as set with {prefix} keys")
                sets.update({f"{prefix}{k}": v for k, v in then[alias].items()})
        attempts, delay = _retry_numbers(then, f"{where}.then", issues)
        out.append({"when": when, "do": then["do"], "attempts": attempts,
                    "backoff": str(then.get("backoff") or "none"), "delay": delay,
                    "to": then.get("to"), "set": sets, "path": where})
    return out


def _retry_numbers(then: dict, path: str, issues: Issues) -> tuple[int, float]:
    """V10-9.3 `attempts` (an integer >= 1, default 3) and `delay` (seconds >= 0, a string is parsed as a
    number, default 1.0). A value that is neither is a load error, not a silent default at run time (V10-1.3)."""
    attempts = then.get("attempts", 3)
    if isinstance(attempts, float) and attempts.is_integer():
        attempts = int(attempts)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        issues.error(f"{path}.attempts", f"policy attempts must be an integer >= 1, got {attempts!r}")
        attempts = 3
    delay = then.get("delay", 1.0)
    try:
        delay = float(delay) if not isinstance(delay, bool) else None
    except (TypeError, ValueError):
        delay = None
    if delay is None or not 0 <= delay < float("inf"):
        issues.error(f"{path}.delay", f"policy delay must be a number of seconds >= 0, got {then.get('delay')!r}")
        delay = 1.0
    return attempts, delay


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
        attempts = integer(retry.get("max_attempts", 3), f"{path}.retry.max_attempts", issues, "max_attempts")
        backoff = number(retry.get("backoff", 0) or 0, f"{path}.retry.backoff", issues, "backoff")
        policy = RetryPolicy(max_attempts=attempts or 1, initial_delay=backoff or 0.0)
    timeout = tool.get("timeout")
    return Step(name=name, type="playbook", data=data if isinstance(data, (dict, str)) else {}, path=path,
                config={"path": tool.get("path"), "version": tool.get("version"),
                        "return_step": tool.get("return_step")},
                retry=policy, timeout=duration(timeout, f"{path}.timeout", issues) if timeout is not None else None)
