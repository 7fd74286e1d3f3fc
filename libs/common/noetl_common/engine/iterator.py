"""Iterators (DSL §2.6): shape the collection once, then one command per item, `concurrency` in flight.

Results are kept by index so the step result is in collection order whatever order items finish in.
After an item fails (its own retries spent) no new item starts; in-flight ones settle, then the step fails.
"""
from __future__ import annotations

from typing import Any

from noetl_common.caps import DEFAULT_MAX_ITERATOR_ITEMS, MAX_ITERATOR_ITEMS_SETTING
from noetl_common.dsl.models import IteratorSpec, Step
from noetl_common.engine import v10
from noetl_common.engine.actions import build_action, render_inputs, send
from noetl_common.engine.errors import StepError
from noetl_common.engine.lifecycle import complete_step, fail_step
from noetl_common.engine.tick import Tick
from noetl_common.pipeline_result import view
from noetl_common.render import TemplateError, evaluate, render, truthy
from noetl_common.state import IteratorRun, StepRun


def start(tick: Tick, step: Step, run: StepRun, context: dict[str, Any]) -> None:
    spec = step.iterator
    assert spec is not None
    run.iteration = IteratorRun(items=shape(spec, context, tick.state.max_iterator_items))
    fill(tick, step, run)


def shape(spec: IteratorSpec, context: dict[str, Any], max_items: int = DEFAULT_MAX_ITERATOR_ITEMS) -> list[Any]:
    """where → order_by → limit → chunk. `max_items`: the operator's cap (the execution's state holds it,
    noetl_common.caps): each item is a command and a few events, so a collection of millions would hold the
    fold and the event log for one execution's sake. Checked on the collection as rendered, before filtering."""
    try:
        collection = render(spec.collection, context)
        if isinstance(collection, dict):
            items = [{"key": k, "value": v} for k, v in collection.items()]
        elif collection is None:
            items = []
        elif isinstance(collection, (list, tuple)):
            items = list(collection)
        else:
            raise StepError(f"iterator collection must be a list or a mapping, got {type(collection).__name__}: "
                            f"{str(collection)[:100]}")
        if len(items) > max_items:
            raise StepError(f"iterator collection has {len(items):,} items, over the limit of {max_items:,} "
                            f"({MAX_ITERATOR_ITEMS_SETTING}; filter it, or split the work across executions)")
        if spec.where:
            items = [it for it in items if truthy(evaluate(spec.where, {**context, spec.element: it}))]
        if spec.order_by:
            items.sort(key=lambda it: evaluate(spec.order_by or "", {**context, spec.element: it}))
    except TemplateError as exc:
        raise StepError(f"iterator: {exc}") from exc
    except TypeError as exc:   # order_by keys that cannot be compared
        raise StepError(f"iterator order_by '{spec.order_by}': {exc}") from exc
    if spec.limit is not None:
        items = items[: spec.limit]
    if spec.chunk:
        items = [items[i: i + spec.chunk] for i in range(0, len(items), spec.chunk)]
    return items


def item_context(context: dict[str, Any], step: Step, index: int, item: Any, size: int) -> dict[str, Any]:
    spec = step.iterator
    assert spec is not None
    if spec.collect_all:   # a v10 `loop:` (V10-8.1): iter, loop_index, loop
        return v10.loop_scope(context, spec.element, index, item, size)
    loop = {"index": index, "count": index + 1, "size": size, "item": item}
    return {**context, spec.element: item, "_loop": loop, "index": index, step.name: {"result_index": index}}


