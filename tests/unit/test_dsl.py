"""Playbook DSL loading: parse, normalise, validate (docs/playbook-dsl.md §1-§4)."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import yaml

from noetl_common.dsl import load_playbook, parse_playbook_yaml
from noetl_common.dsl.models import Playbook, Problem
from noetl_common.dsl.yaml_source import line_for

CASES = Path("/work/shared/conformance/cases")


def _playbook_files() -> list[Path]:
    files = []
    for folder in sorted(p for p in CASES.iterdir() if p.is_dir() and not p.name.startswith("invalid_")):
        for path in sorted(folder.glob("*.yaml")):
            doc = yaml.safe_load(path.read_text())
            if isinstance(doc, dict) and doc.get("kind") == "Playbook":
                files.append(path)
    return files


def _load_case(name: str, file: str = "playbook.yaml") -> Playbook:
    playbook, problems = load_playbook((CASES / name / file).read_text())
    assert playbook is not None, problems
    return playbook


def _errors(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]


HEAD = "apiVersion: noetl.io/v1\nkind: Playbook\nmetadata: {name: t, path: tests/t}\n"


def _load(body: str) -> tuple[Playbook | None, list[Problem]]:
    return load_playbook(HEAD + body)


def _ok(body: str) -> Playbook:
    playbook, problems = _load(body)
    assert playbook is not None, problems
    return playbook


# ---------------------------------------------------------------- conformance playbooks

PLAYBOOK_FILES = _playbook_files()


def test_the_conformance_suite_is_there():
    assert len(PLAYBOOK_FILES) >= 40


@pytest.mark.parametrize("path", PLAYBOOK_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_conformance_playbook_loads_clean(path: Path):
    playbook, problems = load_playbook(path.read_text())
    assert _errors(problems) == []
    if path.parent.name.startswith("noetl_"):   # NoETL's own fixtures: not even a warning
        assert problems == []
    assert playbook is not None and "start" in playbook.steps
    doc = yaml.safe_load(path.read_text())
    assert list(playbook.steps) == list(dict.fromkeys(s["step"] for s in doc["workflow"]))
    assert playbook.name == doc["metadata"]["name"] and playbook.path == doc["metadata"]["path"]


def test_invalid_many_errors_reports_every_problem_located():
    playbook, problems = load_playbook((CASES / "invalid_many_errors" / "playbook.yaml").read_text())
    assert playbook is None
    errors = _errors(problems)
    found = {(p.path, p.line): p.message for p in errors}
    expected = {
        ("workflow[0].next[1].step", 14): "nowhere_step",
        ("workflow[1].type", 16): "htttp",
        ("workflow[2].step", 19): "duplicate",
        ("workflow[3].name", 26): "no_such_entry",
        ("workflow[4]", 28): "element",
        ("workflow[5].data.x", 35): "{{ workload.x + }}",
        ("workflow[5].retry.max_attempts", 39): "max_attempts",
    }
    assert set(found) == set(expected), errors
    for location, needle in expected.items():
        assert needle in found[location]
    assert "fetch" in found[("workflow[2].step", 19)]
    # the CLI prints problems as JSON; the case's needles must all appear there
    text = json.dumps([p.model_dump() for p in problems])
    for needle in ["htttp", "duplicate", "nowhere_step", "no_such_entry", "element", "workload.x +",
                   "max_attempts", "workflow["]:
        assert needle in text


def test_invalid_yaml_gives_the_lines_pyyaml_reports():
    text = (CASES / "invalid_yaml" / "playbook.yaml").read_text()
    playbook, problems = load_playbook(text)
    assert playbook is None and problems
    assert {p.line for p in problems} & {8, 9}
    assert "line 8" in problems[0].message and "line 9" in problems[0].message
    assert "Traceback" not in json.dumps([p.model_dump() for p in problems])


def test_missing_start_is_an_error():
    playbook, problems = load_playbook((CASES / "invalid_missing_start" / "playbook.yaml").read_text())
    assert playbook is None
    assert any("start" in p.message for p in _errors(problems))


# ---------------------------------------------------------------- header and structure

def test_header_problems_are_all_reported():
    playbook, problems = load_playbook("apiVersion: noetl.io/version1\nkind: Flow\nmetadata: {name: ''}\n")
    assert playbook is None
    by_path = {p.path: p for p in _errors(problems)}
    assert {"apiVersion", "kind", "metadata.name", "metadata.path", "workflow"} <= set(by_path)
    assert "noetl.io/version1" in by_path["apiVersion"].message and by_path["apiVersion"].line == 1
    assert "Flow" in by_path["kind"].message


def test_empty_workflow_and_wrong_shapes():
    assert any("empty" in p.message for p in _load("workflow: []\n")[1])
    playbook, problems = _load("workflow: {step: start}\n")
    assert playbook is None and any(p.path == "workflow" for p in problems)


def test_dict_source_and_steps_alias():
    doc = yaml.safe_load(HEAD + "steps:\n  - step: start\n    next: end\n  - step: end\n")
    playbook, problems = load_playbook(doc)
    assert problems == []
    assert playbook.steps["start"].next[0].step == "end"
    assert playbook.steps["start"].path == "steps[0]"


def test_next_targets_in_then_else_are_checked():
    playbook, problems = _load("""workflow:
  - step: start
    next:
      - when: "{{ true }}"
        then: [{step: end}]
        else: [{step: ghost}]
  - step: end
