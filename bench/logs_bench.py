"""Step output: how fast `GET /api/executions/{id}/logs` answers from each read model (the handler, no HTTP),
for one execution with a 5,000-item iterator whose items each print (and one in ten fails once, then
succeeds: 5,500 listed attempts), among other executions' events.

- SQLite (`noetl server`): the store's `events` table and its partial index;
- Postgres (`noetl server --kafka`, the cluster): the projected `event` table and migration 0006's index,
  when a Postgres is given; also the projection rate of those events (each carries its output).

Queries: the first page (50), the last page, one item (step + index), one attempt of every item (step +
attempt, first page). Prints the median, min and max milliseconds over --repeat runs of each.

    python bench/logs_bench.py [--items 5000] [--output-bytes 1024] [--database-url postgresql://...]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services" / "query"))

from noetl_common.messages import Event  # noqa: E402
from noetl_common.simulate import Outcome, Simulation  # noqa: E402
from noetl_query import handlers  # noqa: E402
from noetl_query.handlers import LogFilters, LogPage  # noqa: E402
from noetl_query.sqlite_reads import SqliteReadModel  # noqa: E402
from noetl_runtime.sqlite_store import SqliteStore  # noqa: E402

from common import chain, describe, iterator  # noqa: E402


def scenario(items: int, output_bytes: int) -> list[Event]:
    line = ("x" * 79 + "\n") * max(1, output_bytes // 80)

    def worker(cmd: Any) -> Outcome:
        if cmd.index is not None and cmd.index % 10 == 0 and cmd.attempt == 1:
            return Outcome(ok=False, error="ValueError: first try", log=f"Traceback ...\n{line}")
        return Outcome(result=cmd.index, log=line)

    sim = Simulation(worker, now=1_767_225_600.0)
    doc = iterator(items)
    doc["workflow"][1]["task"]["retry"] = {"max_attempts": 2}
    sim.start(doc, execution_id="big")
    for i in range(200):                     # other executions in the same tables
        sim.start(chain(5), execution_id=f"other-{i}")
    sim.run()
    return sim.events


QUERIES = {
    "first page": (LogFilters(), LogPage()),
    "last page": (LogFilters(), None),        # offset set from the total
    "one item": (LogFilters(step="each", index=4321), LogPage()),
    "attempt 2 of every item": (LogFilters(step="each", attempt=2), LogPage()),
}


async def measure(read: Any, repeat: int) -> dict[str, list[float]]:
    _, total = await handlers.attempt_logs(read, "big", LogFilters(), LogPage())
    out: dict[str, list[float]] = {}
    for label, (filters, page) in QUERIES.items():
        page = page or LogPage(offset=max(0, total - 50))
        samples = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            body, _ = await handlers.attempt_logs(read, "big", filters, page)
            samples.append((time.perf_counter() - t0) * 1000)
            assert body["items"], label
        out[label] = samples
    out["_total"] = [float(total)]
    return out


def report(mode: str, results: dict[str, list[float]]) -> None:
    total = int(results.pop("_total")[0])
    for label, samples in results.items():
        print(f"logs {mode} ({total} listed attempts) {label}: ms {describe(samples)}", flush=True)


async def sqlite(events: list[Event], repeat: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        store = SqliteStore(Path(folder) / "noetl.db")
        try:
            await store.append_events(events)
            report("sqlite", await measure(SqliteReadModel(store), repeat))
        finally:
            store.close()


async def postgres(events: list[Event], repeat: int, url: str) -> None:
    import asyncpg

    from noetl_query.postgres_reads import PostgresReadModel
    from noetl_query.projector import Projector
    from noetl_runtime.postgres_schema import migrate

    pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    try:
        await migrate(pool, schema)
        projector = Projector(pool, schema)
        t0 = time.perf_counter()
        for i in range(0, len(events), 500):
            await projector.apply(events[i:i + 500])
        print(f"logs postgres projection of {len(events)} events (batch 500): events/s"
              f" {len(events) / (time.perf_counter() - t0):.0f}", flush=True)
        await pool.execute(f'ANALYZE "{schema}".event')
        report("postgres", await measure(PostgresReadModel(pool, schema), repeat))
    finally:
        await pool.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--output-bytes", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--database-url",
                        default=os.environ.get("NOETL_DATABASE_URL") or os.environ.get("NOETL_TEST_PG_DSN"))
    args = parser.parse_args()
    events = scenario(args.items, args.output_bytes)
    print(f"logs scenario: {len(events)} events, {args.items} items printing {args.output_bytes} bytes each",
          flush=True)
    asyncio.run(sqlite(events, args.repeat))
    if args.database_url:
        asyncio.run(postgres(events, args.repeat, args.database_url))
    else:
        print("logs postgres: skipped (no --database-url, NOETL_DATABASE_URL or NOETL_TEST_PG_DSN)", flush=True)


if __name__ == "__main__":
    main()
