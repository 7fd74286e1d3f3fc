"""The second front end against hostile and careless documents: every one gives located load errors (one
clear error for a document that cannot be walked), never a traceback, a hang or a silently dropped key.
Step `spec` keys (V10-2.4, V10-1.3), policy numbers (V10-9.3), nesting, size and odd key types."""
from __future__ import annotations

import time

import pytest
import yaml

from noetl_common.dsl import load_playbook
from noetl_common.dsl.yaml_source import MAX_DOCUMENT_DEPTH

HEAD = "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: t, path: t}\nworkflow:\n"


def doc(**step_keys) -> dict:
    step = {"step": "start", "tool": {"kind": "python", "code": "result = 1"}, "next": {"arcs": []}, **step_keys}
    return {"apiVersion": "noetl.io/v2", "kind": "Playbook", "metadata": {"name": "t", "path": "t"},
            "workflow": [step]}


def nested(depth: int, leaf=1):
    value = leaf
    for i in range(depth):
        value = {"d": value} if i % 2 else [value]
    return value


def load(source):
    playbook, problems = load_playbook(source)
    errors = [p for p in problems if p.severity == "error"]
    warnings = [p for p in problems if p.severity == "warning"]
    assert (playbook is None) == bool(errors)
    return playbook, errors, warnings


# ---- step spec (V10-2.4 + V10-1.3: an unknown key is a load error naming it; only the listed hints warn)

def test_an_unknown_step_spec_key_is_a_load_error_naming_the_key():
    # given a step spec with a key the page does not list (a misspelt timeout)
    _, errors, _ = load(doc(spec={"timout": "5s"}))
    # then the load fails, naming the key, where it is and the dialect
    assert len(errors) == 1
    assert errors[0].path == "workflow[0].spec.timout"
    assert "unknown step spec key 'timout'" in errors[0].message and "NoETL DSL v2/v10" in errors[0].message


def test_an_unknown_step_spec_policy_key_is_a_load_error_and_the_runtime_hints_are_warnings():
    # given a step policy with admit rules, the three ignorable runtime hints and one unknown key
    spec = {"timeout": "30s", "policy": {"admit": {"rules": [{"else": {"then": {"allow": True}}}]},
                                         "lifecycle": {"x": 1}, "failure": {}, "emit": [], "retries": 3}}
    _, errors, warnings = load(doc(spec=spec))
    # then only the unknown key is an error; each hint is a warning naming it
    assert [e.path for e in errors] == ["workflow[0].spec.policy.retries"]
    assert {w.path for w in warnings} >= {"workflow[0].spec.policy.lifecycle", "workflow[0].spec.policy.failure",
                                           "workflow[0].spec.policy.emit"}


@pytest.mark.parametrize("spec", ["30s", ["timeout"], 5])
def test_a_step_spec_that_is_not_a_mapping_is_a_load_error(spec):
    _, errors, _ = load(doc(spec=spec))
    assert [e.path for e in errors] == ["workflow[0].spec"]


def test_a_known_step_spec_still_loads_with_its_timeout():
    # given only the keys the page lists
    playbook, errors, _ = load(doc(spec={"timeout": "2m", "policy": {"admit": {"rules": [
        {"when": "{{ true }}", "then": {"allow": True}}]}}}))
    # then the step has its timeout and admit rule
    assert not errors and playbook.steps["start"].timeout == 120.0 and playbook.steps["start"].admit


# ---- policy numbers (V10-9.3): bad values are load errors, not a silent default at run time

@pytest.mark.parametrize("then,field", [
    ({"do": "retry", "attempts": "many"}, "attempts"),
    ({"do": "retry", "attempts": 0}, "attempts"),
    ({"do": "retry", "attempts": True}, "attempts"),
    ({"do": "retry", "delay": "soon"}, "delay"),
    ({"do": "retry", "delay": -1}, "delay"),
    ({"do": "retry", "delay": float("inf")}, "delay"),
])
def test_a_policy_with_a_bad_attempts_or_delay_is_a_located_load_error(then, field):
    tool = {"kind": "python", "code": "result = 1", "spec": {"policy": {"rules": [{"when": True, "then": then}]}}}
    _, errors, _ = load(doc(tool=tool))
    assert [e.path for e in errors] == [f"workflow[0].tool.spec.policy.rules[0].then.{field}"]


def test_policy_numbers_in_the_forms_the_corpus_uses_load():
    rules = [{"when": "{{ x }}", "then": {"do": "retry", "attempts": 5.0, "delay": "0.5", "backoff": "exponential"}},
             {"else": {"then": {"do": "continue"}}}]
    playbook, errors, _ = load(doc(tool={"kind": "python", "code": "r = 1", "spec": {"policy": {"rules": rules}}}))
    assert not errors, errors


