"""The embedded engine end to end (SQLite, in-memory bus, python process pool):

- engine overhead per step on a 200-step chain of trivial python steps (target ≤ 2 ms per step);
- iterations per second of a 5,000-item async iterator of trivial python tasks (target ≥ 1,000/s).
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from noetl_embedded.runtime import EmbeddedRuntime
from noetl_runtime.sqlite_store import SqliteStore

from common import chain, describe, iterator


async def run_once(runtime: EmbeddedRuntime, document: dict) -> float:
    start = runtime.start_message(document, document["metadata"]["path"], 1, {}, time.time())
    t0 = time.perf_counter()
    runtime.submit(start)
    state = await runtime.wait(start.execution_id)
    elapsed = time.perf_counter() - t0
    assert state.status == "COMPLETED", state.error
    return elapsed


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteStore(Path(tmp) / "bench.db")
        runtime = EmbeddedRuntime(store)
        await runtime.start()
        try:
            await run_once(runtime, chain(5))     # warm the process pool
            per_step = [1000 * await run_once(runtime, chain(args.steps)) / args.steps for _ in range(args.repeat)]
            print(f"embedded chain{args.steps}: ms per step {describe(per_step)}  (target <= 2 ms)")
            rates = [args.items / await run_once(runtime, iterator(args.items)) for _ in range(args.repeat)]
            print(f"embedded iterator{args.items}: iterations/s {describe(rates)}  (target >= 1000/s)")
        finally:
            await runtime.stop()
            store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--items", type=int, default=5000)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
