"""`load_playbook` memoises the playbooks it loads (thousands of executions share one), so what it hands out is
read-only (noetl_common/dsl/read_only.py): an edit in place by a caller (a step's `config`, its `data`, an
edge, the `workload` defaults, a model's attribute) raises TypeError instead of reaching the next caller or a
later run; copies are ordinary mutable data; and the fold's state owns its workload, so a change to a state
never reaches the playbook either. Pure core: the real loader, the real fold (noetl_common.simulate).
"""
from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from noetl_common.dsl import Playbook, _load, load_playbook
from noetl_common.dsl.read_only import plain
from noetl_common.simulate import Outcome, Simulation

ROOT = Path(__file__).resolve().parents[2]
TEXT = """\
apiVersion: noetl.io/v1
kind: Playbook
metadata: {name: isolation, path: tests/isolation}
workload: {name: Ada, nested: {level: 1}}
workflow:
  - step: start
    next: [{step: greet, data: {who: "{{ workload.name }}"}}]
  - step: greet
    type: http
    endpoint: "https://example.test/{{ data.who }}"
    headers: {x-level: "{{ workload.nested.level }}"}
    next: [{step: end}]
  - step: end
    result: {name: "{{ workload.name }}", level: "{{ workload.nested.level }}", url: "{{ greet.url }}"}
"""


EDITS: dict[str, Callable[[Playbook], Any]] = {
    "config key": lambda p: p.steps["greet"].config.__setitem__("endpoint", "https://evil.test/"),
    "nested config": lambda p: p.steps["greet"].config["headers"].update({"x-level": "666"}),
    "config pop": lambda p: p.steps["greet"].config.pop("headers"),
    "attribute": lambda p: setattr(p.steps["greet"], "timeout", 0.001),
    "edge data": lambda p: p.steps["start"].next[0].data.__setitem__("who", "Mallory"),
    "edge list": lambda p: p.steps["start"].next.append(p.steps["start"].next[0]),
    "workload": lambda p: p.workload.__setitem__("name", "Mallory"),
    "nested workload": lambda p: p.workload["nested"].__setitem__("level", 666),
    "steps": lambda p: p.steps.__delitem__("end"),
    "list in place": lambda p: p.steps["start"].next.__iadd__([]),
    "dict in place": lambda p: p.workload.__ior__({"name": "Mallory"}),
    "model attribute del": lambda p: delattr(p, "workload"),
}


@pytest.mark.parametrize("source", [TEXT, yaml.safe_load(TEXT)], ids=["text", "document"])
@pytest.mark.parametrize("edit", EDITS, ids=list(EDITS))
def test_an_edit_in_place_is_refused_and_the_next_caller_gets_the_playbook_as_loaded(source: str | dict,
                                                                                      edit: str) -> None:
    fresh, _ = _load(source)                    # the loader itself, no memo
    playbook, _ = load_playbook(source)
    assert playbook is not None
    with pytest.raises(TypeError, match="cannot be changed in place"):
        EDITS[edit](playbook)
    again, problems = load_playbook(source)
    assert again == fresh and problems == []
    assert again.steps["greet"].config["headers"] == {"x-level": "{{ workload.nested.level }}"}
    assert again.workload == {"name": "Ada", "nested": {"level": 1}} and again.steps["greet"].timeout is None


def test_copies_of_a_loaded_playbook_are_ordinary_mutable_data() -> None:
    playbook, _ = load_playbook(TEXT)
    config = playbook.steps["greet"].config
    assert isinstance(config, dict) and json.loads(json.dumps(config)) == config
    for copied in (dict(config), copy.copy(config), copy.deepcopy(config), pickle.loads(pickle.dumps(config)),
                   plain(config), {**config}):
        copied["endpoint"] = "x"
        copied.setdefault("headers", {})
    deep = copy.deepcopy(config)
    deep["headers"]["x-level"] = "2"           # nested containers of a deep copy are mutable too
    assert plain(config)["headers"] == {"x-level": "{{ workload.nested.level }}"} == config["headers"]
    step = playbook.steps["greet"].model_copy(update={"timeout": 5.0})
    step.timeout = 6.0                          # a model's copy is the caller's own
    assert playbook.steps["greet"].timeout is None


def test_a_run_that_changes_its_state_does_not_reach_the_playbook_or_a_later_run() -> None:
    document = yaml.safe_load(TEXT)

    def run() -> tuple[Simulation, tuple[dict, Any]]:
        sim = Simulation(lambda cmd: Outcome(result={"url": cmd.action.config["endpoint"]}))
        sim.start(document)
        sim.run()
        state = sim.state()
        assert state.status == "COMPLETED", state.error
        return sim, (state.result, sim.commands[0].action.config["headers"]["x-level"])

    first, before = run()
    first.state().workload["nested"]["level"] = 666   # the state's workload is its own, not the playbook's
    first.state().workload["name"] = "Mallory"
    assert run()[1] == before == ({"name": "Ada", "level": 1, "url": "https://example.test/Ada"}, 1)
    assert load_playbook(document)[0].workload == {"name": "Ada", "nested": {"level": 1}}


@pytest.mark.parametrize("file", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda f: f.name)
def test_the_read_only_playbook_is_the_loaded_playbook_whole(file: Path) -> None:
    text = file.read_text()
    assert load_playbook(text)[0] == _load(text)[0]
