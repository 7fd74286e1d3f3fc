"""The v10 pipeline action (noetl_worker/actions/pipeline.py) end to end through execute(), with the real
python pool: script python, task chaining, policies (retry/jump/break/continue/fail), ctx/iter writes, and
hostile input (bad libs, runaway jumps, status: error results)."""
from __future__ import annotations

import pytest
import yaml

from noetl_common import codec
from noetl_common.dsl import load_playbook
from noetl_common.messages import ActionCompleted, ActionFailed
from noetl_common.pipeline_result import view
from noetl_common.simulate import Outcome, Simulation
from noetl_worker.actions import pipeline
from noetl_worker.execute import execute
from noetl_worker.python_pool import PythonPool

from test_worker_execute import make_ports
from test_worker_support import command


@pytest.fixture(scope="module")
def pool():
    p = PythonPool(2)
    yield p
    p.close()


def step_config(tool: str, extra: str = "") -> dict:
    doc = yaml.safe_load(f"""
apiVersion: noetl.io/v2
kind: Playbook
metadata: {{name: t, path: t}}
workflow:
  - step: s
{extra}    tool: {tool}
""")
    playbook, problems = load_playbook(doc)
    assert playbook is not None, problems
    return playbook.steps["s"].config


async def run(pool, tool: str, data: dict | None = None, context: dict | None = None):
    cmd = command("pipeline", data=data or {}, config=step_config(tool),
                  context={"execution_id": "exec-1", "ctx": {}, "workload": {}, **(context or {})})
    ports = make_ports(pool)
    await execute(cmd, ports)
    return ports.emit.last()


async def test_script_python_reads_inputs_input_data_and_context_and_returns_result(pool):
    done = await run(pool, """
      kind: python
      input: {a: 2, b: "{{ workload.x }}"}
      code: |
        total = a * b
        def twice(v):
            return v * total      # a module-level name, visible inside functions (V10-3.3)
        result = {"t": twice(1), "keys": sorted(input_data), "eid": context["execution_id"]}
""", context={"workload": {"x": 5}, "ctx": {"x": 5}})
    assert isinstance(done, ActionCompleted), done
    assert view(done.result) == {"t": 10, "keys": ["a", "b"], "eid": "exec-1"}


async def test_top_level_return_and_main_conventions(pool):
    done = await run(pool, "{kind: python, input: {n: 3}, code: 'return n + 1'}")
    assert isinstance(done, ActionCompleted) and view(done.result) == 4
    done = await run(pool, "{kind: python, input: {n: 3}, code: 'def main(n):\n    return n * 2'}")
    assert isinstance(done, ActionCompleted) and view(done.result) == 6
    done = await run(pool, "{kind: python, code: 'x = 1'}")     # never assigns result: null
    assert isinstance(done, ActionCompleted) and view(done.result) is None


async def test_pipeline_chains_prev_results_and_overlays_the_last_result(pool):
    done = await run(pool, """
      - {name: one, kind: python, code: "result = {'v': 1}"}
      - {name: two, kind: python, input: {p: "{{ _prev.v }}", o: "{{ one.v }}"}, code: "result = {'v': p + o}"}
""")
    assert isinstance(done, ActionCompleted), done
    assert view(done.result)["v"] == 2 and view(done.result)["status"] == "ok"
    assert view(done.result)["results"] == {"one": {"v": 1}, "two": {"v": 2}}


async def test_a_failing_task_stops_the_pipeline_and_names_the_task(pool):
    done = await run(pool, """
      - {name: boom, kind: python, code: "raise ValueError('nope')"}
      - {name: never, kind: python, code: "result = 1"}
""")
    assert isinstance(done, ActionFailed) and done.error == "boom: ValueError: nope"
    assert [t["task"] for t in done.tasks] == ["boom"]


