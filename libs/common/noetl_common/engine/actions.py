"""Turning a step into a command: render what the fold may render, defer what only a worker may see.

Templates that use action-side names (`secret`, `uuid`) stay raw and are listed in `deferred`; the worker
renders them with the shipped `context`. `save` blocks are rendered on the worker too (they need the
result), so the values their templates reference travel along. Only referenced names are shipped, except
for python code that reads NoETL's `context` global (issue 11): it gets the whole render context.
"""
from __future__ import annotations

import re
from typing import Any

from noetl_common.attempt_tokens import token_for
from noetl_common.dsl.models import Step
from noetl_common.engine import v10
from noetl_common.engine.errors import StepError
from noetl_common.engine.tick import Tick
from noetl_common.messages import ActionSpec, Command
from noetl_common.paths import Key, lookup
from noetl_common.pipeline_result import shipped
from noetl_common.paths import text as path_text
from noetl_common.render import LENIENT, TemplateError, missing_paths, referenced_names, render
from noetl_common.state import ExecutionState, Work

ACTION_SIDE = frozenset({"secret", "uuid"})
WORKER_BOUND = frozenset({"secret", "uuid", "now", "result", "this"})   # the worker binds these itself
# python code naming `context` reads NoETL's read-only context (execution_id, workload, step results...);
# a word match is cheap and errs towards shipping (a comment that says "context" ships it too).
_READS_CONTEXT = re.compile(r"\bcontext\b")


def command_id(execution_id: str, step: str, visit: int, attempt: int, index: int | None = None,
               phase: str = "action", part: int = 0) -> str:
    cid = f"{execution_id}:{step}:{visit}:{attempt}"
    if index is not None:
        cid += f":{index}"
    if part:   # a later command of a pipeline split at playbook tasks (engine/composition.py)
        cid += f":p{part}"
    return cid + (":save" if phase == "save" else "")


def render_inputs(step: Step, context: dict[str, Any], edge_data: dict[str, Any] | None = None
                  ) -> tuple[dict[str, Any], list[list[Key]]]:
    """Render a step's `data` (edge data merged over it, edge wins). Returns (data, deferred paths)."""
    deferred: list[list[Key]] = []
    if isinstance(step.data, str):
        data = _inputs_from_expression(step.data, context)
    else:
        data = _render_deferring(step.data, context, ("data", None), deferred)
    if edge_data:
        data = {**data, **edge_data}
        # an input the edge replaced is no template any more: the worker must not render it
        deferred = [p for p in deferred if not (len(p) > 1 and p[1] in edge_data)]
    if step.assert_expects:
        missing = _missing_expects(step, data, context)
        if missing:
            raise StepError(f"assert.expects: missing input(s) {', '.join(missing)}")
    return data, deferred


def _inputs_from_expression(template: str, context: dict[str, Any]) -> dict[str, Any]:
    """`data: "{{ x.data }}"`: the expression's value is the mapping of inputs (null: no inputs)."""
    hidden = referenced_names(template) & ACTION_SIDE
    if hidden:
        raise StepError(f"data: {template!r} reads {', '.join(sorted(hidden))}, which only the worker may see: "
                        f"give data as a mapping")
    try:
        value = render(template, context)
    except TemplateError as exc:
        raise StepError(f"data: {exc}") from exc
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise StepError(f"data: {template!r} gave a {type(value).__name__}, not a mapping of named inputs")
    return dict(value)


def _missing_expects(step: Step, data: dict[str, Any], context: dict[str, Any]) -> list[str]:
    """DSL §2.9 `assert.expects`: `x.y` names an input, and so does `data.x.y`; `auth.<alias>` names an
    entry of the step's (rendered) `auth`."""
    missing, auth = [], None
    for path in step.assert_expects:
        head, _, rest = path.partition(".")
        if not missing_paths(data, [path]) or (head == "data" and rest and not missing_paths(data, [rest])):
            continue
        if head == "auth" and step.auth is not None:
            if auth is None:
                auth = _render_deferring(step.auth, {**context, "data": data}, ("auth", None), [])
            if not rest or not missing_paths(auth, [rest]):
                continue
        missing.append(path)
    return missing


