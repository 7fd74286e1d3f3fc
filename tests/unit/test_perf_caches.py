"""The caches behind issue 11's performance work (docs/dialect-v10.md "Performance") give the same answers as
the work they save: the snapshot bytes, the names a pipeline ships, script-style python run twice, the
read-only `context`, and the step process's warm-up call."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from noetl_common.dsl import load_playbook
from noetl_common.engine.actions import _pipeline_names, build_action
from noetl_common.simulate import Outcome, Simulation
from noetl_common.state import ExecutionState
from noetl_worker import _python_child as child

V1 = {"apiVersion": "noetl.io/v1", "kind": "Playbook", "metadata": {"name": "c", "path": "c"}, "workflow": [
    {"step": "start", "next": [{"step": "a"}]},
    {"step": "a", "type": "python", "data": {"n": 1}, "code": "def main(n):\n    return n\n",
     "next": [{"step": "end"}]},
    {"step": "end"}]}
V10 = {"apiVersion": "noetl.io/v2", "kind": "Playbook", "metadata": {"name": "c", "path": "c"}, "workflow": [
    {"step": "start", "tool": {"kind": "noop"}, "next": {"arcs": [{"step": "a"}]}},
    {"step": "a", "input": {"n": 1}, "tool": {"kind": "python", "code": "result = n"},
     "set": {"ctx.seen": "{{ output.data }}"}, "next": {"arcs": [{"step": "end"}]}},
    {"step": "end", "tool": {"kind": "noop"}}]}


@pytest.mark.parametrize("document", [V1, V10], ids=["v1", "v10"])
def test_a_snapshot_is_the_bytes_of_the_whole_model_after_every_message(document):
    sim = Simulation(lambda cmd: Outcome(result=cmd.action.data.get("n")))
    sim.start(document)
    seen = 0
    while sim.inbox:
        sim.deliver(sim.inbox.pop(0))
        state = sim.state()
        assert state.to_bytes() == state.model_dump_json().encode()
        assert ExecutionState.from_bytes(state.to_bytes()).model_dump() == state.model_dump()
        seen += 1
    assert seen >= 3 and sim.state().status == "COMPLETED", sim.state().error


def test_a_snapshot_follows_a_new_playbook_and_hostile_strings():
    quote = 'e,"workload":{"x":1},"path":"'
    state = ExecutionState(execution_id=quote, path=quote + "\\", version=7, playbook={"workload": ',"workload":'},
                           workload={"workload": quote}, started=1.0)
    assert state.to_bytes() == state.model_dump_json().encode()
    state.playbook = {"metadata": {"name": "other"}}          # a different document: encoded anew
    assert state.to_bytes() == state.model_dump_json().encode()
    assert json.loads(state.to_bytes())["playbook"] == {"metadata": {"name": "other"}}


def _pipeline_step(code: str, extra: dict | None = None):
    document = {"apiVersion": "noetl.io/v2", "kind": "Playbook", "metadata": {"name": "p", "path": "p"},
                "workflow": [{"step": "start", "tool": {"kind": "python", "code": code, **(extra or {})}}]}
    playbook, problems = load_playbook(document)
    assert playbook is not None, problems
    return playbook.steps["start"]


def test_the_shipped_names_are_those_of_each_step_however_often_asked():
    plain = _pipeline_step("result = 1", {"input": {"a": "{{ big_result.x }}"}})
    reader = _pipeline_step("result = context['execution_id']")
    for _ in range(3):
        assert "big_result" in _pipeline_names(plain) and "other" not in _pipeline_names(plain)
        assert _pipeline_names(reader) is None          # reads NoETL's context: everything is shipped
    context = {"big_result": {"x": 1}, "other": 2, "ctx": {}, "execution_id": "e"}
    action = build_action(plain, context, {}, [])
    assert set(action.context) == {"big_result", "ctx", "execution_id"}
    assert set(build_action(reader, context, {}, []).context) == set(context)


def test_script_python_gives_the_same_answer_each_call_and_its_errors_each_time():
    codes: dict = {}
    plans: dict = {}
    for n in range(3):
        assert json.loads(child.run_one("return n * 2", {"n": n}, {}, codes, plans, "")) == [True, n * 2, None]
    for _ in range(2):
        ok, _, error = json.loads(child.run_one("result = (", {}, {}, codes, plans, ""))
        assert not ok and error.startswith("SyntaxError")


def test_the_context_is_read_only_all_the_way_down_and_shared_maps_stay_one():
    ctx = {"a": [1, {"b": 2}]}
    frozen = child.freeze({"ctx": ctx, "vars": ctx, "n": 1, "t": (1, 2)})
    assert frozen == {"ctx": ctx, "vars": ctx, "n": 1, "t": [1, 2]}
    assert frozen["ctx"] is frozen["vars"]
    for mutate in (lambda: frozen["ctx"].update(x=1), lambda: frozen["ctx"]["a"].append(3),
                   lambda: frozen["ctx"]["a"][1].__setitem__("b", 3), lambda: frozen.pop("n")):
        with pytest.raises(TypeError):
            mutate()
    assert ctx == {"a": [1, {"b": 2}]}


def test_the_warm_up_call_is_one_a_step_process_can_run():
    """The supervisor's warm-up call must match step_main's call format (it silently did not, once)."""
    slot_source = (Path(child.__file__).with_name("_python_slot.py")).read_text()
    assert 'pickle.dumps((_WARM_UP, {}, None, ""))' in slot_source
    code, data, context, script = pickle.loads(pickle.dumps(("def main():\n    return None\n", {}, None, "")))
    assert json.loads(child.run_one(code, data, context, {}, {}, script)) == [True, None, None]
