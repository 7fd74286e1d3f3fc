"""The web console's server time and liveness (issue 10), on embedded mode:

    list      GET / (the executions page, 50 rows) over a store of 10,000 executions: first page, a deep
              page, a status filter; in process (ASGI), so the time is the server's
    iterator  GET /executions/{id} of an execution with a 5,000-item iterator (really run by a `noetl server`)
    delay     from an event (its `time`) to the pushed page that shows it arriving at an open live stream
              (/live/executions/{id}): the terminal event of short executions

    python bench/console_bench.py [--executions 10000] [--items 5000] [--runs 10] [--quick]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from common import describe, iterator  # noqa: E402


def _events(execution_id: str, start: float, i: int) -> list[Any]:
    from noetl_common.messages import Event

    def ev(seq: int, kind: str, node: str, status: str, **kw: Any) -> Event:
        t = start + seq * 0.01
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"
        return Event(event_id=f"{execution_id}:{seq}", execution_id=execution_id, seq=seq, event_type=kind,
                     node_name=node, node_type="step", status=status, timestamp=stamp, time=t, **kw)
    failed = i % 10 == 0
    return [ev(0, "execution_start", "chain", "STARTED", meta={"path": f"bench/list{i % 20}", "version": 1,
                                                                "workload": {"i": i}}),
            ev(1, "step_started", "start", "RUNNING"), ev(2, "step_completed", "start", "COMPLETED"),
            ev(3, "step_started", "work", "RUNNING"),
            ev(4, "step_failed" if failed else "step_completed", "work", "FAILED" if failed else "COMPLETED"),
            ev(5, "execution_failed" if failed else "execution_complete", "chain", "FAILED" if failed else "COMPLETED")]


def bench_list(executions: int, samples: int) -> dict[str, list[float]]:
    from noetl_cli.server import build_app
    from noetl_embedded.runtime import EmbeddedRuntime
    from noetl_runtime.auth import Authenticator
    from noetl_runtime.sqlite_store import SqliteStore
    from noetl_runtime.tokens import SqliteTokens

    with tempfile.TemporaryDirectory(prefix="noetl-console-bench-") as tmp:
        store = SqliteStore(Path(tmp) / "noetl.db")
        now = time.time() - executions
        batch: list[Any] = []
        for i in range(executions):
            batch += _events(str(uuid.uuid4()), now + i, i)
            if len(batch) >= 6000:
                store.commit_batch_sync(batch, {})
                batch = []
        store.commit_batch_sync(batch, {})
        tokens = SqliteTokens(store)
        token = asyncio.run(tokens.create("bench", "viewer", None))[0]
        app = build_app(store, EmbeddedRuntime(store), auth=Authenticator(tokens))

        async def measure() -> dict[str, list[float]]:
            out: dict[str, list[float]] = {}
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench",
                                         cookies={"noetl_token": token}) as client:
                pages = {"first page": "/", "page 100": "/?page_no=100", "status=FAILED": "/?status=FAILED",
                         "path filter": "/?path=bench/list7"}
                for name, url in pages.items():
                    times = []
                    for _ in range(samples):
                        started = time.perf_counter()
                        answer = await client.get(url)
                        times.append(time.perf_counter() - started)
                        assert answer.status_code == 200 and f"{executions if name != 'status=FAILED' else executions // 10} executions" in answer.text or name == "path filter", answer.text[-300:]
                    out[name] = times
            return out
        try:
            return asyncio.run(measure())
        finally:
            store.close()


def bench_server(items: int, runs: int, samples: int) -> dict[str, list[float]]:
    import json

    from console_support import PLAYBOOKS, ServerProcess
    from support import bearer, free_port

    out: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="noetl-console-bench-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NOETL_")}
        server = ServerProcess(Path(tmp), free_port(), env).start()
        try:
            server.api("POST", "/api/catalog/register", json={"content": json.dumps(iterator(items))})
            server.api("POST", "/api/catalog/register", json={"content": PLAYBOOKS["console/slow_ok"]})
            started = time.perf_counter()
            big = server.run(f"bench/iter{items}")
            server.wait_status(big, ("COMPLETED", "FAILED"), timeout=1800)
            print(f"  ({items}-item iterator ran in {time.perf_counter() - started:.1f} s)", flush=True)
            cookies = {"noetl_token": server.token}
            times = []
            for _ in range(samples):
                t0 = time.perf_counter()
                answer = httpx.get(f"{server.url}/executions/{big}", cookies=cookies, timeout=120)
                times.append(time.perf_counter() - t0)
                assert answer.status_code == 200 and f"{items} done" in answer.text, answer.text[-500:]
            out[f"execution page, {items}-item iterator"] = times
            out["event to page delay"] = [_delay(server, cookies, bearer(server.token)) for _ in range(runs)]
        finally:
            server.stop()
    return out


def _delay(server: Any, cookies: dict[str, str], auth: dict[str, str]) -> float:
    """Seconds from the terminal event's time to the arrival of the pushed page that shows it."""
    execution_id = server.run("console/slow_ok", pause=0.2)
    arrived: list[float] = []

    def listen() -> None:
        with httpx.stream("GET", f"{server.url}/live/executions/{execution_id}", cookies=cookies, timeout=60) as r:
            for line in r.iter_lines():
                if 'data-status="COMPLETED"' in line:
                    arrived.append(time.time())
                    return
    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    thread.join(60)
    events = httpx.get(f"{server.url}/api/executions/{execution_id}", headers=auth, timeout=30).json()["events"]
    terminal = next(e for e in events if e["event_type"] == "execution_complete")
    return arrived[0] - terminal["time"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--executions", type=int, default=10_000)
    parser.add_argument("--items", type=int, default=5_000)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="1,000 executions, 500 items, 5 runs")
    args = parser.parse_args()
    if args.quick:
        args.executions, args.items, args.runs, args.samples = 1000, 500, 5, 5
    print(f"console list page over {args.executions:,} executions (server time, seconds):")
    for name, times in bench_list(args.executions, args.samples).items():
        print(f"  {name:<40} {describe(times)}")
    print("console on a running `noetl server` (seconds):")
    for name, times in bench_server(args.items, args.runs, args.samples).items():
        print(f"  {name:<40} {describe(times)}")
        if name == "event to page delay":
            print(f"  {'':<40} median {statistics.median(times) * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
