"""Property: for DAG-shaped playbooks and any order of completions, every execution terminates, no step
runs more than max_visits times, every join fires exactly once per visit, and the step results do not
depend on the order in which independent steps finish."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from noetl_common.simulate import Outcome, Simulation


@st.composite
def dag_playbooks(draw):
    n = draw(st.integers(min_value=2, max_value=9))
    names = [f"s{i}" for i in range(n)]
    flags = {}
    steps = [{"step": "start", "next": [{"step": names[0]}]}]
    for i, name in enumerate(names):
        later = names[i + 1:] + ["end"]
        targets = draw(st.lists(st.sampled_from(later), min_size=1, max_size=3, unique=True))
        edges = []
        for target in targets:
            edge = {"step": target, "data": {f"from_{name}": "{{ result.name }}"}}
            if draw(st.booleans()) and len(targets) > 1:
                flag = f"f{i}_{target}"
                flags[flag] = draw(st.booleans())
                edge["when"] = "{{ workload.flags." + flag + " }}"
            edges.append(edge)
        steps.append({"step": name, "type": "python", "code": "def main(**kw): return kw", "next": edges})
    steps.append({"step": "end", "type": "python", "code": "def main(**kw): return kw"})
    return {"apiVersion": "noetl.io/v1", "kind": "Playbook", "metadata": {"name": "dag", "path": "dag"},
            "workload": {"flags": flags}, "workflow": steps}


def worker(command):
    return Outcome(result={"name": command.step, "inputs": sorted(command.action.data)})


def run(document, choose):
    sim = Simulation(worker, choose=choose)
    sim.start(document)
    sim.run(max_messages=10_000)
    return sim


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=dag_playbooks(), picks=st.lists(st.integers(min_value=0, max_value=10_000), max_size=300))
def test_any_completion_order_terminates_with_the_same_results(document, picks):
    queue = list(picks)

    def choose(n):
        return queue.pop(0) % n if queue else n - 1
    reference = run(document, lambda n: 0)
    shuffled = run(document, choose)
    for sim in (reference, shuffled):
        state = sim.state()
        assert state.terminal and state.status == "COMPLETED", state.error
        started = [e.node_name for e in sim.events if e.event_type == "step_started"]
        for name, step_run in state.steps.items():
            assert started.count(name) == step_run.visit <= 1      # a DAG: each join fires once, no re-runs
    assert shuffled.state().results == reference.state().results
