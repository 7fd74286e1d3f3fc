"""What protecting the memoised playbooks costs (noetl_common/dsl/read_only.py), next to the alternative, a
private deep copy for every caller. `load_playbook` runs once per execution start (the fold then memoises
the playbook on the state), so the cost shows where executions are many and short, not in fold_bench's or
embedded_bench's one long execution per run.

Variants: `none` (the cached Playbook handed out as is, the state of things before), `read-only` (shipped:
sealed once per cache entry, the fold copies the workload/ctx defaults it adopts), `copy` (model_copy(deep=True)
per call). Measured: load_playbook of a memoised playbook (us/call) and executions/s of examples/hello_world
through the pure fold (noetl_common.simulate), the variants interleaved so that load drift hits all. Times
are this process's CPU time (the fold is pure single-threaded Python), which other processes on a shared
machine disturb far less than wall-clock time.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import yaml

from noetl_common import dsl
from noetl_common.engine import fold
from noetl_common.simulate import Outcome, Simulation
from noetl_runtime.tuning import tune_gc

from common import chain, describe

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = dsl.load_playbook, dsl.read_only


def use(variant: str) -> None:
    load, seal = SHIPPED
    dsl.read_only = (lambda value: value) if variant == "none" else seal

    def copying(source: Any, *args: Any) -> Any:
        playbook, problems = load(source, *args)
        return (playbook.model_copy(deep=True) if playbook is not None else None), problems
    dsl.load_playbook = fold.load_playbook = copying if variant == "copy" else load
    dsl._load_cached.cache_clear()


def per_call_us(document: dict, calls: int) -> float:
    dsl.load_playbook(document)
    t0 = time.process_time()
    for _ in range(calls):
        dsl.load_playbook(document)
    return (time.process_time() - t0) / calls * 1e6


def executions_per_s(document: dict, executions: int) -> float:
    sim = Simulation(lambda cmd: Outcome(result={"greeting": "hi", "length": 2}))
    t0 = time.process_time()
    for i in range(executions):
        sim.start(document, execution_id=f"e{i}")
        sim.run()
    assert all(state.status == "COMPLETED" for state in sim.states.values())
    return executions / (time.process_time() - t0)


def compare(label: str, unit: str, repeat: int, measure: Any, *args: Any) -> None:
    samples: dict[str, list[float]] = {"none": [], "read-only": [], "copy": []}
    try:
        for turn in range(repeat):   # every other turn in reverse order: no variant always runs first
            for variant in list(samples)[::1 if turn % 2 == 0 else -1]:
                use(variant)
                samples[variant].append(measure(*args))
    finally:
        use("read-only")
    medians = {variant: sorted(found)[len(found) // 2] for variant, found in samples.items()}
    print(f"{label} ({unit}):")
    for variant, found in samples.items():
        print(f"  {variant:9} {describe(found)}  ratio to none {medians[variant] / medians['none']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    tune_gc()
    hello = yaml.safe_load((ROOT / "examples" / "hello_world.yaml").read_text())
    compare("load_playbook hello_world", "us/call", args.repeat, per_call_us, hello, 2000)
    compare("load_playbook chain200", "us/call", args.repeat, per_call_us, chain(200), 50)
    compare("fold hello_world", "executions/s", args.repeat, executions_per_s, hello, 500)


if __name__ == "__main__":
    main()
