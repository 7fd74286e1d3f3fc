"""The fold alone: messages per second through advance(), no I/O (target ≥ 50,000/s).

Drives a 5,000-item async iterator and a 200-step chain through the pure simulator and times only the
calls to advance() (the simulator's own bookkeeping is excluded), with the runtimes' GC settings.
"""
from __future__ import annotations

import argparse
import time

from noetl_common import simulate
from noetl_common.simulate import Outcome, Simulation

from common import chain, describe, iterator
from noetl_runtime.tuning import tune_gc


def measure(document: dict) -> tuple[int, float]:
    spent = 0.0
    calls = 0
    real_advance = simulate.advance

    def timed(state, msg, caps):   # simulate passes its caps on
        nonlocal spent, calls
        t0 = time.perf_counter()
        out = real_advance(state, msg, caps)
        spent += time.perf_counter() - t0
        calls += 1
        return out
    simulate.advance = timed
    try:
        sim = Simulation(lambda cmd: Outcome(result=cmd.action.data.get("n")))
        sim.start(document)
        sim.run()
        assert sim.state().status == "COMPLETED", sim.state().error
    finally:
        simulate.advance = real_advance
    return calls, spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--items", type=int, default=5000)
    args = parser.parse_args()
    tune_gc()   # the GC settings the runtimes (embedded, broker) use
    for label, doc in (("iterator", iterator(args.items)), ("chain200", chain(200))):
        rates = []
        for _ in range(args.repeat):
            calls, spent = measure(doc)
            rates.append(calls / spent)
        print(f"fold {label}: {calls} messages/run; messages/s {describe(rates)}")


if __name__ == "__main__":
    main()
