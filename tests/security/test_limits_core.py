"""Issue 9 scope 5: the operator's caps on max_visits and iterator sizes (NOETL_MAX_VISITS,
NOETL_MAX_ITERATOR_ITEMS) and the maximums of python steps' `limits:` (NOETL_STEP_MAX_*), in the pure core:
given caps (as the adapters pass them in), when a playbook is loaded or folded, then over a cap is a located
error naming the cap and its setting, never a crash, and nothing else is harmed. The real runtimes honour the
same settings: tests/security/test_limits_settings.py."""
from __future__ import annotations

import pytest

from noetl_common.batch import fold_batch
from noetl_common.caps import (CEILING_MAX_ITERATOR_ITEMS, CEILING_MAX_VISITS, DEFAULT_MAX_ITERATOR_ITEMS,
                               DEFAULT_MAX_VISITS, Caps)
from noetl_common.codec import encode
from noetl_common.dsl import load_playbook, parse_playbook_yaml
from noetl_common.engine.errors import StepError
from noetl_common.engine.iterator import shape
from noetl_common.messages import StartExecution
from noetl_common.simulate import Outcome, Simulation, sim_key
from noetl_common.state import ExecutionState


def playbook(max_visits: object = None, limits: str | None = None) -> str:
    visits = f"    max_visits: {max_visits}\n" if max_visits is not None else ""
    action = (f"    type: python\n    limits: {limits}\n    code: 'def main(): return 1'\n" if limits else "")
    return ("apiVersion: noetl.io/v1\nkind: Playbook\nmetadata: {name: v, path: limits/visits}\nworkflow:\n"
            f"  - step: start\n    next: [{{step: loop}}]\n  - step: loop\n{visits}{action}"
            "    next: [{step: end}]\n  - step: end\n")


def errors(problems):
    return [p for p in problems if p.severity == "error"]


# --------------------------------------------------------------------------------------------- max_visits
def test_given_the_default_cap_when_max_visits_is_one_over_then_a_located_error_names_the_setting():
    book, problems = load_playbook(playbook(DEFAULT_MAX_VISITS + 1))
    [error] = errors(problems)
    assert book is None and error.path == "workflow[1].max_visits" and error.line == 8
    assert error.message.startswith(f"max_visits {DEFAULT_MAX_VISITS + 1:,} is over the cap of "
                                    f"{DEFAULT_MAX_VISITS:,} (NOETL_MAX_VISITS)")


def test_given_the_default_cap_when_max_visits_is_at_the_cap_then_it_loads():
    book, problems = load_playbook(playbook(DEFAULT_MAX_VISITS))
    assert book is not None and book.steps["loop"].max_visits == DEFAULT_MAX_VISITS, problems


def test_given_a_raised_cap_when_max_visits_is_above_the_default_then_it_loads_and_one_more_does_not():
    caps = Caps.of(max_visits=50_000)
    assert load_playbook(playbook(50_000), caps)[0].steps["loop"].max_visits == 50_000
    [error] = errors(load_playbook(playbook(50_001), caps)[1])
    assert "over the cap of 50,000 (NOETL_MAX_VISITS)" in error.message


def test_given_a_cap_below_100_when_max_visits_is_not_declared_then_the_step_gets_the_cap():
    book, problems = load_playbook(playbook(), Caps.of(max_visits=3))
    assert book is not None and book.steps["loop"].max_visits == 3, problems
    assert load_playbook(playbook())[0].steps["loop"].max_visits == 100   # the DSL's default otherwise


@pytest.mark.parametrize("value, message", [
    ("-1", "max_visits must be >= 1"), ("0", "max_visits must be >= 1"), ("'lots'", "must be an integer"),
    ("2.5", "must be an integer"), ("true", "must be an integer"), ("[1]", "must be an integer"),
    (str(10 ** 40), "over the cap of 10,000 (NOETL_MAX_VISITS)"), ("1.0e+300", "over the cap of 10,000"),
])
def test_given_hostile_max_visits_when_loaded_then_one_located_error(value, message):
    book, problems = load_playbook(playbook(value))
    assert book is None and [message in e.message for e in errors(problems)] == [True], problems


def test_the_loader_memoises_per_caps_so_one_cap_never_answers_for_another():
    text = playbook(20_000)
    assert load_playbook(text, Caps.of(max_visits=20_000))[0] is not None
    assert load_playbook(text)[0] is None
    assert load_playbook(text, Caps.of(max_visits=20_000))[0] is not None


