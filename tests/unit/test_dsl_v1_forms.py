"""Forms that NoETL's own v1 playbooks use and this engine now accepts (issue 11 scope 1), given/when/then
over the pure fold: top-level name/path, `data` given as one template expression, `assert.expects` paths
`data.X` and `auth.<alias>`, and an event save on a control step that is logged with its data."""
from __future__ import annotations

import pytest
import yaml

from noetl_common.dsl import load_playbook
from noetl_common.engine import advance
from noetl_common.messages import ActionCompleted, ActionFailed, StartExecution
from noetl_common.simulate import Outcome, Simulation

HEAD = "apiVersion: noetl.io/v1\nkind: Playbook\nmetadata: {name: t, path: tests/t}\n"


def pb(body: str) -> dict:
    return yaml.safe_load(HEAD + body)


def echo(cmd) -> Outcome:
    """A worker whose step result is its rendered inputs."""
    return Outcome(result=dict(cmd.action.data))


def _errors(problems) -> list:
    return [p for p in problems if p.severity == "error"]


# ---------------------------------------------------------------- top-level name and path

def test_top_level_name_and_path_are_accepted_with_a_warning_saying_where_they_belong():
    playbook, problems = load_playbook("apiVersion: noetl.io/v1\nkind: Playbook\nname: top\npath: examples/top\n"
                                       "workflow:\n  - step: start\n")
    assert playbook is not None and (playbook.name, playbook.path) == ("top", "examples/top")
    warnings = {p.path: p.message for p in problems if p.severity == "warning"}
    assert warnings == {"name": "top-level 'name' belongs under metadata: (metadata.name); accepted",
                        "path": "top-level 'path' belongs under metadata: (metadata.path); accepted"}


def test_metadata_wins_over_top_level_keys_and_says_so():
    playbook, problems = load_playbook("apiVersion: noetl.io/v1\nkind: Playbook\nmetadata: {name: m, path: m/p}\n"
                                       "name: top\nworkflow:\n  - step: start\n")
    assert (playbook.name, playbook.path) == ("m", "m/p")
    assert [(p.path, p.message) for p in problems] == [("name", "top-level 'name' is ignored: metadata.name is used")]


def test_a_mix_of_metadata_and_top_level_fills_each_key():
    playbook, problems = load_playbook("apiVersion: noetl.io/v1\nkind: Playbook\nmetadata: {name: m}\npath: a/b\n"
                                       "workflow:\n  - step: start\n")
    assert (playbook.name, playbook.path) == ("m", "a/b") and [p.path for p in problems] == ["path"]


@pytest.mark.parametrize("head, path", [
    ("apiVersion: noetl.io/v1\nkind: Playbook\n", "metadata"),
    ("apiVersion: noetl.io/v1\nkind: Playbook\nname: only_name\n", "metadata.path"),
    ("apiVersion: noetl.io/v1\nkind: Playbook\npath: '  '\nname: n\n", "metadata.path"),
    ("apiVersion: noetl.io/v1\nkind: Playbook\nname: [1]\npath: a\n", "metadata.name"),
    ("apiVersion: noetl.io/v1\nkind: Playbook\nmetadata: [name, path]\nname: n\npath: p\n", "metadata"),
])
def test_a_missing_name_or_path_is_still_an_error(head, path):
    playbook, problems = load_playbook(head + "workflow:\n  - step: start\n")
    assert playbook is None and path in [p.path for p in _errors(problems)], problems


# ---------------------------------------------------------------- data as one template expression

LONE = """workflow:
  - step: start
    type: python
    code: "def main(): return 1"
    next: [a]
  - step: a
    type: python
    code: "def main(**kw): return kw"
    data: "{{ start.data }}"
    next: [{step: end, data: {edge: 1}}]
  - step: end
    type: python
    code: "def main(**kw): return kw"
    data: "{{ a }}"
"""


