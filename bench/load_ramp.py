"""A load ramp against the HTTP API: for each offered rate, starts of a mixed workload are sent open-loop
(at fixed intervals, whatever the answers) for --seconds; then the bench waits for every accepted execution
to end and prints, per rate:

    offered/s   the rate sent
    accepted/s  200 answers per second of the window
    429         refused by the bound on in-flight executions (Retry-After), and other errors
    completed/s executions that ended (any status) during the window, per second
    failed      accepted executions that did not end COMPLETED
    p50 / p99   end to end: from sending the POST to the execution's end_time, seconds
    api p99     the POST's own latency, seconds
    drain       seconds after the window until the last accepted execution ended

Each rate starts from idle (the previous one drained). The workload mixes a 3-step python chain, an
8-item async iterator of python tasks, a step that sleeps 0.3 s and a control-only playbook.

    python bench/load_ramp.py                                    # spawns `noetl server` (embedded, temp store)
    NOETL_DATABASE_URL=DSN python bench/load_ramp.py --kafka HOST:PORT   # spawns `noetl server --kafka`
    python bench/load_ramp.py --url http://127.0.0.1:8080        # a server already running
    options: --rates 2,4,8,12,16,24  --seconds 15  --max-in-flight N (spawned servers)
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

from common import chain, iterator

NOETL = str(Path(sys.executable).with_name("noetl"))
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED"}


def workload() -> list[dict[str, Any]]:
    sleepy = {"apiVersion": "noetl.io/v1", "kind": "Playbook",
              "metadata": {"name": "ramp_sleep", "path": "bench/ramp_sleep"},
              "workflow": [{"step": "start", "next": [{"step": "nap"}]},
                           {"step": "nap", "type": "python",
                            "code": "import time\ndef main():\n    time.sleep(0.3)\n    return 1\n",
                            "next": [{"step": "end"}]},
                           {"step": "end"}]}
    control = {"apiVersion": "noetl.io/v1", "kind": "Playbook",
               "metadata": {"name": "ramp_control", "path": "bench/ramp_control"},
               "workload": {"x": 1},
               "workflow": [{"step": "start", "next": [{"step": "end"}]},
                            {"step": "end", "result": {"x": "{{ workload.x }}"}}]}
    return [chain(3), iterator(8, concurrency=8), sleepy, control]


# ----------------------------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args: argparse.Namespace, tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOETL_SECRET_")}
    command = [NOETL, "server", "--port", str(port), "--log-level", "WARNING"]
    if args.max_in_flight is not None:
        command += ["--max-in-flight", str(args.max_in_flight)]
    if args.kafka:
        command += ["--kafka", args.kafka]     # the DSN through the environment, never argv
        suffix = uuid.uuid4().hex[:8]
        env.update(NOETL_DATABASE_URL=args.database_url, NOETL_TOPIC_PREFIX=f"ramp{suffix}.", NOETL_DATABASE_SCHEMA=f"ramp_{suffix}",
                   NOETL_STORE=str(tmp / "home" / "noetl.db"))
    else:
        command += ["--store", str(tmp / "ramp.db")]
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen(command, stdout=log, stderr=log, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {(tmp / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server was not ready within 120 s")


# ----------------------------------------------------------------------------------------------- the ramp
def _epoch(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() if iso else None


async def phase(client: httpx.AsyncClient, paths: list[str], rate: float, seconds: float) -> dict[str, Any]:
    sent: list[tuple[float, httpx.Response | Exception, float]] = []   # (sent at, answer, POST seconds)

    async def post(i: int) -> None:
        at = time.time()
        t0 = time.perf_counter()
        try:
            answer: httpx.Response | Exception = await client.post(
                "/api/executions/run", json={"path": paths[i % len(paths)]})
        except httpx.HTTPError as exc:
            answer = exc
        sent.append((at, answer, time.perf_counter() - t0))

    total = int(rate * seconds)
    start = time.monotonic()
    window_start = time.time()
    tasks = []
    for i in range(total):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(post(i)))
    await asyncio.gather(*tasks)
    window_end = window_start + seconds
    accepted = {a.json()["execution_id"]: at for at, a, _ in sent
                if isinstance(a, httpx.Response) and a.status_code == 200}
    refused = sum(1 for _, a, _ in sent if isinstance(a, httpx.Response) and a.status_code == 429)
    errors = len(sent) - len(accepted) - refused
    kinds = sorted({str(a.status_code) if isinstance(a, httpx.Response) else type(a).__name__
                    for _, a, _ in sent if not (isinstance(a, httpx.Response) and a.status_code in (200, 429))})
    ends = await drain(client, list(accepted))
    e2e = [ends[eid][0] - at for eid, at in accepted.items() if ends.get(eid) and ends[eid][0] is not None]
    done_in_window = sum(1 for end, _ in ends.values() if end is not None and end <= window_end)
    last_end = max((end for end, _ in ends.values() if end is not None), default=window_end)
    return {"offered": rate, "accepted_s": len(accepted) / seconds, "refused": refused, "errors": errors,
            "completed_s": done_in_window / seconds,
            "failed": sum(1 for _, status in ends.values() if status != "COMPLETED"),
            "p50": _q(e2e, 0.5), "p99": _q(e2e, 0.99), "api_p99": _q([s for *_, s in sent], 0.99),
            "drain": max(0.0, last_end - window_end), "unfinished": len(accepted) - len(e2e), "kinds": kinds}


async def drain(client: httpx.AsyncClient, ids: list[str], timeout: float = 300) -> dict[str, tuple[float | None, str]]:
    """Wait until every execution ended; its (end time, status). Unfinished ones after `timeout`: (None, status)."""
    ends: dict[str, tuple[float | None, str]] = {}
    pending = list(ids)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        still = []
        for chunk in [pending[i:i + 20] for i in range(0, len(pending), 20)]:
            answers = await asyncio.gather(*(client.get(f"/api/executions/{eid}", params={"events": "false"})
                                             for eid in chunk))
            for eid, r in zip(chunk, answers):
                row = r.json() if r.status_code == 200 else None
                if row is not None and row["status"] in TERMINAL:
                    ends[eid] = (_epoch(row.get("end_time")), row["status"])
                else:
                    still.append(eid)
        pending = still
        if pending:
            await asyncio.sleep(0.5)
    for eid in pending:
        ends[eid] = (None, "UNFINISHED")
    return ends


def _q(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


async def ramp(url: str, rates: list[float], seconds: float) -> None:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        paths = []
        for document in workload():
            r = await client.post("/api/catalog/register", json={"content": yaml.safe_dump(document)})
            r.raise_for_status()
            paths.append(r.json()["path"])
        await phase(client, paths, 2, 2)   # warm-up: the python pool, the first connections
        print(f"{'offered/s':>9} {'accepted/s':>10} {'429':>5} {'errors':>6} {'completed/s':>11} {'failed':>6} "
              f"{'p50 s':>7} {'p99 s':>7} {'api p99':>7} {'drain s':>7}", flush=True)
        for rate in rates:
            row = await phase(client, paths, rate, seconds)
            print(f"{row['offered']:>9g} {row['accepted_s']:>10.2f} {row['refused']:>5} {row['errors']:>6} "
                  f"{row['completed_s']:>11.2f} {row['failed']:>6} {_f(row['p50']):>7} {_f(row['p99']):>7} "
                  f"{_f(row['api_p99']):>7} {_f(row['drain']):>7}"
                  + (f"  ({row['unfinished']} unfinished)" if row["unfinished"] else "")
                  + (f"  (errors: {', '.join(row['kinds'])})" if row["kinds"] else ""), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (else one is spawned)")
    parser.add_argument("--kafka", metavar="BOOTSTRAP", help="spawn `noetl server --kafka BOOTSTRAP`")
    parser.add_argument("--database-url", default=os.environ.get("NOETL_DATABASE_URL"))
    parser.add_argument("--max-in-flight", type=int, help="the spawned server's bound (default: its own)")
    parser.add_argument("--rates", default="2,4,8,12,16,24")
    parser.add_argument("--seconds", type=float, default=15)
    args = parser.parse_args()
    if args.kafka and not args.database_url:
        parser.error("--kafka needs --database-url (or NOETL_DATABASE_URL)")
    rates = [float(r) for r in args.rates.split(",")]
    with tempfile.TemporaryDirectory(prefix="noetl-ramp.") as tmp:
        proc = None
        url = args.url
        if url is None:
            proc, url = spawn(args, Path(tmp))
        mode = "url " + url if args.url else ("noetl server --kafka" if args.kafka else "noetl server (embedded)")
        print(f"load ramp: {mode}, {args.seconds:g} s per rate, workload: chain3, iterator8, sleep0.3, control")
        try:
            asyncio.run(ramp(url, rates, args.seconds))
        finally:
            if proc is not None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