def build_action(step: Step, context: dict[str, Any], data: dict[str, Any], deferred: list[list[Key]]
                 ) -> ActionSpec:
    """The rendered action of one step visit (or one iteration). `code` is never rendered."""
    if step.type == "pipeline":   # v10: the worker renders each task just before it runs (V10-4.2)
        return ActionSpec(type="pipeline", data=data, config=step.config, timeout=step.timeout,
                          context=_pipeline_context(step, context))
    deferred = list(deferred)
    scope = {**context, "data": data}
    raw_config = {k: v for k, v in step.config.items() if k != "code"}
    config = _render_deferring(raw_config, scope, ("config", None), deferred)
    if "code" in step.config:
        config["code"] = step.config["code"]
    auth = _render_deferring(step.auth, scope, ("auth", None), deferred)
    save = step.save.model_dump() if step.save else None
    names: set[str] = set()
    for path in deferred:
        names |= referenced_names(lookup({"data": data, "config": config, "auth": auth}, path))
    if save:
        names |= referenced_names({k: v for k, v in save.items() if k != "code"})
    if _reads_context(step.config.get("code")) or (save and _reads_context(save.get("code"))):
        names |= set(scope) - {"data"}   # the data arrives as main()'s arguments already
    shipped = {name: scope[name] for name in names - WORKER_BOUND if name in scope and not callable(scope[name])}
    return ActionSpec(type=step.type or "save", data=data, config=config, auth=auth, timeout=step.timeout,
                      assert_returns=step.assert_returns, save=save, deferred=deferred, context=shipped)


# Always shipped to a pipeline: small, and read by its policies, `set`s and python `context` helpers.
_PIPELINE_NAMES = frozenset({"ctx", "workload", "vars", "iter", "job", "execution_id", "catalog_id",
                             "parent_execution_id", "loop_index", "loop", LENIENT})


def _pipeline_context(step: Step, context: dict[str, Any]) -> dict[str, Any]:
    """The names a pipeline's templates use (a large step result is shipped only to the steps that read
    it), or the whole context when python code reads NoETL's `context`."""
    names = _pipeline_names(step)
    if names is None:
        # a pipeline result is shipped compact (the worker builds its view): once, not three times
        return v10.ship_context({k: shipped(v) for k, v in context.items() if not callable(v)})
    element = context.get("iter")
    if isinstance(element, dict):   # the bare iterator name of a loop
        names |= {k for k in element if not k.startswith("_")}
    return v10.ship_context({k: shipped(context[k]) for k in names if k in context and not callable(context[k])})


# A memo of _pipeline_names by config: id -> (the config, names); holding the config keeps its id from being
# reused. A pure function of the step, so a fold that starts afresh (a restart) computes the same.
_SHIPPED: dict[int, tuple[dict[str, Any], frozenset[str] | None]] = {}
_SHIPPED_MAX = 2048


def _pipeline_names(step: Step) -> frozenset[str] | None:
    """The context names a pipeline's tasks read (None: its python reads NoETL's `context`, ship it all).
    Worked out once per step: parsing every task's templates on every dispatch was the largest cost a v10
    step added to the fold."""
    config = step.config
    cached = _SHIPPED.get(id(config))
    if cached is not None and cached[0] is config:
        return cached[1]
    tasks = config.get("tasks") or []
    names: frozenset[str] | None = None
    if not any(_reads_context(task.get("config", {}).get("code")) for task in tasks):
        templates = [{k: v for k, v in task.get("config", {}).items() if k != "code"} for task in tasks]
        templates += [[task.get("set"), task.get("rules")] for task in tasks]
        names = frozenset(referenced_names(templates) | _PIPELINE_NAMES)
    if len(_SHIPPED) >= _SHIPPED_MAX:
        _SHIPPED.clear()
    _SHIPPED[id(config)] = (config, names)
    return names


