"""The fold's primitives for NoETL DSL v2/v10 documents (docs/dialect-v10.md): the render context with the
execution-scoped `ctx` map, `set` writes, the `output` view of a finished step, and exclusive/inclusive
routing with lenient `when`. Pure; called from lifecycle/tick only for playbooks whose dialect is not v1.

The `ctx` map lives in the execution state as `ExecutionState.variables` (the v1 `save: {name}` store,
which v10 documents cannot use): its writes travel as patches on `ActionCompleted.variables` (pipeline
policies) or are made by the fold itself (step and arc `set`), and are logged in `meta.set` of the event
that caused them, so a replay of the messages rebuilds it.
"""
from __future__ import annotations

from typing import Any

from noetl_common.dsl.models import Edge, Step
from noetl_common.pipeline_result import view, views
from noetl_common.engine.errors import StepError
from noetl_common.render import LENIENT, TemplateError, evaluate, render, truthy

ERROR_STATUSES = frozenset(("error", "failed", "failure"))


# `workload` and `vars` name the same map as `ctx` (V10 §6). A command ships that map once, under `ctx`; the
# worker binds the other two names to it again (`ship_context` / `unship_context`).
CTX_ALIASES = ("workload", "vars")


def context(variables: dict[str, Any], results: dict[str, Any], workload: dict[str, Any], execution_id: str,
            parent_execution_id: str | None, now: Any, compact: Any = None) -> dict[str, Any]:
    """V10 §6: bare ctx/workload keys < step results < reserved names. `workload`, `ctx` and `vars` are one
    map: the effective workload overlaid with every `set` write so far. `compact`: the names of the results
    stored compact (a pipeline's result; `ExecutionState.compact_results`), None to look at every result."""
    ctx = {**workload, **variables}
    if compact is None:
        scope: dict[str, Any] = {**ctx, **views(results)}
    else:   # only the compact results need their view: no pass over every result per message
        scope = {**ctx, **results}
        for name in compact:
            scope[name] = view(results[name])
    scope.update(workload=ctx, ctx=ctx, vars=ctx, execution_id=execution_id, catalog_id=None, **{LENIENT: True},
                 parent_execution_id=parent_execution_id, now=now,
                 job={"uuid": execution_id, "execution_id": execution_id, "id": execution_id})
    return scope


def ship_context(context: dict[str, Any]) -> dict[str, Any]:
    """The context as a command carries it: the `ctx` map once, without its aliases (a command of a run whose
    `ctx` is large was three copies of it, encoded, stored and decoded on every dispatch)."""
    ctx = context.get("ctx")
    if ctx is None or not any(context.get(alias) is ctx for alias in CTX_ALIASES):
        return context
    return {k: v for k, v in context.items() if not (k in CTX_ALIASES and v is ctx)}


def unship_context(context: dict[str, Any]) -> dict[str, Any]:
    """The context a command carries, with `workload` and `vars` bound to its `ctx` again (a new dict). A
    command of an older fold carries all three: they are kept as they came."""
    context = dict(context)
    ctx = context.get("ctx")
    if isinstance(ctx, dict):
        for alias in CTX_ALIASES:
            context.setdefault(alias, ctx)
    return context


def outcome(result: Any, error: str | None = None) -> dict[str, Any]:
    """The `output` view of a finished step (V10-6.3): `data` is the result's `data` key when it has one."""
    failed = error is not None or (isinstance(result, dict) and str(result.get("status", "")).lower()
                                   in ERROR_STATUSES)
    data = result.get("data", result) if isinstance(result, dict) else result
    return {"status": "error" if failed else "ok", "data": data,
            "error": {"kind": "step", "retryable": False, "code": None, "message": error} if error else None,
            "ref": None, "meta": {}}


def step_scope(base: dict[str, Any], step: Step, result: Any, error: str | None, event: str) -> dict[str, Any]:
    result = view(result)
    out = outcome(result, error)
    return {**base, "result": result, "this": result, "response": result, "output": out, "outcome": out,
            "error": out["error"], "event": {"name": event, "step": step.name}}