async def test_status_error_mapping_fails_the_task_and_continue_handles_it(pool):
    done = await run(pool, """
      - {name: soft, kind: python, code: "result = {'status': 'error', 'message': 'soft fail'}"}
""")
    assert isinstance(done, ActionFailed) and done.error == "soft: soft fail"
    done = await run(pool, """
      - name: soft
        kind: python
        code: "result = {'status': 'error', 'message': 'soft fail'}"
        spec: {policy: {rules: [{when: "{{ output.status == 'error' }}", then: {do: continue}}]}}
      - {name: after, kind: python, input: {p: "{{ _prev }}"}, code: "result = {'prev': p}"}
""")
    assert isinstance(done, ActionCompleted) and view(done.result)["prev"] is None   # the handled task is no _prev
    assert "soft" not in view(done.result)["results"]


async def test_retry_counts_attempts_and_reports_each_task_attempt(pool):
    done = await run(pool, """
      kind: python
      code: "result = {'status': 'error', 'error': 'flaky'}"
      spec: {policy: {rules: [{when: "{{ output.status == 'error' }}", then: {do: retry, attempts: 3}}]}}
""")
    assert isinstance(done, ActionFailed) and done.error == "s_task: flaky"
    assert [(t["attempt"], t["directive"]) for t in done.tasks] == [(1, "retry"), (2, "retry"), (3, "fail")]


async def test_policy_set_writes_ctx_as_a_patch_and_iter_stays_local(pool):
    done = await run(pool, """
      - name: a
        kind: python
        code: "result = {'n': 7}"
        set: {row: "{{ output }}"}
        spec:
          policy:
            rules:
              - else: {then: {do: continue, set: {ctx.total: "{{ output.data.n }}", iter.seen: true}}}
      - {name: b, kind: python, input: {r: "{{ row.n }}", s: "{{ iter.seen }}"}, code: "result = [r, s]"}
""", context={"iter": {"x": 1}})
    assert isinstance(done, ActionCompleted), done
    assert view(done.result)["value"] == [7, True]
    assert done.variables == {"row": {"n": 7}, "total": 7}   # iter.seen is not a ctx write


async def test_break_ends_the_pipeline_successfully(pool):
    done = await run(pool, """
      - {name: a, kind: python, code: "result = 1", spec: {policy: {rules: [{when: true, then: {do: break}}]}}}
      - {name: b, kind: python, code: "raise ValueError('must not run')"}
""")
    assert isinstance(done, ActionCompleted) and view(done.result)["status"] == "break"


async def test_a_runaway_jump_loop_fails_the_step_naming_the_limit(pool, monkeypatch):
    monkeypatch.setattr(pipeline, "MAX_TASK_RUNS", 6)
    done = await run(pool, """
      - {name: a, kind: python, code: "result = 1"}
      - {name: b, kind: python, code: "result = 2", spec: {policy: {rules: [{when: true, then: {do: jump, to: a}}]}}}
""")
    assert isinstance(done, ActionFailed) and "ran 6 tasks (the limit)" in done.error


async def test_hostile_libs_and_templates_fail_the_task_with_a_clear_error(pool):
    done = await run(pool, "{kind: python, libs: {x: 'os; import sys'}, code: 'result = 1'}")
    assert isinstance(done, ActionFailed) and "not an importable module name" in done.error
    done = await run(pool, "{kind: python, input: {a: '{{ nope.deeper }}'}, code: 'result = 1'}")
    assert isinstance(done, ActionFailed) and "nope" in done.error
    done = await run(pool, "{kind: python, input: '{{ [1, 2] }}', code: 'result = 1'}")
    assert isinstance(done, ActionFailed) and "input must be a mapping" in done.error


# ---- a playbook task splits the pipeline (engine/composition.py): suspend, then resume with the child's end

COMPOSED = """
      - {name: pre, kind: python, input: {n: 2}, code: "result = {'n': n}"}
      - name: child
        kind: playbook
        path: kids/score
        return_step: done
        input: {n: "{{ pre.n }}", who: "{{ _prev.n }}"}
        spec: {policy: {rules: [{when: "{{ output.status == 'error' }}", then: {do: retry, attempts: 2}}]}}
      - {name: post, kind: python, input: {s: "{{ child.score }}"}, code: "result = {'got': s}"}
"""