def send(tick: Tick, step: str, visit: int, attempt: int, action: ActionSpec, *, index: int | None = None,
         phase: str = "action", result: Any = None, part: int = 0, resume: dict[str, Any] | None = None) -> None:
    """`action` is the visit's (or iteration's) action; `part`/`resume` make it a later command of a pipeline
    split at playbook tasks (its child, or its continuation: `work_action`)."""
    s = tick.state
    cid = command_id(s.execution_id, step, visit, attempt, index, phase, part)
    work = s.work[cid] = Work(command_id=cid, step=step, visit=visit, attempt=attempt, index=index, phase=phase,
                              dispatched=tick.time, result=result if phase == "save" else None)
    if part:
        work.part, work.resume = part, resume
        action = resumed_action(action, resume)
    tick.commands.append(Command(
        command_id=cid, execution_id=s.execution_id, parent_execution_id=s.parent_execution_id, step=step,
        visit=visit, attempt=attempt, index=index, phase=phase, result=result, action=action, time=tick.time,
        lease_seconds=s.lease_seconds, token=token_for(s.fact_key, cid)))


def _reads_context(code: Any) -> bool:
    return isinstance(code, str) and _READS_CONTEXT.search(code) is not None


def _render_deferring(value: Any, context: dict[str, Any], at: Any, deferred: list[list[Key]]) -> Any:
    """`at` is where `value` sits: (key, parent's `at`), a chain made into a path only when needed."""
    if isinstance(value, dict):
        return {k: _render_deferring(v, context, (k, at), deferred) for k, v in value.items()}
    if isinstance(value, list):
        return [_render_deferring(v, context, (i, at), deferred) for i, v in enumerate(value)]
    if isinstance(value, str) and ("{{" in value or "{%" in value):
        if referenced_names(value) & ACTION_SIDE:
            deferred.append(_path(at))
            return value
        try:
            return render(value, context)
        except TemplateError as exc:
            raise StepError(f"{path_text(_path(at))}: {exc}") from exc
    return value


def _path(at: Any) -> list[Key]:
    path: list[Key] = []
    while at is not None:
        key, at = at
        path.append(key)
    return path[::-1]


def resumed_action(base: ActionSpec, resume: dict[str, Any] | None) -> ActionSpec:
    """The action of a later command of a split pipeline: its child playbook (`resume.child`), or the
    pipeline again with the state to resume from (`config.resume`, read by the worker's pipeline action)."""
    if resume is None:
        return base
    child = resume.get("child")
    if isinstance(child, dict):
        return ActionSpec(type="playbook", data=child.get("input") if isinstance(child.get("input"), dict) else {},
                          config={k: child.get(k) for k in ("path", "version", "return_step")},
                          timeout=child.get("timeout"))
    return base.model_copy(update={"config": {**base.config, "resume": resume}})


def work_action(run: Any, work: Work) -> ActionSpec | None:
    """The action a work in flight runs (what a re-send sends again), None once its visit forgot it."""
    base = run.iteration.actions.get(work.index) if work.index is not None and run.iteration else run.action
    if base is None or not work.part:
        return base
    return resumed_action(base, work.resume)


def redeliver(state: ExecutionState, include_children: bool = False) -> list[Command]:
    """The commands of every attempt still in flight, rebuilt from the state with their original ids.

    A runtime that lost its in-flight messages (an embedded server restart) sends these again; workers and
    the fold drop what they already saw, by command id and attempt.
    """
    commands = []
    for work in state.work.values():
        action = work_action(state.steps[work.step], work)
        if action is None or (work.child_execution_id and not include_children):
            continue   # a started child reports back by itself
        commands.append(Command(
            command_id=work.command_id, execution_id=state.execution_id, parent_execution_id=state.parent_execution_id,
            step=work.step, visit=work.visit, attempt=work.attempt, index=work.index, phase=work.phase,
            result=work.result, action=action, time=work.dispatched, lease_seconds=state.lease_seconds,
            token=token_for(state.fact_key, work.command_id)))
    return commands