""")
    assert playbook is None
    [error] = _errors(problems)
    assert error.path == "workflow[0].next[0].else[0].step" and "ghost" in error.message and error.line == 9


def test_garbage_never_raises():
    garbage = ["", "[", "- 1", "42", "a: &a [*a]", "\tx", "a: 2001-13-45", "---\na: 1\n---\nb: 2",
               HEAD + "workflow: [1, null, {step: 3}, {step: start, next: 7, retry: x, save: [], type: 9}]",
               HEAD + "workflow:\n  - &s {step: start, data: {me: *s}}\n",
               HEAD + "workbook: [{name: a, type: workbook, task: a}]\nworkflow: [{step: start, type: workbook,"
                      " name: a}]",
               HEAD + "workflow: [{step: start, type: iterator, task: [1], loop: 3, concurrency: '2'}]"]
    for text in garbage:
        playbook, problems = load_playbook(text)
        assert playbook is None and _errors(problems), text
        assert not any("could not load" in p.message for p in problems), problems
    for source in (None, 3, ["x"], {"workflow": {"a": object()}}):
        assert load_playbook(source)[0] is None


# ---------------------------------------------------------------- YAML locations

def test_line_map_from_node_marks():
    text = HEAD + "workflow:\n  - step: start\n    next:\n      - step: end\n  - step: end\n"
    data, lines, problems = parse_playbook_yaml(text)
    assert problems == [] and data["workflow"][1]["step"] == "end"
    assert lines["workflow[0]"] == 5 and lines["workflow[0].next[0].step"] == 7 and lines["workflow[1]"] == 8
    assert lines["metadata.name"] == 3
    assert line_for(lines, "workflow[0].next[0].step.nothing[3]") == 7
    assert line_for(lines, "nowhere") == 1            # unlocated: the document's first line
    assert line_for({}, "nowhere") is None             # no YAML text at all (a dict was given)


@pytest.mark.parametrize("text, path, line", [
    ("", "", 1),
    ("# a comment\n\n- a\n- b\n", "", 3),
    ("# header\napiVersion: noetl.io/v1\nkind: Playbook\nmetadata: {name: x, path: x}\n", "workflow", 2),
])
def test_document_level_problems_are_located_at_the_first_line(text, path, line):
    _, problems = load_playbook(text)
    assert [(p.path, p.line) for p in problems if p.severity == "error"] == [(path, line)], problems


def test_duplicate_yaml_key_is_a_warning():
    playbook, problems = _load("workflow:\n  - step: start\n    desc: a\n    desc: b\n")
    assert playbook is not None and playbook.steps["start"].desc == "b"
    assert [(p.severity, p.line) for p in problems] == [("warning", 7)]


# ---------------------------------------------------------------- workbook

def test_workbook_reference_resolves_to_the_entry_action():
    step = _load_case("noetl_control_flow_hot").steps["eval_flag"]
    assert step.type == "python" and step.name == "eval_flag"
    assert "def main(temperature_c)" in step.config["code"]
    assert step.assert_expects == ["temperature_c"] and step.assert_returns == ["is_hot", "message"]
    assert step.data == {"temperature_c": "{{ workload.temperature_c }}"}
    assert [(e.step, e.when) for e in step.next] == [("hot_path", "{{ result.is_hot == true }}"),
                                                      ("cold_path", "{{ result.is_hot == false }}")]
    scorer = _load_case("noetl_composition", "user_profile_scorer.yaml")
    assert scorer.steps["score_age"].type == "python" and scorer.steps["score_age"].assert_returns[0] == "age_score"


def test_workbook_merge_rules():
    playbook = _ok("""workbook:
  - name: call_api
    type: http
    endpoint: http://a/x
    method: post
    timeout: 5
    data: {keep: 1, nested: {a: 1, b: 2}}
