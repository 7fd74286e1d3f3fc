"""The query service's projection into Postgres: events per second through `Projector.apply`.

Events come from the pure simulator (no Kafka), so this measures the projector alone: one transaction per
batch (lock, insert, recompute the affected executions' rows with projection.summary, upsert).

- `interleaved`: 20,000 events of 5-step chains, many executions interleaved as one partition carries
  them, in batches of 500 (the figure for the note);
- `long`: one execution of a 1,000-step chain in batches of 500 (the case the log cache exists for);
- each with the log cache and without it (`cache_events=0`: every affected log is read back);
- `replay`: the same 20,000 events again through a fresh projector (a restart from offset 0: all duplicates).

Needs a Postgres: --database-url, else $NOETL_DATABASE_URL or $NOETL_TEST_PG_DSN. Works in a throwaway
schema, dropped at the end.

    PYTHONPATH=services/query python bench/query_projection_bench.py --database-url postgresql://...
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services" / "query"))

from noetl_common.messages import Event  # noqa: E402
from noetl_common.simulate import Outcome, Simulation  # noqa: E402
from noetl_runtime.postgres_schema import migrate  # noqa: E402
from noetl_query.projector import Projector  # noqa: E402

from common import chain, describe  # noqa: E402


def interleaved(total: int) -> list[Event]:
    sim = Simulation(lambda cmd: Outcome(result=1), now=1_767_225_600.0)
    doc = chain(5)
    runs = 0
    while len(sim.events) < total:
        for _ in range(50):                 # 50 executions in flight at a time, their events interleaved
            sim.start(doc, execution_id=f"x{runs}")
            runs += 1
        sim.run()
    return sim.events[:total]


def long_run(steps: int) -> list[Event]:
    sim = Simulation(lambda cmd: Outcome(result=1), now=1_767_225_600.0)
    sim.start(chain(steps), execution_id="long")
    sim.run()
    return sim.events


async def project(pool: asyncpg.Pool, events: list[Event], batch: int, cache: bool,
                  schema: str | None = None) -> tuple[float, Projector, str]:
    """Events/s into a fresh schema (or `schema`, for a replay)."""
    fresh = schema is None
    schema = schema or f"bench_{uuid.uuid4().hex[:10]}"
    if fresh:
        await migrate(pool, schema)
    projector = Projector(pool, schema, **({} if cache else {"cache_events": 0}))
    t0 = time.perf_counter()
    for i in range(0, len(events), batch):
        await projector.apply(events[i:i + batch])
    return len(events) / (time.perf_counter() - t0), projector, schema


async def main_async(args: argparse.Namespace) -> None:
    pool = await asyncpg.create_pool(args.database_url, min_size=1, max_size=2)
    schemas: list[str] = []
    try:
        workloads = (("interleaved", interleaved(args.events)), ("long", long_run(args.long_steps)))
        for label, events in workloads:
            executions = len({e.execution_id for e in events})
            for cache in (True, False):
                rates = []
                for _ in range(args.repeat):
                    rate, projector, schema = await project(pool, events, args.batch, cache)
                    schemas.append(schema)
                    rates.append(rate)
                print(f"projection {label} ({len(events)} events, {executions} executions, batch {args.batch},"
                      f" cache {'on' if cache else 'off'}; log reads {projector.stats['log_reads']}):"
                      f" events/s {describe(rates)}", flush=True)
            if label == "interleaved":
                rates = [(await project(pool, events, args.batch, True, schema=schemas[0]))[0]
                         for _ in range(args.repeat)]
                print(f"projection replay from offset 0 ({len(events)} duplicates, batch {args.batch}):"
                      f" events/s {describe(rates)}", flush=True)
    finally:
        for schema in schemas:
            await pool.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database-url",
                        default=os.environ.get("NOETL_DATABASE_URL") or os.environ.get("NOETL_TEST_PG_DSN"))
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--long-steps", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not args.database_url:
        parser.error("no Postgres: pass --database-url or set NOETL_DATABASE_URL / NOETL_TEST_PG_DSN")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
