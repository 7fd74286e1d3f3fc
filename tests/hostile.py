"""Hostile playbooks for property tests (hypothesis strategies): valid documents whose templates produce
values that are not JSON, unicode of every sort, dotted and empty keys, huge numbers, undefined names, and
templates the worker renders (secrets, uuid). Used by the pure batch-fold properties and by the tests that
run them through the real embedded runtime and the real broker. `from hostile import playbooks`.
"""
from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

ENDPOINT = "http://127.0.0.1:9/x"   # nothing listens there: a real http step fails at once
HOSTILE = [
    "{{ workload.items }}", "{{ workload.keys }}", "{{ cycler }}", "{{ joiner }}", "{{ namespace }}", "{{ now }}",
    "{{ range }}", "{{ dict }}", "{{ {1: 2} }}", "{{ workload.nan | float }}", "{{ workload.inf | float }}",
    "{{ 10 ** 5000 }}", "{{ 2 ** 64 }}", "{{ -(2 ** 63) }}", "{{ 9 ** 99 }}", "{{ 'x' * 10 ** 8 }}",
    "{{ '\\ud800' }}", "{{ 'a\\x00b' }}", "{{ 'é😀\\u202e' }}", "{{ workload.big }}", "{{ workload }}",
    "{{ nope.nothing }}", "{{ workload.nested }}", "x {{ workload.items }} y", "{{ [workload.items] }}",
    "{{ {'a.b': 1, '': 2} }}", "{{ 1 / 0 }}", "{{ workload.deep }}", "{{ workload.text | fromjson }}",
    "{{ secret.TOKEN }}", "{{ uuid() }}", "{{ uuid }}", "{{ execution_id }}", "{{ result }}",
    "{% for i in range(3) %}{{ i }}{% endfor %}", "{{ workload.items() | list }}", "{{ 1e308 * 10 }}",
    "{{ workload.text }}", "{{ workload.list | map('upper') | list }}", "{{ workload.list | sum }}",
    "{{ this }}", "{{ vars }}", "{{ s0 }}", "{{ s0.nope }}", "{{ workload.list[99] }}", "{{ '%s' % workload }}",
    "{{ workload.text ~ workload.big }}", "{{ (workload.big | string)[:5] }}", "{{ {'k': now} }}", "plain",
]
KEYS = ["a.b", "a", "", "x.y.z", "é", "0", "with space", "\u202e", "items", "keys", "data", "result"]
JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False),
                        st.integers(min_value=-(10 ** 4299), max_value=10 ** 4299), st.text(max_size=20))
RESULTS = st.recursive(JSON_LEAVES, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)), max_leaves=8)


def deep(n: int) -> Any:
    value: Any = "bottom"
    for _ in range(n):
        value = {"d": value}
    return value


DEFERRED = ["{{ secret.TOKEN }}", "{{ uuid() }}", "x-{{ secret.T }}-{{ workload.items }}", "{{ secret }}"]
templates = st.one_of(st.sampled_from(HOSTILE), st.sampled_from(DEFERRED))   # half: for the worker
mappings = st.dictionaries(st.sampled_from(KEYS), st.one_of(templates, JSON_LEAVES), min_size=1, max_size=3)


@st.composite
def playbooks(draw: Any, name: str, child: bool = True) -> dict[str, Any]:
    n = draw(st.integers(1, 4))
    names = [f"s{i}" for i in range(n)]
    workflow: list[dict[str, Any]] = [{"step": "start", "next": [{"step": names[0]}]}]
    for i, step_name in enumerate(names):
        target = names[i + 1] if i + 1 < n else "end"
        edge: dict[str, Any] = {"step": target}
        if draw(st.booleans()):
            edge["data"] = draw(mappings)
        if draw(st.integers(0, 3)) == 0:
            edge["when"] = draw(templates)
        step: dict[str, Any] = {"step": step_name, "next": [edge]}
        kinds = ["python", "http", "control", "iterator"] + (["playbook"] if child else [])
        kind = draw(st.sampled_from(kinds))
        if kind == "python":
            step.update(type="python", code="def main(**kw):\n    return kw\n", data=draw(mappings))
        elif kind == "http":
            step.update(type="http", method="GET", endpoint=draw(st.sampled_from([ENDPOINT, *HOSTILE[:8]])),
                        headers=draw(mappings))
        elif kind == "control":
            step["data"] = draw(mappings)
        elif kind == "iterator":
            step.update(type="iterator", element="item", mode=draw(st.sampled_from(["sequential", "async"])),
                        collection=draw(st.sampled_from(["{{ workload.list }}", "{{ workload.nested }}", *HOSTILE])),
                        task={"type": "python", "code": "def main(v):\n    return v\n",
                              "data": {"v": draw(st.sampled_from(["{{ item }}", *HOSTILE]))}})
        else:
            step.update(type="playbook", path="t/child", data=draw(mappings))
        if draw(st.booleans()):
            step["retry"] = {"max_attempts": draw(st.integers(2, 3))}
        workflow.append(step)
    end: dict[str, Any] = {"step": "end"}
    if draw(st.booleans()):
        end["result"] = draw(st.one_of(templates, mappings))
    workflow.append(end)
    return {"apiVersion": "noetl.io/v1", "kind": "Playbook", "metadata": {"name": name, "path": f"t/{name}"},
            "workload": {"list": ["a", "b"], "nested": {"a.b": {"": 1}}, "nan": "nan", "inf": "inf",
                         "big": draw(st.sampled_from([2 ** 70, 10 ** 4299, -(10 ** 300)])),
                         "text": draw(st.text(max_size=10)), "deep": deep(draw(st.sampled_from([3, 120])))},
            "workflow": workflow}


CANARY = {"apiVersion": "noetl.io/v1", "kind": "Playbook", "metadata": {"name": "canary", "path": "t/canary"},
          "workload": {"x": 20},
          "workflow": [{"step": "start", "next": [{"step": "work", "data": {"x": "{{ workload.x }}"}}]},
                       {"step": "work", "type": "python", "code": "def main(x):\n    return {\"y\": x + 1}\n",
                        "next": [{"step": "end"}]},
                       {"step": "end", "result": {"y": "{{ work.y }}"}}]}