workflow:
  - step: start
    type: workbook
    task: call_api
    timeout: 9
    with: {nested: {b: 3}, extra: "{{ workload.e }}"}
""")
    step = playbook.steps["start"]
    assert step.type == "http" and step.name == "start"
    assert step.config == {"endpoint": "http://a/x", "method": "POST", "headers": {}}
    assert step.timeout == 9.0
    assert step.data == {"keep": 1, "nested": {"a": 1, "b": 3}, "extra": "{{ workload.e }}"}


def test_workbook_iterator_task():
    playbook = _ok("""workbook:
  - {name: sq, type: python, code: "def main(n): return n * n"}
workflow:
  - step: start
    type: iterator
    collection: [1, 2]
    element: n
    task: {type: workbook, name: sq, data: {n: "{{ n }}"}}
""")
    task = playbook.steps["start"].iterator.task
    assert task.type == "python" and task.name == "start" and task.data == {"n": "{{ n }}"}
    assert task.config["code"].startswith("def main(n)")


# ---------------------------------------------------------------- aliases

def test_step_aliases_fold():
    code = "def main(a):\n    return a\n"
    playbook = _ok(f"""workflow:
  - step: start
    type: route
    description: the entry
    next: [fetch]
  - step: fetch
    type: http
    url: http://x/y
    credential: api_token
    params: {{a: 1, b: 1, c: 1}}
    args: {{b: 2, c: 2}}
    with: {{c: 3}}
    data: {{d: 4}}
    next: {{name: sql, input: {{x: 1, y: 1}}, args: {{y: 2}}, data: {{z: 3}}, when: result.ok}}
  - step: sql
    type: postgres
    credentials: pg_local
    sql: ["SELECT 1;", "SELECT 2;"]
    next: [py]
  - step: py
    type: python
    code_b64: {base64.b64encode(code.encode()).decode()}
    next: [child]
  - step: child
    type: playbook
    resource_path: lib/child
    version: 2
    return_step: done
    next: [end]
  - step: end
    type: end