def test_lone_expression_data_loads_and_renders_to_the_mapping_at_dispatch():
    playbook, problems = load_playbook(HEAD + LONE)
    assert playbook is not None and not _errors(problems), problems
    assert playbook.steps["a"].data == "{{ start.data }}"
    sim = Simulation(lambda cmd: Outcome(result={"status": "success", "data": {"k": 1, "n": [2]}})
                     if cmd.step == "start" else echo(cmd))
    sim.start(pb(LONE))
    sim.run()
    state = sim.state()
    assert state.status == "COMPLETED", state.error
    assert state.results["a"] == {"k": 1, "n": [2]}                 # native values, not text
    assert state.results["end"] == {"k": 1, "n": [2], "edge": 1}    # edge data merges over it


def test_lone_expression_on_a_control_step_result_gives_no_inputs():
    doc = pb("""workflow:
  - step: start
    next: [a]
  - step: a
    type: python
    code: "def main(**kw): return kw"
    data: "{{ start.data }}"
""")
    sim = Simulation(echo)
    sim.start(doc)
    sim.run()
    assert sim.state().status == "COMPLETED" and sim.commands[0].action.data == {}


@pytest.mark.parametrize("template, error", [
    ("{{ workload.items }}", "data: '{{ workload.items }}' gave a list, not a mapping of named inputs"),
    ("{{ workload.n }}", "data: '{{ workload.n }}' gave a int, not a mapping of named inputs"),
    ("{{ nope }}", "data: undefined name 'nope' in template '{{ nope }}'"),
    ("{{ secret.TOKEN }}", "data: '{{ secret.TOKEN }}' reads secret, which only the worker may see"),
])
def test_a_lone_expression_that_is_not_a_mapping_fails_the_step_naming_it(template, error):
    doc = pb(f"""workload: {{items: [1, 2], n: 3}}
workflow:
  - step: start
    type: python
    code: "def main(): return 1"
    data: "{template}"
""")
    sim = Simulation(echo)
    sim.start(doc)
    sim.run()
    state = sim.state()
    assert state.status == "FAILED" and state.error.startswith(f"step 'start' failed: {error}"), state.error
    assert not sim.commands


def test_an_iterator_task_may_take_its_inputs_from_one_expression():
    doc = pb("""workflow:
  - step: start
    type: iterator
    collection: [{a: 1}, {a: 2}]
    element: item
    task:
      type: python
      code: "def main(a): return a"
      data: "{{ item }}"
""")
    sim = Simulation(echo)
    sim.start(doc)
    sim.run()
    assert sim.state().results["start"] == [{"a": 1}, {"a": 2}]


@pytest.mark.parametrize("step, path, words", [
    ("data: 'text {{ x }}'", "workflow[0].data", "must be a mapping of named inputs or one template expression"),
    ("data: plain", "workflow[0].data", "must be a mapping of named inputs or one template expression"),
    ("data: '{{ a }}{{ b }}'", "workflow[0].data", "must be a mapping"),
    ("data: '{% if x %}{{ x }}{% endif %}'", "workflow[0].data", "must be a mapping"),
    ("data: '{{ x }}'\n    args: {b: 1}", "workflow[0].data", "cannot be merged with the mapping in 'args'"),
    ("data: '{{ x }}'\n    with: '{{ y }}'", "workflow[0].data", "only one of params, args, with, data may be"),
])
def test_a_data_string_that_is_not_one_expression_alone_is_an_error(step, path, words):
    body = f"workflow:\n  - step: start\n    type: python\n    code: x\n    {step}\n"
    playbook, problems = load_playbook(HEAD + body)
    assert playbook is None and any(p.path == path and words in p.message for p in problems), problems


def test_workbook_inputs_merge_unless_one_side_is_an_expression():
    body = """workbook:
  - name: w
    type: python
    code: x
    data: {entry: 1}
workflow:
  - step: start
    type: workbook
    name: w
    data: STEP
"""
    playbook, _ = load_playbook(HEAD + body.replace("STEP", "{step: 2}"))
    assert playbook.steps["start"].data == {"entry": 1, "step": 2}
    playbook, _ = load_playbook(HEAD + body.replace("    data: {entry: 1}\n", "").replace("STEP", "'{{ workload }}'"))
    assert playbook.steps["start"].data == "{{ workload }}"
    playbook, problems = load_playbook(HEAD + body.replace("STEP", "'{{ workload }}'"))
    assert playbook is None and "cannot be merged" in _errors(problems)[0].message


