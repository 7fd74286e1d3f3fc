"""Issue 9 scope 5: YAML alias and size limits at load. Finding: a 552-byte alias bomb took the server to 3 GB
and a 500. The loader must refuse it (and a recursive alias, and an oversized document) with one located
problem, quickly, without building the expansion."""
from __future__ import annotations

import time

from noetl_common.dsl import load_playbook, parse_yaml
from noetl_common.dsl.yaml_source import MAX_DOCUMENT_CHARS, MAX_EXPANDED_NODES


def laughs(levels: int = 9, width: int = 9) -> str:
    """The classic 'billion laughs': each level aliases the previous one `width` times."""
    names = [f"l{i}" for i in range(levels + 1)]
    lines = [f"{names[0]}: &{names[0]} [{', '.join(['lol'] * width)}]"]
    for prev, name in zip(names, names[1:]):
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * width)}]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_quickly_with_a_located_problem():
    text = laughs()
    assert len(text) < 600                       # 9**10 nodes once expanded, from a few hundred bytes
    started = time.monotonic()
    data, _lines, problems = parse_yaml(text)
    assert time.monotonic() - started < 1.0
    assert data is None and len(problems) == 1
    assert f"more than {MAX_EXPANDED_NODES:,} nodes" in problems[0].message and problems[0].line is not None


def test_a_playbook_with_an_alias_bomb_is_invalid_not_a_crash():
    text = "apiVersion: noetl.io/v1\nkind: Playbook\nmetadata: {name: x, path: x}\n" + laughs() + \
        "workflow:\n  - step: start\n    next: [{step: end}]\n  - step: end\n"
    playbook, problems = load_playbook(text)
    assert playbook is None and len(problems) == 1 and "nodes" in problems[0].message


def test_a_recursive_alias_is_refused():
    for text in ("a: &a [*a]\n", "a: &a\n  b: *a\n"):
        data, _lines, problems = parse_yaml(text)
        assert data is None and "recursive alias" in problems[0].message and problems[0].line == 1


def test_a_document_over_the_size_limit_is_refused_before_parsing():
    started = time.monotonic()
    data, _lines, problems = parse_yaml("k: " + "x" * MAX_DOCUMENT_CHARS)
    assert time.monotonic() - started < 1.0
    assert data is None and "too large" in problems[0].message


def test_ordinary_aliases_still_work():
    data, _lines, problems = parse_yaml("base: &b {retries: 2}\none: *b\ntwo: {<<: *b, extra: 1}\n")
    assert problems == []
    assert data == {"base": {"retries": 2}, "one": {"retries": 2}, "two": {"retries": 2, "extra": 1}}