""")
    start, fetch, sql, py, child, end = (playbook.steps[n] for n in ("start", "fetch", "sql", "py", "child", "end"))
    assert start.type is None and start.desc == "the entry" and start.next[0].step == "fetch"
    assert fetch.config == {"endpoint": "http://x/y", "method": "GET", "headers": {}}
    assert fetch.auth == "api_token"
    assert fetch.data == {"a": 1, "b": 2, "c": 3, "d": 4}
    [edge] = fetch.next
    assert edge.step == "sql" and edge.when == "{{ result.ok }}" and edge.data == {"x": 1, "y": 2, "z": 3}
    assert sql.auth == "pg_local" and sql.config["command"] == "SELECT 1;\nSELECT 2;"
    assert py.config["code"] == code
    assert child.config == {"path": "lib/child", "version": 2, "return_step": "done"}
    assert end.type is None and end.max_visits == 100 and end.has_result is False


def test_sql_synonyms_in_conformance_cases():
    pg = _load_case("postgres_steps")
    assert pg.steps["ddl"].config["command"].startswith("-- a comment line")
    assert pg.steps["fill"].config["command"].startswith("INSERT INTO public.conf_pg_steps")
    assert pg.steps["read"].config["command"].startswith("SELECT id, label")
    assert pg.steps["read"].next[0].data == {"rows": "{{ result.command_0.rows }}"}
    duck = _load_case("duckdb_step")
    assert duck.steps["crunch"].type == "duckdb" and "range({{ workload.n }})" in duck.steps["crunch"].config["command"]
    http = _load_case("http_requests")
    assert http.steps["post_json"].config["endpoint"] == "{{ workload.base_url }}/echo"
    assert http.steps["post_json"].config["method"] == "POST"
    assert http.steps["get_query"].config["headers"] == {"X-Caller": "{{ workload.who }}"}
    assert http.steps["end"].has_result and http.steps["end"].result["query_a"] == "{{ get_query.data.query.a }}"


def test_start_and_end_with_actions_keep_them():
    start = _load_case("noetl_start_with_action").steps["start"]
    assert start.type == "python" and start.next[0].data == {"from_start": "{{ start.data.executed }}"}
    assert _load_case("noetl_end_with_action").steps["end"].type == "python"
    end = _ok("workflow:\n  - step: start\n    type: start\n    code: 'def main(): return 1'\n").steps["start"]
    assert end.type == "python"


def test_scalar_fields():
    step = _ok("workflow:\n  - step: start\n    type: python\n    code: x\n    timeout: 2\n    max_visits: 7\n"
               "    result: null\n").steps["start"]
    assert step.timeout == 2.0 and isinstance(step.timeout, float)
    assert step.max_visits == 7 and step.has_result is True and step.result is None
    playbook, problems = _load("workflow:\n  - step: start\n    timeout: -1\n    max_visits: 0\n")
    assert playbook is None and {p.path for p in _errors(problems)} == {"workflow[0].timeout",
                                                                       "workflow[0].max_visits"}


# ---------------------------------------------------------------- save

def test_save_forms_in_save_storages():
    steps = _load_case("save_storages").steps
    flat = steps["produce"].save
    assert (flat.storage, flat.table, flat.auth, flat.mode) == ("postgres", "public.conf_save_flat", "pg_local",
                                                                 "insert")
    assert flat.data["meta"] == "{{ this.data.meta }}"
    nested = steps["upsert_twice"].save   # nested storage dict, data beside it
    assert (nested.storage, nested.table, nested.mode, nested.key, nested.auth) == (
        "postgres", "public.conf_save_nested", "upsert", ["id"], "pg_local")
    assert nested.data == {"id": "{{ result.id }}", "name": "{{ result.name }}", "version": 1}
    http = steps["to_http"].save
    assert (http.storage, http.url, http.method, http.data) == (
        "http", "{{ workload.base_url }}/collect/save_storages", "POST", "{{ result }}")
    var = steps["to_var"].save
    assert (var.storage, var.name, var.data) == ("variable", "favourite", "{{ result }}")


def test_iterator_task_saves():
    task = _load_case("noetl_iterator_save").steps["process_items"].iterator.task
    assert task.type == "python" and task.name == "process_items"
    assert task.save.storage == "postgres" and task.save.mode == "upsert" and task.save.key == ["id"]
    assert task.save.data["item_value"] == "{{ item.value }}"                    # `args` alias of data
    process = _load_case("noetl_composition").steps["process_users"]
    child = process.iterator.task
    assert child.type == "playbook" and child.name == "process_users"
    assert child.config["path"] == "tests/fixtures/playbooks/playbook_composition/user_profile_scorer"
    assert child.config["return_step"] == "finalize_result"
    assert child.data == {"user_data": "{{ user }}", "execution_context": "{{ execution_id }}"}
    assert child.save.table == "public.user_profile_results" and child.save.auth == "{{ workload.pg_auth }}"
    assert child.save.data["profile_score"] == "{{ this.profile_score or 0.0 }}"
    assert process.save is None and process.next[0].step == "validate_results"


def test_save_aliases_and_nested_precedence():
    steps = _ok("""workflow:
  - step: start
    save: {type: event_log, args: {a: 1}}
    next: [a]
  - step: a
    type: python
    code: x
    save:
      storage: {type: duckdb, table: inner, statement: "INSERT 1", keys: [k1, k2], mode: upsert}
      table: outer
      mode: insert
      data: {from: top}
    next: [b]
  - step: b
    type: python
    code: x
    save: {storage: http, endpoint: "http://h/{{ x }}", method: put, headers: {X: y}, data: {n: 1}}
    next: [c]
  - step: c
    type: save
    storage: postgres
    table: t
    auth: pg
    data: {v: "{{ workload.v }}"}
