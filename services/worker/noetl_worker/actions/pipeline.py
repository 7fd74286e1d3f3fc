"""`type: pipeline`: a NoETL DSL v10 step's tool (one mapping, or a list of tasks) run on this worker.

Contract: ../shared/docs/playbook-dsl-v10.md §2.1, §3, §9.1 (rules V10-x.y); docs/dialect-v10.md. Each task
is rendered just before it runs with the step's context (shipped whole by the fold) plus the pipeline's
locals (`_prev`, `_task`, `_attempt`, `results`, done tasks by name, `output`, `iter`, ctx writes), runs
through the same action modules as v1 (python through the isolated pool, in script style), and its policy
rules pick the next move. ctx writes leave as `variables` (the fold's ctx map, engine/v10.py).
"""
from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any

from noetl_common import pipeline_result
from noetl_common.engine import v10 as core
from noetl_common.engine.errors import StepError
from noetl_common.render import LENIENT, TemplateError, render

from noetl_worker.actions import duckdb as duckdb_action
from noetl_worker.actions import http as http_action
from noetl_worker.actions import postgres as postgres_action
from noetl_worker.actions import secrets as secrets_action
from noetl_worker.actions.base import ActionError, ActionOutput, Invocation

MAX_TASK_RUNS = 10_000          # V10-9.4: a runaway jump loop fails the step
RESERVED = {"execution_id", "catalog_id", "job", "event", "output", "result", "iter", "ctx", "workload", "input",
            "keychain", "secret", "results", "_prev", "_task", "_attempt"}
NOT_CONFIG = ("code", "code_template", "libs", "input", "args", "_assert")
# Python code that can read NoETL's `context`: it names it, or defines a `main` (bound by name from it). Other
# code gets none: building, sending and freezing it was most of what a trivial task cost over a v1 step.
_NEEDS_CONTEXT = re.compile(r"\b(context|main)\b")


@dataclass
class _Run:
    context: dict[str, Any]
    ctx: dict[str, Any]
    iter: dict[str, Any]
    patch: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    prev: Any = None
    output: Any = None
    last: str | None = None     # the last completed task (its result is results[last] and _prev)


async def run(inv: Invocation) -> ActionOutput:
    tasks = inv.config.get("tasks") or []
    context = core.unship_context(inv.cmd.action.context)   # `ctx` comes once; `workload`, `vars` are it too
    state = _Run(context=pipeline_result.views(context), ctx=dict(context.get("ctx") or {}),
                 iter=dict(context.get("iter") or {}))
    attempts: dict[int, int] = {}
    index, runs, status, last = 0, 0, "ok", None
    outcome: dict[str, Any] | None = None
    if isinstance(inv.config.get("resume"), dict):   # the rest of a pipeline split at a playbook task
        index, runs, attempts, last, outcome = _restore(state, inv.config["resume"], len(tasks))
    trail: list[dict[str, Any]] = []
    while index < len(tasks):
        task = tasks[index]
        if outcome is not None and outcome.get("task") == index:   # the child's end is this task's attempt
            attempt = attempts.get(index, 1)
            ok, result, error, view = _child_outcome(task, outcome, attempt)
            outcome = None
        else:
            runs += 1
            if runs > MAX_TASK_RUNS:
                raise ActionError(f"the pipeline ran {MAX_TASK_RUNS:,} tasks (the limit): a jump loop?")
            attempt = attempts[index] = attempts.get(index, 0) + 1
            if task["kind"] == "playbook":
                child = _child(inv, task, state, attempt)
                if isinstance(child, dict):   # the fold starts the child, then sends the rest (composition.py)
                    carried = {"index": index, "runs": runs, "attempts": [[i, n] for i, n in attempts.items()],
                               "last": last, "last_task": state.last, "results": state.results,
                               "prev": state.prev, "patch": state.patch,
                               "iter": state.iter, "output": state.output}
                    return PipelineOutput(None, tasks=trail, suspended={"task": index, "child": child,
                                                                        "state": carried})
                ok, result, error, view = child   # its inputs failed to render: a failed attempt of the task
            else:
                ok, result, error, view = await _attempt(inv, task, state, attempt)
        rule = None
        try:
            if task.get("set") or task.get("rules"):   # (the scope is built only for a task that reads it)
                scope = {**_scope(state, task, attempt), "output": view, "outcome": view, "result": result,
                         "error": view["error"]}
                if ok and task.get("set"):   # V10-2.15: `output` is the task's result itself here
                    _write(state, task["set"], {**scope, "output": result})
                rule = _choose(task.get("rules") or [], scope, ok)
                if rule is not None and rule.get("set"):
                    _write(state, rule["set"], scope)
        except StepError as exc:
            trail.append({"task": task["name"], "attempt": attempt, "ok": False, "error": str(exc),
                          "directive": "fail"})
            raise PipelineError(f"{task['name']}: {exc}", trail) from exc
        directive = rule["do"] if rule is not None else ("continue" if ok else "fail")
        state.output = view
        entry = {"task": task["name"], "attempt": attempt, "ok": ok, "error": error, "directive": directive}
        trail.append(entry)
        if directive == "retry":
            if attempt < _int(rule.get("attempts"), 3):   # type: ignore[union-attr]
                entry["delay"] = _delay(rule, attempt)
                await asyncio.sleep(entry["delay"])
                continue
            directive = entry["directive"] = "continue" if ok else "fail"
        if directive == "fail":
            raise PipelineError(f"{task['name']}: {error or 'failed by policy'}", trail)
        if ok:
            state.results[task["name"]] = result
            state.prev = last = result
            state.last = task["name"]
        attempts.pop(index, None)
        if directive == "break":
            status = "break"
            break
        if directive == "jump":
            target = rule.get("to")   # type: ignore[union-attr]
            index = index - 1 if target == "previous" else next(
                i for i, t in enumerate(tasks) if t["name"] == target)
            index = max(index, 0)
            continue
        index += 1
    return PipelineOutput(_result(inv, state, last, status), variables=state.patch, tasks=trail)


