"""Issue 11: python code that reads NoETL's `context` (`context.get("execution_id")`) failed with NameError.
The reference gives a read-only `context` (execution_id, workload, step results) as a global and in
**kwargs; here too, for code that names it (the fold ships the whole render context for such code only)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from noetl_common.dsl import load_playbook
from noetl_common.engine.actions import build_action
from noetl_embedded.runtime import EmbeddedRuntime
from noetl_runtime.sqlite_store import SqliteStore
from noetl_worker.python_pool import PythonPool

PLAYBOOK = """
apiVersion: noetl.io/v1
kind: Playbook
metadata: {name: ctx, path: tests/ctx}
workload: {region: eu, limit: 3}
workflow:
  - step: start
    next: [{step: first}]
  - step: first
    type: python
    code: |
      def main():
          return {"status": "success", "data": {"rows": [1, 2, 3]}}
    next: [{step: second}]
  - step: second
    type: python
    data: {n: 2}
    code: |
      def main(n, **kwargs):
          rows = context.get("first", {}).get("data", {}).get("rows", [])   # the reference's idiom
          try:
              context["workload"]["region"] = "us"
              changed = True
          except TypeError:
              changed = False
          return {"execution_id": context.get("execution_id", "unknown"), "region": context["workload"]["region"],
                  "rows": rows[:n], "changed": changed, "in_kwargs": kwargs["context"]["execution_id"],
                  "has_secret": "secret" in context, "data_key": "data" in context}
    next: [{step: end}]
  - step: end
"""


async def test_python_code_reads_the_read_only_context(tmp_path: Path) -> None:
    runtime = EmbeddedRuntime(SqliteStore(tmp_path / "x.db"), python_processes=1)
    await runtime.start()
    try:
        playbook = yaml.safe_load(PLAYBOOK)
        start = runtime.start_message(playbook, "tests/ctx", None, {}, time.time())
        state = await runtime.wait(runtime.submit(start))
    finally:
        await runtime.stop()
        runtime.store.close()
    assert state.status == "COMPLETED", state.error
    assert state.steps["second"].result == {
        "execution_id": start.execution_id, "region": "eu", "rows": [1, 2], "changed": False,
        "in_kwargs": start.execution_id, "has_secret": False, "data_key": False}


def _action(code: str):
    playbook, problems = load_playbook(yaml.safe_load(f"""
apiVersion: noetl.io/v1
kind: Playbook
metadata: {{name: c, path: c}}
workflow:
  - step: start
    next: [{{step: s}}]
  - step: s
    type: python
    code: {code!r}
  - step: end
"""))
    assert playbook is not None, problems
    step = playbook.steps["s"]
    scope = {"workload": {"k": 1}, "execution_id": "e-1", "earlier": {"big": list(range(3))}, "now": time.time}
    return build_action(step, scope, {}, [])


def test_only_code_that_names_context_gets_it_shipped() -> None:
    assert _action("def main():\n    return 1\n").context == {}
    shipped = _action("def main():\n    return context['earlier']\n").context
    assert shipped == {"workload": {"k": 1}, "execution_id": "e-1", "earlier": {"big": [0, 1, 2]}}   # no callables


@pytest.fixture(scope="module")
def pool():
    p = PythonPool(1)
    yield p
    p.close()


async def test_context_as_global_parameter_and_kwargs(pool):
    ctx = {"execution_id": "e-9", "workload": {"a": [1, {"b": 2}]}, "step1": {"x": 1}}
    code = ("def main(context, **kwargs):\n"
            "    return [context['execution_id'], context.get('step1').get('data')['x'], 'context' in kwargs,\n"
            "            isinstance(context['workload']['a'], list)]\n")
    out = await pool.run(code, {}, 10, execution="e-9", context=ctx)
    assert out.ok and out.result == ["e-9", 1, False, True], out
    code = "def main(**kwargs):\n    return sorted(kwargs)\n# reads context\n"
    assert (await pool.run(code, {"x": 1}, 10, execution="e-9", context=ctx)).result == ["context", "x"]
    # a data key named `context` wins over NoETL's
    code = "def main(context):\n    return context\n"
    assert (await pool.run(code, {"context": "mine"}, 10, execution="e-9", context=ctx)).result == "mine"


@pytest.mark.parametrize("mutation", [
    "context['x'] = 1", "del context['execution_id']", "context.update(x=1)", "context.pop('step1')",
    "context.clear()", "context['workload']['a'].append(3)", "context['workload']['a'][1]['b'] = 3",
    "context.setdefault('y', 1)", "context['workload']['a'] += [1]",
])
async def test_the_context_cannot_be_changed(pool, mutation):
    ctx = {"execution_id": "e-9", "workload": {"a": [1, {"b": 2}]}, "step1": {"x": 1}}
    code = f"def main():\n    {mutation}\n"
    out = await pool.run(code, {}, 10, execution="e-9", context=ctx)
    assert not out.ok and "read-only" in out.error, out


async def test_code_that_does_not_name_it_has_no_context(pool):
    out = await pool.run("def main(**kw):\n    return sorted(kw)\n", {"x": 1}, 10, execution="e", context=None)
    assert out.result == ["x"]