""").steps
    assert steps["start"].save.storage == "event" and steps["start"].save.data == {"a": 1}
    nested = steps["a"].save
    assert (nested.storage, nested.table, nested.mode, nested.key, nested.command) == (
        "duckdb", "inner", "upsert", ["k1", "k2"], "INSERT 1")
    assert nested.data == {"from": "top"}
    assert (steps["b"].save.url, steps["b"].save.method, steps["b"].save.headers) == ("http://h/{{ x }}", "PUT",
                                                                                       {"X": "y"})
    action = steps["c"]
    assert action.type == "save" and action.save is None
    assert action.config["storage"] == "postgres" and action.config["table"] == "t"
    assert action.config["data"] == {"v": "{{ workload.v }}"} and action.auth == "pg"


def test_save_problems():
    playbook, problems = _load("""workflow:
  - step: start
    type: python
    code: x
    save: {storage: mongo, data: 1}
    next: [a]
  - step: a
    type: python
    code: x
    save: {storage: postgres, mode: upsert, table: t}
""")
    assert playbook is None
    messages = {p.path: p.message for p in _errors(problems)}
    assert "mongo" in messages["workflow[0].save.storage"]
    assert "key" in messages["workflow[1].save.mode"]


# ---------------------------------------------------------------- next, then/else

def test_then_else_normalise():
    step = _load_case("routing_default_and_else").steps["default_path"]
    [entry] = step.next
    assert entry.step is None and entry.when == "{{ result.seen % 2 == 1 }}"
    assert [(e.step, e.data) for e in entry.then] == [("odd", {"v": "{{ result.seen }}"})]
    assert [e.step for e in entry.otherwise] == ["even"]
    assert entry.then[0].path == "workflow[4].next[0].then[0]"


def test_next_forms_and_conditions():
    steps = _ok("""workflow:
  - step: start
    next: end
  - step: a
    next: {step: end, when: true}
  - step: b
    next:
      - when: "result.n > 1"
        then: end
      - end
  - step: end
