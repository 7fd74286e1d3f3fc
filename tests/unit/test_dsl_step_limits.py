"""`limits:` on python steps (issue 9 scope 3, docs/security.md "Limits"): the DSL carries the step's own
resource limits to the worker, and refuses a malformed `limits:` at load with a located error. The maximum
is the worker pool's setting (NOETL_STEP_MAX_*), checked at load where the adapter passes it in and again
where the step runs."""
from __future__ import annotations

import pytest
import yaml

from noetl_common.caps import Caps
from noetl_common.dsl import load_playbook


def doc(limits: str, task: bool = False) -> str:
    step = f"""
  - step: a
    type: python
    limits: {limits}
    code: "def main(): return 1"
    next: [{{step: end}}]"""
    if task:
        step = f"""
  - step: a
    type: iterator
    collection: [1, 2]
    element: x
    task:
      type: python
      limits: {limits}
      code: "def main(x): return x"
    next: [{{step: end}}]"""
    return f"""apiVersion: noetl.io/v1
kind: Playbook
metadata: {{name: l, path: l}}
workflow:
  - step: start
    next: [{{step: a}}]{step}
  - step: end
"""


@pytest.mark.parametrize("task", [False, True])
def test_limits_reach_the_steps_config_without_a_warning(task):
    playbook, problems = load_playbook(doc("{memory_mb: 256, processes: 4, open_files: 64, "
                                           "file_size_mb: 1, cpu_seconds: '{{ workload.cpu }}'}", task))
    assert playbook is not None and problems == [], problems
    step = playbook.steps["a"]
    config = step.iterator.task.config if task else step.config
    assert config["limits"] == {"memory_mb": 256, "cpu_seconds": "{{ workload.cpu }}", "processes": 4,
                                "open_files": 64, "file_size_mb": 1}


@pytest.mark.parametrize("limits, message", [
    ("{bogus: 1}", "unknown limit 'bogus'"),
    ("{memory_mb: 0}", "limits.memory_mb must be a positive whole number, got 0"),
    ("{memory_mb: -5}", "must be a positive whole number"),
    ("{memory_mb: 1.5}", "must be a positive whole number, got 1.5"),
    ("{memory_mb: true}", "must be a positive whole number, got True"),
    ("{memory_mb: lots}", "must be a positive whole number, got 'lots'"),
    ("{memory_mb: [1]}", "must be a positive whole number"),
    ("[1, 2]", "limits must be a mapping of memory_mb"),
    ("7", "limits must be a mapping"),
    ("{'x\\u0000': 1}", "unknown limit"),
])
@pytest.mark.parametrize("task", [False, True])
def test_malformed_limits_are_invalid_at_load_with_their_location(limits, message, task):
    playbook, problems = load_playbook(doc(limits, task))
    errors = [p for p in problems if p.severity == "error"]
    assert playbook is None and errors, problems
    assert any(message in p.message for p in errors), [p.message for p in errors]
    assert all(".limits" in p.path and p.line for p in errors)


def test_a_huge_limit_is_refused_at_load_only_where_the_maximums_are_passed_in():
    """The maximums are settings (NOETL_STEP_MAX_*): the core judges them only when an adapter passes them in
    (registration, `noetl run`, `noetl validate`); without them (the fold) the worker pool judges them."""
    playbook, problems = load_playbook(doc("{memory_mb: 99999999999999999999}"))
    assert playbook is not None and not problems
    playbook, problems = load_playbook(doc("{memory_mb: 99999999999999999999}"),
                                       Caps.of(step_maximums={"memory_mb": 16384}))
    assert playbook is None and [p.path for p in problems] == ["workflow[1].limits.memory_mb"]
    assert yaml.safe_load(doc("{memory_mb: 1}"))["workflow"][1]["limits"] == {"memory_mb": 1}