# ---------------------------------------------------------------- assert.expects paths

EXPECTS = """workflow:
  - step: start
    type: duckdb
    command: select 1
    data: {require: true, nested: {x: 1}}
    auth:
      pg_db: {source: credential, key: "{{ workload.pg }}"}
    assert:
      expects: EXPECTS
"""


@pytest.mark.parametrize("expects", [
    ["require", "data.require", "nested.x", "data.nested.x", "auth.pg_db", "auth.pg_db.key", "auth"],
])
def test_expects_reads_inputs_bare_or_under_data_and_auth_aliases(expects):
    sim = Simulation(echo)
    sim.start(pb(EXPECTS.replace("EXPECTS", str(expects))), {"pg": "pg_local"})
    sim.run()
    assert sim.state().status == "COMPLETED", sim.state().error


@pytest.mark.parametrize("expects, missing", [
    (["data.nope"], "data.nope"), (["auth.gcs"], "auth.gcs"), (["data"], "data"),
    (["auth.pg_db.key.deeper"], "auth.pg_db.key.deeper"), (["require", "nope", "data.x"], "nope, data.x"),
])
def test_expects_still_fails_naming_what_is_missing(expects, missing):
    sim = Simulation(echo)
    sim.start(pb(EXPECTS.replace("EXPECTS", str(expects))), {"pg": "pg_local"})
    sim.run()
    assert sim.state().error == f"step 'start' failed: assert.expects: missing input(s) {missing}"
    assert not sim.commands


def test_expects_auth_without_any_auth_is_missing():
    sim = Simulation(echo)
    sim.start(pb("workflow:\n  - step: start\n    type: python\n    code: x\n    assert: {expects: [auth.a, auth]}\n"))
    sim.run()
    assert sim.state().error == "step 'start' failed: assert.expects: missing input(s) auth.a, auth"


# ---------------------------------------------------------------- a control step's save is logged

CONTROL_SAVE = pb("""workflow:
  - step: start
    next: [end]
  - step: end
    type: end
    save: {type: event_log, data: {status: success}}
""")


def _start(doc: dict) -> tuple:
    t = advance(None, StartExecution(execution_id="c", time=10.0, playbook=doc, path="t"))
    (cmd,) = t.commands
    assert cmd.phase == "save" and cmd.step == "end"
    return t.state, cmd


def test_an_event_save_on_a_control_step_leaves_its_data_in_an_event():
    state, cmd = _start(CONTROL_SAVE)
    t = advance(state, ActionCompleted(execution_id="c", command_id=cmd.command_id, time=10.2, started=10.1,
                                       saved={"status": "success"}))
    assert [(e.event_type, e.node_name) for e in t.events] == [
        ("action_started", "end"), ("action_completed", "end"), ("step_completed", "end"),
        ("execution_complete", "t")]
    assert t.events[1].meta == {"saved": {"status": "success"}} and t.state.status == "COMPLETED"


def test_a_failing_save_on_a_control_step_is_an_attempt_that_started_then_failed():
    state, cmd = _start(CONTROL_SAVE)
    t = advance(state, ActionFailed(execution_id="c", command_id=cmd.command_id, time=10.2, started=10.1,
                                    error="save to http://x failed"))
    assert [e.event_type for e in t.events] == ["action_started", "action_error", "step_failed", "execution_failed"]
    assert t.state.error == "step 'end' failed: save to http://x failed"


def test_an_iterators_own_save_is_logged_as_its_attempt_too():
    doc = pb("""workflow:
  - step: start
    type: iterator
    collection: [1, 2]
    element: n
    task: {type: python, code: "def main(n): return n"}
    save: {storage: event, data: "{{ result }}"}
""")
    sim = Simulation(lambda cmd: Outcome(result=cmd.index))
    sim.start(doc)
    sim.run()
    log = sim.log()
    assert log[log.index("iterator_completed:start"):] == [
        "iterator_completed:start", "action_started:start", "action_completed:start", "step_completed:start",
        "execution_complete:t"]
    assert sim.state().results["start"] == [0, 1]