# ----------------------------------------------------------------------------------- step limits maximums
def test_given_step_maximums_when_a_limit_is_over_then_the_error_names_step_limit_maximum_and_setting():
    caps = Caps.of(step_maximums={"memory_mb": 16384, "cpu_seconds": 600})
    book, problems = load_playbook(playbook(limits="{memory_mb: 16385, cpu_seconds: 600}"), caps)
    [error] = errors(problems)
    assert book is None and error.path == "workflow[1].limits.memory_mb" and error.line is not None
    assert error.message == "limits.memory_mb = 16385 is above the maximum 16384 (NOETL_STEP_MAX_MEMORY_MB)"


def test_given_step_maximums_when_a_limit_is_at_the_maximum_or_a_template_then_it_loads():
    caps = Caps.of(step_maximums={"memory_mb": 16384, "processes": 8})
    book, problems = load_playbook(playbook(limits="{memory_mb: 16384, processes: '{{ workload.n }}'}"), caps)
    assert book is not None, problems


def test_given_no_step_maximums_as_in_the_fold_when_a_limit_is_huge_then_the_worker_is_left_to_judge_it():
    book, problems = load_playbook(playbook(limits=f"{{memory_mb: {10 ** 30}}}"))
    assert book is not None, problems


def test_given_step_maximums_when_an_iterator_task_asks_too_much_then_its_location_is_named():
    text = ("apiVersion: noetl.io/v1\nkind: Playbook\nmetadata: {name: t, path: t}\nworkflow:\n"
            "  - step: start\n    next: [{step: each}]\n  - step: each\n    type: iterator\n    collection: [1]\n"
            "    element: x\n    task:\n      type: python\n      limits: {open_files: 100000}\n"
            "      code: 'def main(x): return x'\n    next: [{step: end}]\n  - step: end\n")
    [error] = errors(load_playbook(text, Caps.of(step_maximums={"open_files": 65536}))[1])
    assert error.path == "workflow[1].task.limits.open_files" and "(NOETL_STEP_MAX_OPEN_FILES)" in error.message


# ------------------------------------------------------------------------------------------ Caps itself
@pytest.mark.parametrize("kwargs", [
    {"max_visits": 0}, {"max_visits": -5}, {"max_visits": True}, {"max_visits": 2.0},
    {"max_visits": CEILING_MAX_VISITS + 1}, {"max_iterator_items": CEILING_MAX_ITERATOR_ITEMS + 1},
    {"max_iterator_items": "100"},
])
def test_caps_out_of_their_bounds_cannot_be_made(kwargs):
    with pytest.raises(ValueError):
        Caps(**kwargs)


# ------------------------------------------------------------------------------------------- iterators
def iterator_spec(collection: str):
    from noetl_common.dsl.models import IteratorSpec
    # shape() reads collection/element/where/order_by/limit/chunk only; the task is not needed here
    return IteratorSpec.model_construct(collection=collection, element="x", where=None, order_by=None,
                                        limit=None, chunk=None)


def test_given_the_default_cap_when_an_iterator_is_one_over_then_its_step_fails_naming_the_setting():
    with pytest.raises(StepError) as err:
        shape(iterator_spec("{{ range(100000) | list + [0] }}"), {})
    assert (f"iterator collection has {DEFAULT_MAX_ITERATOR_ITEMS + 1:,} items, over the limit of "
            f"{DEFAULT_MAX_ITERATOR_ITEMS:,} (NOETL_MAX_ITERATOR_ITEMS") in str(err.value)


def test_given_the_default_cap_when_an_iterator_is_at_the_cap_then_it_is_shaped():
    assert len(shape(iterator_spec("{{ range(100000) | list }}"), {})) == DEFAULT_MAX_ITERATOR_ITEMS


def test_given_a_cap_when_a_mapping_is_one_over_then_it_fails_too():
    with pytest.raises(StepError, match="has 4 items, over the limit of 3"):
        shape(iterator_spec("{{ {'a': 1, 'b': 2, 'c': 3, 'd': 4} }}"), {}, max_items=3)


ITERATE = {"apiVersion": "noetl.io/v1", "kind": "Playbook", "metadata": {"name": "it", "path": "limits/it"},
           "workload": {"n": 3},
           "workflow": [{"step": "start", "next": [{"step": "first"}]},
                        {"step": "first", "type": "python", "code": "def main(): return 1",
                         "next": [{"step": "each"}]},
                        {"step": "each", "type": "iterator", "collection": "{{ range(workload.n) | list }}",
                         "element": "x", "task": {"type": "python", "code": "def main(x): return x"},
                         "next": [{"step": "end"}]},
                        {"step": "end"}]}


