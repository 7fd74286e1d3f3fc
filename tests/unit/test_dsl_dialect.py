"""Nothing silent (issue 8 scope 7, issue 11): a document in a later NoETL dialect goes to the second front
end (never half-read as v1), and a v1 step that carries action keys but no action type is an error
naming the key (it would otherwise complete at once, having run nothing)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from noetl_common.dsl import detect_dialect, load_playbook

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "noetl-fixtures"
HEAD = "apiVersion: noetl.io/v1\nkind: Playbook\nmetadata: {name: t, path: tests/t}\n"


def _doc(steps: str, **extra) -> dict:
    doc = yaml.safe_load(HEAD + "workflow:\n" + steps)
    doc.update(extra)
    return doc


def _later_dialect_files() -> list[Path]:
    listing = FIXTURES / "corpusB-selection.txt"
    if not listing.exists():
        return []
    return [FIXTURES / line.split()[0] / line.split()[1] for line in listing.read_text().splitlines() if line.strip()]


def _v1_fixture_files() -> list[Path]:
    return [path for folder in ("noetl@963d10a8", "adapted@963d10a8")
            for path in sorted((FIXTURES / folder).rglob("*.yaml"))]


# ---------------------------------------------------------------- detect_dialect (pure)

@pytest.mark.parametrize("steps, name, path", [
    ("  - {step: start, next: [a]}\n  - {step: a, type: python, code: x}\n", "v1", ""),
    ("  - {step: start}\n", "v1", ""),
    ("  - {step: start, tool: python, code: x}\n", "v2", "workflow[0].tool"),
    ("  - {step: start, tool: {kind: python, code: x}}\n", "v2", "workflow[0].tool"),
    ("  - {step: start, case: []}\n", "v2", "workflow[0].case"),
    ("  - {step: start, sink: {tool: postgres}}\n", "v2", "workflow[0].sink"),
    ("  - {step: start, vars: {a: 1}}\n", "v2", "workflow[0].vars"),
    ("  - {step: start, type: iterator, collection: [1], element: x, task: {tool: python, code: x}}\n", "v2",
     "workflow[0].task.tool"),
    ("  - {step: start, next: {spec: {mode: exclusive}, arcs: [{step: end}]}}\n", "v10", "workflow[0].next"),
    ("  - {step: start, tool: [{name: a, kind: python}]}\n", "v10", "workflow[0].tool"),
    ("  - {step: start, loop: {in: [1], iterator: x, spec: {mode: parallel}}}\n", "v10", "workflow[0].loop"),
    ("  - {step: start, tool: {kind: http, spec: {policy: {rules: []}}}}\n", "v10", "workflow[0].tool"),
    ("  - {step: start, set: {ctx.a: 1}}\n", "v10", "workflow[0].set"),
    ("  - {step: start, input: {a: 1}}\n", "v10", "workflow[0].input"),
    # the first v10 marker wins over an earlier v2 one (V10 §1.1 "first match wins", row by row)
    ("  - {step: start, tool: python}\n  - {step: b, tool: {kind: noop}, next: {arcs: []}}\n", "v10",
     "workflow[1].next"),
])
def test_detects_the_dialect_from_the_step_keys(steps, name, path):
    dialect = detect_dialect(_doc(steps))
    assert (dialect.name, dialect.path) == (name, path)
    assert dialect.reason


def test_workbook_entries_count_and_apiversion_does_not():
    doc = _doc("  - {step: start, type: workbook, name: w}\n", workbook=[{"name": "w", "tool": "python"}])
    assert (detect_dialect(doc).name, detect_dialect(doc).path) == ("v2", "workbook[0].tool")
    assert detect_dialect(_doc("  - {step: start}\n", apiVersion="noetl.io/v10")).name == "v1"


def test_a_mixed_document_names_its_v1_step_too():
    dialect = detect_dialect(_doc("  - {step: start, type: python, code: x}\n  - {step: b, tool: python}\n"))
    assert (dialect.name, dialect.type_step) == ("v2", "workflow[0]")


@pytest.mark.parametrize("doc", [None, 3, "text", [], {"workflow": "nope"}, {"workflow": None}, {}])
def test_documents_without_steps_are_unknown(doc):
    dialect = detect_dialect(doc)
    assert dialect.name == "unknown" and dialect.reason


def test_hostile_documents_do_not_break_detection():
    node: dict = {"step": "start"}
    node["task"] = node                                   # a recursive alias
    assert detect_dialect({"workflow": [node]}).name == "v1"
    odd = {"workflow": [1, None, "x", [], {"next": ["arcs"]}, {"tool": None}, {1: 2}], "workbook": "x"}
    assert detect_dialect(odd).name == "v2"               # `tool:` present, even empty: not v1
    many = {"workflow": [{"step": f"s{i}", "type": "python"} for i in range(50_000)] + [{"set": {}}]}
    assert detect_dialect(many).path == "workflow[50000].set"


# ---------------------------------------------------------------- load_playbook: one error, naming the dialect

@pytest.mark.parametrize("path", _later_dialect_files(), ids=lambda p: str(p.relative_to(FIXTURES)))
def test_later_dialect_fixtures_load_or_name_what_is_unsupported(path):
    """Issue 11: each later-dialect fixture is read by the second front end only: it loads, or every error is
    located and names what this engine does not run (a key, a kind, a v2 construct), never a v1 symptom."""
    playbook, problems = load_playbook(path.read_text())
    errors = [p for p in problems if p.severity == "error"]
    if playbook is not None:
        assert not errors and playbook.dialect in ("v2", "v10")
        return
    assert errors
    for error in errors:
        assert error.line is not None and error.path
        assert "type:" not in error.message or "mixes" in error.message   # never "add type: python"


def test_the_later_dialect_corpus_is_there():
    assert len(_later_dialect_files()) == 19


@pytest.mark.parametrize("path", _v1_fixture_files(), ids=lambda p: str(p.relative_to(FIXTURES)))
def test_every_v1_fixture_is_read_as_v1(path):
    assert detect_dialect(yaml.safe_load(path.read_text())).name == "v1"


def test_a_v2_dict_source_goes_to_the_second_front_end():
    playbook, problems = load_playbook(_doc("  - {step: start, tool: {kind: python, code: 'result = 1'}}\n"))
    assert playbook is not None and playbook.dialect == "v2", problems
    assert playbook.steps["start"].type == "pipeline"
    assert [p.message for p in problems if "read as v10" in p.message]   # apiVersion v1 with v2 keys: a warning


def test_a_document_mixing_type_and_tool_steps_names_one_of_each():
    playbook, problems = load_playbook(_doc("  - {step: start, type: python, code: x}\n  - {step: b, tool: python}\n"))
    assert playbook is None
    assert [p.path for p in problems] == ["workflow[0]"] and "mixes" in problems[0].message
    assert "workflow[1] has 'tool:'" in problems[0].message


# ---------------------------------------------------------------- action keys without an action type

@pytest.mark.parametrize("step, key, advice", [
    ("{step: start, code: 'def main(): pass'}", "code", "type: python"),
    ("{step: start, command: 'select 1'}", "command", "type: postgres or type: duckdb"),
    ("{step: start, query: 'select 1'}", "query", "type: postgres or type: duckdb"),
    ("{step: start, sql: 'select 1'}", "sql", "type: postgres or type: duckdb"),
    ("{step: start, path: child}", "path", "type: playbook"),
    ("{step: start, collection: [1]}", "collection", "type: iterator"),
    ("{step: start, type: end, command: 'select 1'}", "command", "type: postgres or type: duckdb"),
    ("{step: start, type: route, path: child}", "path", "type: playbook"),
])
def test_a_step_with_action_keys_but_no_action_type_is_an_error_naming_the_key(step, key, advice):
    playbook, problems = load_playbook(HEAD + f"workflow:\n  - {step}\n")
    errors = [p for p in problems if p.severity == "error"]
    assert playbook is None and [e.path for e in errors] == [f"workflow[0].{key}"], problems
    assert f"'{key}'" in errors[0].message and advice in errors[0].message
    assert "run nothing" in errors[0].message and errors[0].line == 5
    assert not [p for p in problems if p.severity == "warning" and p.path == f"workflow[0].{key}"]


def test_tool_on_a_v1_iterator_task_is_read_as_the_later_dialect():
    playbook, problems = load_playbook(HEAD + "workflow:\n  - step: start\n    type: iterator\n    collection: [1]\n"
                                              "    element: x\n    task: {type: end, tool: python}\n")
    assert playbook is None
    # found by the dialect check first: one error for the document, naming the mix
    assert [p.message for p in problems if p.severity == "error" and "mixes" in p.message]


def test_control_steps_and_inferred_actions_still_load():
    playbook, problems = load_playbook(HEAD + """workflow:
  - step: start
    type: start
    code: "def main(): return 1"
    next: [b]
  - step: b
    type: route
    url: http://x
    next: [c]
  - step: c
    loop: {in: [1, 2], iterator: n}
    code: "def main(n): return n"
    next: [end]
  - step: end
    type: end
    save: {storage: event, data: {a: 1}}
""")
    assert playbook is not None, problems
    assert [playbook.steps[s].type for s in ("start", "b", "c", "end")] == ["python", "http", "iterator", None]
