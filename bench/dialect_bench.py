"""The second front end must not make the engine slower: the same 200-step chain of trivial python steps
written in the v1 dialect and in NoETL DSL v10, through the fold alone (messages/s, no I/O) and through the
embedded engine end to end (ms per step: SQLite, in-memory bus, the python process pool)."""
from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from noetl_embedded.runtime import EmbeddedRuntime
from noetl_runtime.sqlite_store import SqliteStore
from noetl_runtime.tuning import tune_gc

from common import chain, chain_v10, describe
from embedded_bench import run_once
from fold_bench import measure


async def embedded(args: argparse.Namespace, docs: dict[str, dict]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(Path(tmp) / "bench.db")
        runtime = EmbeddedRuntime(store)
        await runtime.start()
        try:
            await run_once(runtime, chain(5))       # warm the process pool
            await run_once(runtime, chain_v10(5))
            for label, doc in docs.items():
                per_step = [1000 * await run_once(runtime, doc) / args.steps for _ in range(args.repeat)]
                print(f"embedded chain{args.steps} {label}: ms per step {describe(per_step)}", flush=True)
        finally:
            await runtime.stop()
            store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    tune_gc()
    docs = {"v1": chain(args.steps), "v10": chain_v10(args.steps)}
    for label, doc in docs.items():
        rates = []
        for _ in range(args.repeat):
            calls, spent = measure(doc)
            rates.append(calls / spent)
        print(f"fold chain{args.steps} {label}: {calls} messages/run; messages/s {describe(rates)}", flush=True)
    asyncio.run(embedded(args, docs))


if __name__ == "__main__":
    main()