def test_given_caps_when_one_execution_iterates_over_them_then_it_fails_and_the_other_completes():
    sim = Simulation(worker=lambda command: Outcome(result=command.index if command.index is not None else 1),
                     caps=Caps.of(max_iterator_items=3))
    sim.start(ITERATE, {"n": 4}, execution_id="big")
    sim.start(ITERATE, {"n": 3}, execution_id="small")
    sim.run()
    big, small = sim.states["big"], sim.states["small"]
    assert big.status == "FAILED" and big.steps["each"].status == "failed"
    assert "has 4 items, over the limit of 3 (NOETL_MAX_ITERATOR_ITEMS" in big.steps["each"].error
    assert small.status == "COMPLETED" and small.results["each"] == [0, 1, 2]
    assert (big.max_iterator_items, big.max_visits_cap) == (3, DEFAULT_MAX_VISITS)


def start(execution_id: str, document: dict, payload: dict) -> bytes:
    return encode(StartExecution(execution_id=execution_id, time=1000.0, playbook=document, path="limits/it",
                                 payload=payload, fact_key=sim_key(execution_id)))


class Rows:
    """A runtime's store of snapshots, as the batch fold sees it (what survives a restart)."""

    def __init__(self) -> None:
        self.rows: dict[str, bytes] = {}

    def take(self, eid: str) -> ExecutionState | None:
        raw = self.rows.get(eid)
        return ExecutionState.from_bytes(raw) if raw is not None else None

    def snapshot(self, eid: str) -> bytes | None:
        return self.rows.get(eid)

    def give_back(self, eid: str, raw: bytes | None, state: ExecutionState | None) -> None:
        if raw is not None:
            self.rows[eid] = raw


def test_given_an_execution_started_under_a_cap_when_the_runtime_restarts_with_another_then_it_keeps_its_own():
    from noetl_common.messages import ActionCompleted
    rows = Rows()
    out = fold_batch(rows, [start("e", ITERATE, {"n": 5})], now=1000.0, caps=Caps.of(max_iterator_items=4))
    [command] = out.commands
    assert ExecutionState.from_bytes(rows.rows["e"]).max_iterator_items == 4
    # the runtime restarts with a higher cap; the execution's next message comes in
    done = ActionCompleted(execution_id="e", command_id=command.command_id, time=1001.0, result=1,
                           token=command.token)
    fold_batch(rows, [encode(done)], now=1001.0, caps=Caps.of(max_iterator_items=1000))
    state = ExecutionState.from_bytes(rows.rows["e"])
    assert state.status == "FAILED" and "over the limit of 4 (NOETL_MAX_ITERATOR_ITEMS" in state.steps["each"].error
    # a new execution takes the new cap
    fold_batch(rows, [start("f", ITERATE, {"n": 5})], now=1002.0, caps=Caps.of(max_iterator_items=1000))
    assert ExecutionState.from_bytes(rows.rows["f"]).max_iterator_items == 1000


def test_given_a_start_over_the_fold_caps_max_visits_then_that_execution_fails_naming_the_setting():
    document, _lines, _problems = parse_playbook_yaml(playbook(500))
    rows = Rows()
    out = fold_batch(rows, [start("over", document, {}), start("fine", ITERATE, {})], now=1000.0,
                     caps=Caps.of(max_visits=100))
    over = ExecutionState.from_bytes(rows.rows["over"])
    assert over.status == "FAILED" and "max_visits 500 is over the cap of 100 (NOETL_MAX_VISITS)" in over.error
    assert ExecutionState.from_bytes(rows.rows["fine"]).status == "RUNNING" and not out.dead_letters


def test_a_snapshot_from_before_the_settings_keeps_the_old_constants():
    state = ExecutionState(execution_id="old", path="p", playbook={}, workload={}, started=0.0)
    raw = state.model_dump_json(exclude={"max_visits_cap", "max_iterator_items"}).encode()
    old = ExecutionState.from_bytes(raw)
    assert (old.max_visits_cap, old.max_iterator_items) == (DEFAULT_MAX_VISITS, DEFAULT_MAX_ITERATOR_ITEMS)
