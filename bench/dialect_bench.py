"""The second front end must not make the engine slower: the same 200-step chain of trivial python steps
written in the v1 dialect and in NoETL DSL v10, through the fold alone (messages/s, no I/O) and through the
embedded engine end to end (ms per step: SQLite, in-memory bus, the python process pool).

v1 and v10 runs alternate (v1, v10, v1, v10, ...) so that load from other jobs on the machine falls on both;
each figure is the median of `--repeat` runs, with the ratio v10/v1. Wall time is what a user sees; CPU time
(the fold's own thread for the fold; the engine process and its step processes for the embedded run) is much
less disturbed by a busy machine, so it is printed too.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from noetl_common import simulate
from noetl_common.simulate import Outcome, Simulation
from noetl_embedded.runtime import EmbeddedRuntime
from noetl_runtime.sqlite_store import SqliteStore
from noetl_runtime.tuning import tune_gc

from common import chain, chain_v10, describe
from embedded_bench import run_once

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def fold_run(document: dict) -> tuple[int, float, float]:
    """(messages, wall seconds, CPU seconds) spent in advance() for one run of the chain."""
    wall = cpu = 0.0
    calls = 0
    real_advance = simulate.advance

    def timed(state, msg, caps):   # simulate passes its caps on
        nonlocal wall, cpu, calls
        c0, t0 = time.thread_time(), time.perf_counter()
        out = real_advance(state, msg, caps)
        wall += time.perf_counter() - t0
        cpu += time.thread_time() - c0
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
    return calls, wall, cpu


def tree_cpu() -> float:
    """CPU seconds of this process and every process below it (Linux /proc; reaped children included
    through their parents' cutime/cstime). Falls back to this process alone."""
    try:
        parents: dict[int, int] = {}
        times: dict[int, float] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry)] = int(fields[1])
            times[int(entry)] = sum(int(f) for f in fields[11:15]) / _TICK
        me, total, seen = os.getpid(), 0.0, set()
        for pid in times:
            p = pid
            while p and p not in seen and p != me:
                p = parents.get(p, 0)
            if p == me:
                total += times[pid]
        return total
    except OSError:
        return time.process_time()


def print_pair(what: str, unit: str, samples: dict[str, list[float]]) -> None:
    for label, values in samples.items():
        print(f"{what} {label}: {unit} {describe(values)}", flush=True)
    ratio = statistics.median(samples["v10"]) / statistics.median(samples["v1"])
    print(f"{what} ratio v10/v1 of the medians: {ratio:.3f}", flush=True)


async def embedded(args: argparse.Namespace, docs: dict[str, dict]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(Path(tmp) / "bench.db")
        runtime = EmbeddedRuntime(store)
        await runtime.start()
        try:
            await run_once(runtime, chain(5))       # warm the process pool
            await run_once(runtime, chain_v10(5))
            wall: dict[str, list[float]] = {label: [] for label in docs}
            cpu: dict[str, list[float]] = {label: [] for label in docs}
            for _ in range(args.repeat):
                for label, doc in docs.items():
                    c0 = tree_cpu()
                    wall[label].append(1000 * await run_once(runtime, doc) / args.steps)
                    cpu[label].append(1000 * (tree_cpu() - c0) / args.steps)
            print_pair(f"embedded chain{args.steps}", "wall ms per step", wall)
            print_pair(f"embedded chain{args.steps}", "CPU ms per step (engine + step processes)", cpu)
        finally:
            await runtime.stop()
            store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--only", choices=("fold", "embedded"))
    args = parser.parse_args()
    tune_gc()
    docs = {"v1": chain(args.steps), "v10": chain_v10(args.steps)}
    if args.only != "embedded":
        for doc in docs.values():
            fold_run(doc)    # warm: the first run pays imports and template compilation
        rates: dict[str, list[float]] = {label: [] for label in docs}
        cpu_rates: dict[str, list[float]] = {label: [] for label in docs}
        for _ in range(args.repeat):
            for label, doc in docs.items():
                calls, wall, cpu = fold_run(doc)
                rates[label].append(calls / wall)
                cpu_rates[label].append(calls / cpu)
        print(f"fold chain{args.steps}: {calls} messages/run", flush=True)
        print_pair(f"fold chain{args.steps}", "messages/s (wall)", rates)
        print_pair(f"fold chain{args.steps}", "messages/s (CPU)", cpu_rates)
    if args.only != "fold":
        asyncio.run(embedded(args, docs))


if __name__ == "__main__":
    main()