def render_sets(sets: dict[str, Any], scope: dict[str, Any], where: str) -> list[tuple[list[str], Any]]:
    """Render one `set` against the context as it was before (V10-7.3): [(path, value)] in YAML order."""
    writes = []
    for key, template in sets.items():
        try:
            value = render(template, scope)
        except TemplateError as exc:
            raise StepError(f"{where} set '{key}': {exc}") from exc
        parts = key.split(".")
        if parts[0] in ("ctx", "step", "iter", "vars") and len(parts) > 1:
            parts = parts[1:]   # iter.* outside a loop writes ctx, as upstream (V10-7.2)
        writes.append((parts, value))
    return writes


def apply_writes(variables: dict[str, Any], writes: list[tuple[list[str], Any]]) -> dict[str, Any]:
    """Apply writes to the ctx map in place; returns the patch (top-level keys with their new values).
    A dotted remainder writes a nested path (`ctx.a.b: 1` sets `a: {b: 1}`)."""
    patch: dict[str, Any] = {}
    for parts, value in writes:
        head = parts[0]
        if len(parts) == 1:
            variables[head] = value
        else:
            node = dict(variables.get(head)) if isinstance(variables.get(head), dict) else {}
            variables[head] = node
            for part in parts[1:-1]:
                child = dict(node.get(part)) if isinstance(node.get(part), dict) else {}
                node[part] = child
                node = child
            node[parts[-1]] = value
        patch[head] = variables[head]
    return patch


def holds(when: str | None, scope: dict[str, Any], where: str) -> bool:
    """V10-5.3: no `when` matches; an undefined name makes a `when` false; other render errors fail."""
    if when is None:
        return True
    try:
        return truthy(evaluate(when, scope))
    except TemplateError as exc:
        if "undefined" in str(exc) or "no element" in str(exc) or "has no attribute" in str(exc):
            return False
        raise StepError(f"when '{when}' ({where}) failed: {exc}") from exc


def fire(step: Step, scope: dict[str, Any], failed: bool = False) -> list[Edge]:
    """Exclusive: the first matching arc; inclusive: every matching arc. On a failed step only arcs with a
    `when` can fire (V10-5.8)."""
    fired = []
    for edge in step.next:
        if failed and edge.when is None:
            continue
        if holds(edge.when, scope, edge.path):
            fired.append(edge)
            if step.next_mode == "exclusive":
                break
    return fired


def loop_scope(base: dict[str, Any], element: str, index: int, item: Any, size: int) -> dict[str, Any]:
    """V10-8.1: `iter.<iterator>`, the bare iterator, `iter._index/_first/_last`, `loop_index`, `loop`."""
    it = {element: item, "_index": index, "_first": index == 0, "_last": index == size - 1}
    return {**base, element: item, "iter": it, "loop_index": index,
            "loop": {"index": index, "first": index == 0, "length": size, "done": False}}


def trail(tick: Any, step: str, tasks: list[dict[str, Any]] | None, index: int | None, failed: bool) -> None:
    """V10-11.2: a pipeline's task attempts as events, between the step attempt's action_started and its
    final action_completed/action_error: a retried attempt is an `action_error` + `action_retry`, the
    attempt after it an `action_started` (so the report's `attempts` counts task attempts, V10-11.3). The
    final failed attempt is the fold's own action_error."""
    entries = list(tasks or [])[:1000]
    for n, entry in enumerate(entries):
        attempt = int(entry.get("attempt") or 1)
        meta = {"task": entry.get("task"), "directive": entry.get("directive")}
        if attempt > 1:   # also for the final failed attempt: the report counts it (V10-11.3)
            tick.emit("action_started", step, "task", "STARTED", attempt=attempt, current_index=index, meta=meta)
        if entry.get("ok") or (failed and n == len(entries) - 1):
            continue
        tick.emit("action_error", step, "task", "FAILED", attempt=attempt, error=entry.get("error"),
                  current_index=index, meta=meta)
        if entry.get("directive") == "retry":
            tick.emit("action_retry", step, "step", "RETRYING", attempt=attempt, current_index=index,
                      result={"attempt": attempt, "next_attempt": attempt + 1, "delay": entry.get("delay", 0),
                              "kind": "policy", "task": entry.get("task")})


def noop_result(step: Step, scope: dict[str, Any]) -> Any:
    if not step.has_result:
        return None
    try:
        return render(step.result, scope)
    except TemplateError as exc:
        raise StepError(f"result: {exc}") from exc