@dataclass
class PipelineOutput(ActionOutput):
    variables: dict[str, Any] = field(default_factory=dict)   # ctx patch (top-level keys)
    tasks: list[dict[str, Any]] = field(default_factory=list)  # one entry per task attempt
    suspended: dict[str, Any] | None = None   # stopped before a playbook task: {task, child, state}


def _restore(state: _Run, carried: dict[str, Any], size: int
             ) -> tuple[int, int, dict[int, int], Any, dict[str, Any] | None]:
    """The state a previous part of this pipeline reported (engine/composition.py), as the fold sent it back."""
    try:
        index, runs = int(carried["index"]), int(carried.get("runs") or 0)
        attempts = {int(i): int(n) for i, n in carried.get("attempts") or []}
    except (KeyError, TypeError, ValueError) as exc:
        raise ActionError(f"the pipeline's resume state is malformed: {exc}") from exc
    if not 0 <= index < size:
        raise ActionError(f"the pipeline's resume state names task {index}, which does not exist")
    state.results = dict(carried.get("results") or {})
    state.prev, state.output = carried.get("prev"), carried.get("output")
    state.last = carried.get("last_task") if isinstance(carried.get("last_task"), str) else None
    state.patch = dict(carried.get("patch") or {})
    state.ctx.update(state.patch)
    state.iter = dict(carried.get("iter") or state.iter)
    outcome = carried.get("outcome") if isinstance(carried.get("outcome"), dict) else None
    return index, runs, attempts, carried.get("last"), outcome


def _child(inv: Invocation, task: dict, state: _Run, attempt: int) -> dict[str, Any] | tuple:
    """The child playbook a `playbook` task starts (V10 §2.2: path, version, return_step, input rendered
    with the pipeline's scope), or the failed attempt when they do not render."""
    started = time.monotonic()
    try:
        inputs, config, _ = _render_task(task, _scope(state, task, attempt), inv.data)
    except StepError as exc:
        return (False, None, str(exc), _view(task, None, str(exc), attempt, started, None))
    return {"path": config.get("path"), "version": config.get("version"), "return_step": config.get("return_step"),
            "input": inputs, "timeout": task.get("timeout")}


def _child_outcome(task: dict, outcome: dict[str, Any], attempt: int) -> tuple[bool, Any, str | None, dict]:
    """The end of the child, as the fold reported it: a task attempt like any other (V10-2.9 included)."""
    result = outcome.get("result")
    error = None if outcome.get("ok") else str(outcome.get("error") or "the child playbook failed")
    error = error or _status_error(result)
    return error is None, result, error, _view(task, result, error, attempt, time.monotonic(), None)