async def test_a_playbook_task_suspends_the_pipeline_with_its_state_and_rendered_child(pool):
    done = await run(pool, f"\n{COMPOSED}")
    assert isinstance(done, ActionCompleted) and view(done.result) is None, done
    assert done.suspended["task"] == 1
    assert done.suspended["child"] == {"path": "kids/score", "version": None, "return_step": "done",
                                       "input": {"n": 2, "who": 2}, "timeout": None}
    state = done.suspended["state"]
    assert state["results"] == {"pre": {"n": 2}} and state["prev"] == {"n": 2} and state["index"] == 1
    assert [t["task"] for t in done.tasks] == ["pre"]


async def resume(pool, carried: dict, outcome: dict):
    config = {**step_config(f"\n{COMPOSED}"), "resume": {**carried, "outcome": outcome}}   # the loader's is shared
    cmd = command("pipeline", config=config, context={"execution_id": "exec-1", "ctx": {}, "workload": {}})
    ports = make_ports(pool)
    await execute(cmd, ports)
    return ports.emit.last()


async def test_the_rest_of_the_pipeline_reads_the_childs_result_by_task_name(pool):
    first = await run(pool, f"\n{COMPOSED}")
    done = await resume(pool, first.suspended["state"], {"task": 1, "ok": True, "result": {"score": 7}})
    assert isinstance(done, ActionCompleted), done
    assert view(done.result)["got"] == 7 and view(done.result)["results"]["child"] == {"score": 7}
    assert view(done.result)["results"]["pre"] == {"n": 2}
    assert [(t["task"], t["attempt"], t["ok"]) for t in done.tasks] == [("child", 1, True), ("post", 1, True)]


async def test_a_failed_child_goes_through_the_tasks_policy_retry_suspends_again(pool):
    first = await run(pool, f"\n{COMPOSED}")
    assert isinstance(first, ActionCompleted) and first.suspended is not None, first
    again = await resume(pool, first.suspended["state"], {"task": 1, "ok": False, "error": "child failed: x"})
    # retry (attempts: 2): a second child is asked for, as attempt 2 of the task
    assert isinstance(again, ActionCompleted) and again.suspended["task"] == 1, again
    assert dict(again.suspended["state"]["attempts"]) == {1: 2}
    assert [(t["task"], t["directive"]) for t in again.tasks] == [("child", "retry")]
    # the second child fails too: the attempts are spent, the pipeline fails naming the task
    failed = await resume(pool, again.suspended["state"], {"task": 1, "ok": False, "error": "child failed: y"})
    assert isinstance(failed, ActionFailed) and failed.error.startswith("child: child failed: y"), failed


async def test_a_resume_state_that_names_no_task_fails_the_attempt(pool):
    done = await resume(pool, {"index": 9}, {"task": 9, "ok": True})
    assert isinstance(done, ActionFailed) and "task 9" in done.error


async def test_a_noop_task_gives_its_rendered_result_or_null(pool):
    done = await run(pool, """
      - {name: mark, kind: noop, result: {seen: "{{ workload.x }}"}}
      - {name: quiet, kind: noop}
      - {name: use, kind: python, input: {m: "{{ mark.seen }}"}, code: "result = {'m': m}"}
""", context={"workload": {"x": 3}, "ctx": {"x": 3}})
    assert isinstance(done, ActionCompleted), done
    assert view(done.result)["results"]["mark"] == {"seen": 3} and view(done.result)["results"]["quiet"] is None
    assert view(done.result)["m"] == 3


async def test_a_pipeline_result_goes_on_the_wire_with_each_task_result_once(pool):
    # given a pipeline whose last task returns a large value
    done = await run(pool, """
      - {name: small, kind: python, code: "result = {'n': 1}"}
      - {name: big, kind: python, code: "result = {'status': 'success', 'blob': 'x' * 200000}"}
""")
    assert isinstance(done, ActionCompleted), done
    # then the reported message carries the blob once (the V10-2.10 overlay would repeat it three times)
    assert done.model_dump_json().count("x" * 200000) == 1
    # and its view is the overlay templates and the report see
    seen = view(done.result)
    assert seen["status"] == "ok" and seen["results"]["big"]["status"] == "success"
    assert seen["_prev"] is seen["results"]["big"] and seen["blob"] == "x" * 200000
    assert seen["results"]["small"] == {"n": 1} and seen["ctx"] == {}


