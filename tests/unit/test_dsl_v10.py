"""The second front end at load: every problem of a v2/v10 document is reported with its location, kinds
this engine does not run are one clear error naming the kind, and hostile documents give errors, never a
traceback or a half-read playbook."""
from __future__ import annotations

import pytest
import yaml

from noetl_common.dsl import load_playbook

HEAD = "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: t, path: t}\nworkflow:\n"


def errors(text: str) -> list[tuple[str, int | None, str]]:
    playbook, problems = load_playbook(HEAD + text)
    found = [(p.path, p.line, p.message) for p in problems if p.severity == "error"]
    assert (playbook is None) == bool(found)
    return found


@pytest.mark.parametrize("kind", ["shell", "nats", "snowflake", "gcs", "container", "artifact", "agent", "mcp"])
def test_an_unsupported_kind_is_one_error_naming_the_kind(kind):
    found = errors(f"  - step: start\n    tool: {{kind: {kind}, command: x}}\n")
    assert len(found) == 1
    path, line, message = found[0]
    assert path == "workflow[0].tool.kind" and line == 6
    assert f"tool kind '{kind}' is not supported by this engine" in message


def test_validate_lists_every_problem_with_its_location():
    found = errors("""  - step: start
    tool: {kind: shell}
    next: {arcs: [{step: nowhere}]}
  - step: b
    loop: {in: [1], iterator: x, cursor: {}}
    tool: [{name: a, kind: python, code: "result = 1"}, {name: a, kind: python, code: "result = 2"}]
  - step: c
    tool: {kind: python, code: "result = 1"}
    when: "{{ true }}"
""")
    paths = {path for path, _, _ in found}
    assert {"workflow[0].tool.kind", "workflow[0].next.arcs[0].step", "workflow[1].loop.cursor",
            "workflow[1].tool[1].name", "workflow[2].when"} <= paths
    assert all(line is not None for _, line, _ in found)


def test_legacy_and_unknown_step_keys_name_the_step():
    found = errors("  - step: start\n    input: {}\n    tool: {kind: noop}\n    when: '{{ x }}'\n    command: select 1\n")
    messages = " ".join(m for _, _, m in found)
    assert "step 'start': step key 'when' is not part of NoETL DSL v10" in messages
    assert "'command' (it belongs inside tool:)" in messages


def test_a_v10_document_has_its_entry_and_modes():
    playbook, problems = load_playbook(HEAD + """  - step: first
    tool: {kind: python, code: "result = 1"}
    next: {spec: {mode: inclusive}, arcs: [{step: b, set: {ctx.x: 1}}]}
  - step: b
    tool: {kind: noop, result: done}
""")
    assert playbook is not None, problems
    assert playbook.dialect == "v2" or playbook.dialect == "v10"
    assert playbook.entry == "first" and playbook.steps["first"].next_mode == "inclusive"
    assert playbook.steps["first"].next[0].set == {"ctx.x": 1}
    assert playbook.steps["b"].is_control and playbook.steps["b"].result == "done"


@pytest.mark.parametrize("text", [
    "  - 3\n",
    "  - step: start\n    tool: 7\n",
    "  - step: start\n    tool: []\n",
    "  - step: start\n    tool: [{just: {kind: python}}]\n",
    "  - step: start\n    tool: {kind: python}\n",
    "  - step: start\n    tool: {kind: python, code: x, spec: {policy: {rules: [{when: true, then: {do: explode}}]}}}\n",
    "  - step: start\n    tool: {kind: python, code: x}\n    next: [end]\n",
    "  - step: workload\n    tool: {kind: noop}\n",
    "  - step: start\n    tool: {kind: noop}\n    set: {ctx.start: 1}\n",
    "  - step: start\n    loop: {in: [1], iterator: 'a b'}\n    tool: {kind: noop}\n",
])
def test_hostile_or_malformed_steps_are_located_errors(text):
    found = errors(text)
    assert found and all(path.startswith("workflow") for path, _, _ in found)


def test_a_huge_pipeline_is_refused_without_reading_every_task():
    tasks = [{"name": f"t{i}", "kind": "python", "code": "result = 1"} for i in range(5000)]
    doc = yaml.safe_load(HEAD + "  - step: start\n    tool: {kind: noop}\n")
    doc["workflow"][0]["tool"] = tasks
    playbook, problems = load_playbook(doc)
    assert playbook is None and "over the limit of 100" in problems[0].message


def test_mixed_dialects_are_rejected_naming_both():
    playbook, problems = load_playbook(HEAD + "  - {step: start, type: python, code: x}\n"
                                              "  - {step: b, tool: {kind: noop}, next: {arcs: []}}\n")
    assert playbook is None and "mixes" in problems[0].message


def test_playbook_and_noop_tasks_inside_a_pipeline_load_and_a_playbook_task_needs_a_path():
    doc = yaml.safe_load("""
apiVersion: noetl.io/v2
kind: Playbook
metadata: {name: t, path: t}
workflow:
  - step: s
    tool:
      - {name: c, kind: playbook, path: kids/a, return_step: done, input: {x: 1}}
      - {name: n, kind: noop, result: 1}
""")
    playbook, problems = load_playbook(doc)
    assert playbook is not None, problems
    kinds = [(t["name"], t["kind"]) for t in playbook.steps["s"].config["tasks"]]
    assert kinds == [("c", "playbook"), ("n", "noop")]
    assert playbook.steps["s"].config["tasks"][0]["config"]["return_step"] == "done"
    doc["workflow"][0]["tool"][0].pop("path")
    playbook, problems = load_playbook(doc)
    assert playbook is None and any("needs path" in p.message for p in problems)