""").steps
    assert [(e.step, e.when) for e in steps["start"].next] == [("end", None)]
    assert steps["a"].next[0].when == "{{ true }}"
    branch, plain = steps["b"].next
    assert branch.when == "{{ result.n > 1 }}" and [e.step for e in branch.then] == ["end"]
    assert branch.otherwise == [] and plain.step == "end"


def test_bare_condition_that_does_not_parse_is_reported():
    playbook, problems = _load("workflow:\n  - step: start\n    next: [{step: start, when: 'x >'}]\n")
    assert playbook is None
    [error] = _errors(problems)
    assert error.path == "workflow[0].next[0].when" and "x >" in error.message


# ---------------------------------------------------------------- retry

@pytest.mark.parametrize("value, expected", [
    ("true", {"max_attempts": 3, "initial_delay": 0.0, "backoff_multiplier": 2.0, "max_delay": 60.0}),
    ("5", {"max_attempts": 5}),
    ("{max_attempts: 4, initial_delay: 0.05, jitter: true, retry_when: '{{ status_code >= 500 }}',"
     " stop_when: status_code == 404}",
     {"max_attempts": 4, "initial_delay": 0.05, "jitter": True, "retry_when": "{{ status_code >= 500 }}",
      "stop_when": "{{ status_code == 404 }}"}),
])
def test_retry_forms(value: str, expected: dict):
    retry = _ok(f"workflow:\n  - step: start\n    type: python\n    code: x\n    retry: {value}\n").steps["start"].retry
    assert retry is not None
    for key, want in expected.items():
        assert getattr(retry, key) == want


def test_retry_false_and_absent_mean_no_policy():
    assert _ok("workflow:\n  - step: start\n    retry: false\n").steps["start"].retry is None
    assert _ok("workflow:\n  - step: start\n").steps["start"].retry is None


def test_retry_problems():
    for value in ("0", "{max_attempts: 0}", "{max_attempts: -2}"):
        playbook, problems = _load(f"workflow:\n  - step: start\n    retry: {value}\n")
        assert playbook is None and any("max_attempts" in p.message for p in _errors(problems)), value


# ---------------------------------------------------------------- iterator

def test_iterator_shaping_and_defaults():
    steps = _load_case("iterator_shaping").steps
    adults = steps["adults"].iterator
    assert (adults.collection, adults.element, adults.mode, adults.concurrency) == (
        "{{ workload.people }}", "person", "sequential", 1)
    assert (adults.where, adults.order_by, adults.limit, adults.chunk) == (
        "{{ person.age >= 18 }}", "{{ person.name }}", 3, None)
    assert adults.task.type == "python" and adults.task.data["ri"] == "{{ adults.result_index }}"
    assert steps["batches"].iterator.chunk == 3
    assert _load_case("big_iterator").steps["each"].iterator.concurrency == 32
    steps = _ok("""workflow:
  - step: start
    type: iterator
    collection: "{{ workload.xs }}"
    element: x
    mode: parallel
    task: {type: python, code: x, next: [start]}
  - step: legacy
    loop: {in: [1, 2], iterator: y, task: {type: python, code: y}}
""").steps
    assert steps["start"].iterator.mode == "async" and steps["start"].iterator.concurrency == 8
    assert steps["start"].iterator.task.next == []
    legacy = steps["legacy"]
    assert legacy.type == "iterator" and legacy.iterator.collection == [1, 2] and legacy.iterator.element == "y"
    assert legacy.iterator.task.type == "python"


def test_iterator_problems_name_the_missing_key():
    playbook, problems = _load("""workflow:
  - step: start
    type: iterator
    element: x
    concurrency: 0
    limit: 0
    chunk: -1
    mode: sometimes
""")
    assert playbook is None
    messages = " | ".join(p.message for p in _errors(problems))
    for needle in ("'collection'", "'task'", "concurrency", "limit", "chunk", "sometimes"):
        assert needle in messages


# ---------------------------------------------------------------- warnings

def test_keys_that_do_not_apply_are_warnings():
    playbook, problems = _load("""workflow:
  - step: start
    headers: {X-Y: z}
    timeout: 3
    next: [a]
  - step: a
    type: python
    code: x
    method: GET
    data: {template: "{{ ok }}"}
    save: {storage: event, format: csv}
""")
    assert playbook is not None
    warnings = {p.path: p for p in problems if p.severity == "warning"}
    assert set(warnings) == {"workflow[0].headers", "workflow[0].timeout", "workflow[1].method",
                             "workflow[1].save.format"}
    assert all(p.line for p in warnings.values())