async def test_a_command_carries_the_ctx_map_once_and_the_step_still_sees_it_as_workload_vars_and_ctx(pool):
    # given v10 steps that read the ctx map under its three names, in a run with a large workload: through
    # templates only (the fold ships the names they use), and through python's `context` (it ships them all)
    doc = yaml.safe_load("""
apiVersion: noetl.io/v2
kind: Playbook
metadata: {name: t, path: t}
workload: {blob: marker-0123456789}
workflow:
  - step: s
    tool:
      kind: python
      input: {w: "{{ workload.blob }}", v: "{{ vars.blob }}", c: "{{ ctx.blob }}"}
      code: |
        result = {"w": w, "v": v, "c": c}
    next: {arcs: [{step: t}]}
  - step: t
    tool:
      kind: python
      code: |
        result = {"same": context["workload"] is context["vars"] is context["ctx"], "n": len(context["vars"]["blob"])}
""")
    doc["workload"]["blob"] += "x" * 50_000
    blob = doc["workload"]["blob"]
    sent: list = []
    sim = Simulation(lambda cmd: sent.append(cmd) or Outcome(result=None))
    sim.start(doc)
    sim.run()
    by_step = {cmd.step: cmd for cmd in sent}
    # when the fold's commands cross the wire
    raw_s, raw_t = codec.encode(by_step["s"]), codec.encode(by_step["t"])
    # then the map is in them once, under `ctx` (the whole context also has ctx's keys bare: V10 §6 names)
    assert raw_s.count(b"marker-0123456789") == 1
    assert raw_t.count(b"marker-0123456789") == 2
    for raw in (raw_s, raw_t):
        shipped = codec.decode_command(raw).action.context
        assert shipped["ctx"] == {"blob": blob} and "workload" not in shipped and "vars" not in shipped
    # and the steps, run from the decoded commands, see it under all three names (one read-only map)
    ports = make_ports(pool)
    await execute(codec.decode_command(raw_s), ports)
    done = ports.emit.last()
    assert isinstance(done, ActionCompleted), done
    assert view(done.result) == {"w": blob, "v": blob, "c": blob}
    await execute(codec.decode_command(raw_t), ports)
    done = ports.emit.last()
    assert isinstance(done, ActionCompleted), done
    assert view(done.result) == {"same": True, "n": len(blob)}


async def test_a_command_of_an_older_fold_with_all_three_copies_still_runs(pool):
    done = await run(pool, """
      kind: python
      code: |
        result = [workload_seen, vars_seen]
      input: {workload_seen: "{{ workload.a }}", vars_seen: "{{ vars.a }}"}
""", context={"ctx": {"a": 1}, "workload": {"a": 1}, "vars": {"a": 1}})
    assert isinstance(done, ActionCompleted), done
    assert view(done.result) == [1, 1]


async def test_python_that_never_names_the_context_gets_none_and_main_still_binds_from_it(pool):
    # code that does not name NoETL's context gets none built, sent or frozen (the v1 rule) ...
    done = await run(pool, """
      kind: python
      code: |
        result = globals()["con" + "text"] is None
""", context={"ctx": {"a": 1}})
    assert isinstance(done, ActionCompleted), done
    assert view(done.result) is True
    # ... while a `main` is still bound by name from it (V10-3.x), and code naming it reads it
    done = await run(pool, """
      - {name: m, kind: python, code: "def main(ctx):\\n    return ctx['a']"}
      - {name: c, kind: python, code: "result = context['ctx']['a'] + 1"}
""", context={"ctx": {"a": 1}})
    assert isinstance(done, ActionCompleted), done
    assert view(done.result)["results"] == {"m": 1, "c": 2}