class PipelineError(ActionError):
    def __init__(self, message: str, tasks: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.tasks = tasks


def _result(inv: Invocation, state: _Run, last: Any, status: str) -> Any:
    if inv.config.get("whole"):      # a mapping tool: its result as is (V10-2.11)
        return last
    # V10-2.10's overlay repeats the last result three times: it is reported compact, built where read
    return pipeline_result.compact(state.results, state.last, status, state.patch)


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _delay(rule: dict, attempt: int) -> float:
    """V10-9.3: none -> 0; linear -> delay × n; exponential -> delay × 2^(n-1) (n = this retry)."""
    try:
        delay = float(rule.get("delay", 1.0))
    except (TypeError, ValueError):
        delay = 1.0
    backoff = str(rule.get("backoff") or "none").lower()
    if backoff == "linear":
        return min(delay * attempt, 300.0)
    if backoff == "exponential":
        return min(delay * 2 ** (attempt - 1), 300.0)
    return 0.0


def _choose(rules: list[dict], scope: dict[str, Any], ok: bool) -> dict | None:
    for rule in rules:
        if rule.get("when") is None or core.holds(rule["when"], scope, rule.get("path", "policy")):
            return rule
    return None


def _write(state: _Run, sets: dict[str, Any], scope: dict[str, Any]) -> None:
    """V10-7.2: `iter.*` stays in this visit's iter; every other scope writes the ctx map (and the patch)."""
    iter_writes, ctx_writes = [], []
    for key in sets:
        (iter_writes if key.startswith("iter.") and state.context.get("iter") is not None
         else ctx_writes).append(key)
    rendered = core.render_sets(sets, scope, "policy")
    for key, write in zip(sets, rendered):
        if key in iter_writes:
            core.apply_writes(state.iter, [write])
        else:
            state.patch.update(core.apply_writes(state.ctx, [write]))


def _scope(state: _Run, task: dict, attempt: int) -> dict[str, Any]:
    scope = dict(state.context)
    for key, value in state.patch.items():
        if key not in RESERVED:
            scope[key] = value
    scope.update(state.results)
    scope.update(ctx=state.ctx, workload=state.ctx, vars=state.ctx, iter=state.iter, _prev=state.prev,
                 _task=task["name"], _attempt=attempt, results=state.results)
    if state.output is not None:
        scope["output"] = scope["outcome"] = state.output
    return scope


async def _attempt(inv: Invocation, task: dict, state: _Run, attempt: int) -> tuple[bool, Any, str | None, dict]:
    """Run one task attempt: (ok, result, error, output view). Never raises for the task's own failure."""
    started = time.monotonic()
    status_code = None
    try:
        scope = _scope(state, task, attempt)
        inputs, config, scope = _render_task(task, scope, inv.data)
        result = await _call(inv, task, inputs, config, scope)
        error = _status_error(result)
    except (ActionError, StepError) as exc:
        result, error = getattr(exc, "result", None), str(exc)
        status_code = getattr(exc, "status_code", None)
    except TimeoutError:
        result, error = None, f"timed out after {task.get('timeout')}s"
    return error is None, result, error, _view(task, result, error, attempt, started, status_code)


def _view(task: dict, result: Any, error: str | None, attempt: int, started: float, status_code: Any) -> dict:
    """The `output` of one task attempt (V10-6.3), as policies and the next task see it."""
    view = {"status": "error" if error else "ok", "data": result, "ref": None,
            "error": {"kind": "task", "retryable": True, "code": status_code, "message": error} if error else None,
            "meta": {"attempt": attempt, "duration_ms": int((time.monotonic() - started) * 1000)}}
    if task["kind"] == "http":
        code = status_code if status_code is not None else (result or {}).get("status_code") \
            if isinstance(result, dict) else None
        view["http"] = {"status": code, "headers": (result or {}).get("headers") if isinstance(result, dict) else None}
    if error and task["kind"] == "python":
        view["py"] = {"exception_type": error.split(":", 1)[0], "traceback": None}
    return view


def _status_error(result: Any) -> str | None:
    """V10-2.9: a mapping with status 'error' fails the task; its error is `error`, else `message`."""
    if isinstance(result, dict) and str(result.get("status", "")).lower() == "error":
        return str(result.get("error") or result.get("message") or "the task returned status: error")
    return None


def _render_task(task: dict, scope: dict[str, Any], step_input: dict[str, Any]
                 ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """V10-4.1/4.4: inputs (tool args < tool input < step input), then the config with `input` and bare
    input names bound (they shadow bare ctx names, never reserved names)."""
    raw = task["config"]
    inputs: dict[str, Any] = {}
    for key in ("args", "input"):
        if raw.get(key) is None:
            continue
        value = _render(raw[key], scope, key)
        if not isinstance(value, dict):
            raise StepError(f"{key} must be a mapping, got {type(value).__name__}")
        inputs.update(value)
    inputs.update(step_input or {})
    bound = dict(scope)
    for key, value in inputs.items():
        if key not in RESERVED:
            bound[key] = value
    bound["input"] = inputs
    config = {k: _render(v, bound, k) for k, v in raw.items() if k not in NOT_CONFIG}
    if "code_template" in raw:
        config["code"] = _render(raw["code_template"], bound, "script.source.code")
    return inputs, config, bound


def _render(value: Any, scope: dict[str, Any], key: str) -> Any:
    try:
        return render(value, scope)
    except TemplateError as exc:
        raise StepError(f"{key}: {exc}") from exc


ACTIONS = {"http": http_action.run, "postgres": postgres_action.run, "duckdb": duckdb_action.run,
           "secrets": secrets_action.run}


async def _call(inv: Invocation, task: dict, inputs: dict[str, Any], config: dict[str, Any],
                scope: dict[str, Any]) -> Any:
    kind = task["kind"]
    timeout = task.get("timeout")
    if kind == "noop":   # V10 §2.2: the rendered `result` key, else null
        return config.get("result")
    if kind == "python":
        code = config.get("code") if "code_template" in task["config"] else task["config"].get("code")
        return await _python(inv, str(code or ""), task["config"].get("libs"), inputs, scope, timeout)
    auth = config.pop("auth", config.pop("credential", None))
    if kind == "http":
        config["endpoint"] = config.pop("url", config.get("endpoint"))
        body = next((config[k] for k in ("json", "body", "payload", "data") if config.get(k) is not None), None)
        data: dict[str, Any] = {}
        if config.get("params"):
            data["query"] = config["params"]
        if body is not None:
            data["body"] = body
        timeout = timeout or _number(config.get("timeout")) or http_action.DEFAULT_TIMEOUT
    else:
        data = {}
    sub = Invocation(cmd=inv.cmd, type=kind, data=data, config=config, auth=auth, timeout=timeout, ports=inv.ports,
                     secrets=inv.secrets, notes=inv.notes)
    async with asyncio.timeout(timeout):
        output = await ACTIONS[kind](sub)
    return output.result


def _number(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


async def _python(inv: Invocation, code: str, libs: Any, inputs: dict[str, Any], scope: dict[str, Any],
                  timeout: float | None) -> Any:
    """V10 §3: script style (`result = ...`), or `main` when the code defines one; names: the inputs,
    `input_data`, `context` (read-only), os/json/datetime/uuid and the helpers, `libs` imports."""
    pool = inv.ports.python_pool
    if pool is None:
        raise ActionError("this worker has no python pool, so it cannot run python code")
    extra = "".join(_import_line(alias, module) for alias, module in libs.items()) if libs else ""
    context = ({k: v for k, v in scope.items() if not callable(v) and k != LENIENT}
               if _NEEDS_CONTEXT.search(code) else None)
    outcome = await pool.run(code, inputs, timeout, execution=inv.cmd.execution_id, context=context,
                             script=extra)
    if outcome.log:
        inv.notes.append(outcome.log.rstrip("\n"))
    if not outcome.ok:
        raise ActionError(outcome.error or "python code failed")
    return outcome.result


def _import_line(alias: str, module: Any) -> str:
    if isinstance(module, dict) and module.get("from") and module.get("import"):
        return f"from {module['from']} import {module['import']} as {alias}\n"
    if not str(alias).isidentifier() or not all(p.isidentifier() for p in str(module).split(".")):
        raise ActionError(f"libs: {alias!r}: {module!r} is not an importable module name")
    return f"import {module} as {alias}\n"