def fill(tick: Tick, step: Step, run: StepRun) -> None:
    """Dispatch items while below the concurrency cap; finish the step when every item has settled."""
    spec, it = step.iterator, run.iteration
    assert spec is not None and it is not None
    cap = spec.concurrency if spec.mode == "async" else 1
    while (not it.failed or spec.collect_all) and it.next_index < it.size and len(it.attempts) < cap:
        index = it.next_index
        it.next_index += 1
        item = it.items[index]
        tick.emit("iteration_started", step.name, "iteration", "RUNNING", current_index=index, current_item=item)
        scope = item_context(tick.context(), step, index, item, it.size)
        try:
            data, deferred = render_inputs(spec.task, scope)
            it.actions[index] = build_action(spec.task, scope, data, deferred)
        except StepError as exc:
            it.failed[index] = str(exc)
            tick.emit("iteration_failed", step.name, "iteration", "FAILED", current_index=index,
                      current_item=item, error=str(exc))
            if spec.collect_all:
                continue
            break
        it.attempts[index] = 1
        send(tick, step.name, run.visit, 1, it.actions[index], index=index)
    settled = len(it.results) + len(it.failed) == it.size if spec.collect_all else it.failed
    if not it.attempts and (settled or len(it.results) == it.size):
        _finish(tick, step, run)


def item_completed(tick: Tick, step: Step, run: StepRun, index: int, result: Any, *, attempt: int | None = None,
                   command_id: str | None = None, log: str | None = None) -> None:
    """`attempt`, `command_id` and the captured output `log` of the attempt that succeeded (noetl_common.
    attempt_logs: an item's attempt has no action_completed, so its end carries them)."""
    it = run.iteration
    assert it is not None
    it.results[index] = result
    it.attempts.pop(index, None)
    it.actions.pop(index, None)
    tick.emit("iteration_completed", step.name, "iteration", "COMPLETED", current_index=index,
              current_item=it.items[index], result=result, attempt=attempt, command_id=command_id,
              meta={"log": log} if log is not None else None)
    fill(tick, step, run)


def item_failed(tick: Tick, step: Step, run: StepRun, index: int, error: str) -> None:
    it = run.iteration
    assert it is not None
    it.failed[index] = error
    it.attempts.pop(index, None)
    it.actions.pop(index, None)
    tick.emit("iteration_failed", step.name, "iteration", "FAILED", current_index=index,
              current_item=it.items[index], error=error)
    fill(tick, step, run)


def _finish(tick: Tick, step: Step, run: StepRun) -> None:
    it = run.iteration
    assert it is not None and step.iterator is not None
    if step.iterator.collect_all:
        return _finish_v10(tick, step, run)
    if it.failed:
        detail = "; ".join(f"[{i}] {err}" for i, err in sorted(it.failed.items()))
        return fail_step(tick, step.name, f"iteration(s) {', '.join(map(str, sorted(it.failed)))} failed: {detail}")
    result = [it.results[i] for i in range(it.size)]
    tick.emit("iterator_completed", step.name, "iterator", "COMPLETED", result=result)
    if step.save is not None:   # a step-level save sees result = the list; it runs on a worker
        action = build_action(Step(name=step.name, type="save", save=step.save), tick.context(), {}, [])
        send(tick, step.name, run.visit, run.attempt, action, phase="save", result=result)
        return
    complete_step(tick, step.name, result)


def _finish_v10(tick: Tick, step: Step, run: StepRun) -> None:
    """V10-8.4/8.5: every iteration ran; the result is {results, stats} in collection order (null for a
    failed iteration), and the step fails, naming the failed indexes, if any iteration failed."""
    it = run.iteration
    assert it is not None
    results = [view(it.results.get(i)) for i in range(it.size)]   # an iteration's pipeline result, as read
    result = {"results": results, "stats": {"total": it.size, "success": len(it.results), "failed": len(it.failed)}}
    if it.failed:
        tick.state.set_result(step.name, result)
        detail = "; ".join(f"[{i}] {err}" for i, err in sorted(it.failed.items()))
        return fail_step(tick, step.name, f"iteration(s) {', '.join(map(str, sorted(it.failed)))} failed: {detail}")
    tick.emit("iterator_completed", step.name, "iterator", "COMPLETED", result=result)
    complete_step(tick, step.name, result)