def test_a_playbook_task_retry_with_a_bad_max_attempts_is_a_located_error_not_a_crash():
    _, errors, _ = load(doc(tool={"kind": "playbook", "path": "child", "retry": {"max_attempts": "x"}}))
    assert [e.path for e in errors] == ["workflow[0].tool.retry.max_attempts"]


# ---- nesting and size: one clear error, quickly, for text and for an already-parsed document alike

@pytest.mark.parametrize("where", ["workload", "ctx", "input", "set", "loop", "policy_set", "workbook"])
def test_a_document_nested_past_the_limit_is_one_clear_error_wherever_the_nesting_is(where):
    # given a parsed document (as a JSON API body would give) nested 5,000 levels deep in one place
    deep = nested(5000)
    d = doc()
    if where in ("workload", "ctx"):
        d[where] = {"k": deep}
    elif where == "input":
        d["workflow"][0]["input"] = {"k": deep}
    elif where == "set":
        d["workflow"][0]["set"] = {"ctx.k": deep}
    elif where == "loop":
        d["workflow"][0]["loop"] = {"in": deep, "iterator": "x"}
    elif where == "policy_set":
        d["workflow"][0]["tool"]["spec"] = {"policy": {"rules": [{"when": True, "then": {"do": "continue",
                                                                                           "set": {"ctx.k": deep}}}]}}
    else:
        d["workbook"] = [{"name": "w", "tool": {"kind": "python", "code": "x", "input": {"k": deep}}}]
    started = time.monotonic()
    # when it is loaded
    _, errors, _ = load(d)
    # then there is exactly one error saying so, and no RecursionError escaped
    assert time.monotonic() - started < 2.0
    assert len(errors) == 1 and "nested too deeply" in errors[0].message


def test_the_depth_limit_is_the_same_for_yaml_text_and_parsed_documents():
    just_over = MAX_DOCUMENT_DEPTH + 1
    text = HEAD + "  - step: start\n    tool: {kind: noop}\n    input: " + "{a: " * just_over + "1" + "}" * just_over + "\n"
    _, text_errors, _ = load(text)
    _, dict_errors, _ = load(yaml.safe_load(text))
    assert len(text_errors) == 1 and len(dict_errors) == 1
    assert text_errors[0].message == dict_errors[0].message
    # and a document well inside the limit loads
    inside = HEAD + "  - step: start\n    tool: {kind: noop}\n    input: " + "{a: " * 50 + "1" + "}" * 50 + "\n"
    assert load(inside)[0] is not None


def test_a_deep_workload_inside_the_limit_still_loads():
    d = doc()
    d["workload"] = {"k": nested(MAX_DOCUMENT_DEPTH - 10)}
    assert load(d)[0] is not None


@pytest.mark.parametrize("mutate", [
    lambda d: d["workflow"][0].update({7: "x"}),                                  # a non-string step key
    lambda d: d["workflow"][0].update({"tool": {"kind": {"a": 1}}}),              # a mapping as the kind
    lambda d: d["workflow"][0].update({"next": {"arcs": [{"step": ["start"]}]}}),  # a list as an arc target
    lambda d: d["workflow"][0].update({"loop": {"in": "{{ x }}", "iterator": None}}),
    lambda d: d["workflow"][0].update({"set": ["ctx.a"]}),
    lambda d: d["workflow"][0].update({"spec": {None: 1}}),
    lambda d: d.update({"workbook": {"name": "not a list"}}),
    lambda d: d.update({"executor": {"spec": {"entry_step": ["start"]}}}),
])
def test_odd_types_in_v10_places_are_located_errors_not_crashes(mutate):
    d = doc()
    mutate(d)
    _, errors, _ = load(d)
    assert errors and all(e.path for e in errors) and not any("could not load" in e.message for e in errors)


def test_a_very_large_workflow_loads_or_fails_in_bounded_time():
    # given 20,000 chained steps and a step with 100,000 arcs
    steps = [{"step": f"s{i}", "tool": {"kind": "noop"}, "next": {"arcs": [{"step": f"s{i + 1}"}]}}
             for i in range(20_000)] + [{"step": "s20000", "tool": {"kind": "noop"}}]
    d = doc()
    d["workflow"] = steps
    d["workflow"][0]["next"]["arcs"] *= 100_000
    started = time.monotonic()
    load(d)
    assert time.monotonic() - started < 20.0
