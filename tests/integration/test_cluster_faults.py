"""Faults and secrets across the whole cluster: ingest, broker, two workers, query and render started as
separate processes by scripts/cluster-start.sh on real Kafka (Tansu) and real Postgres.

- A worker killed mid-step (SIGKILL of its process group, as a node dies) stops heartbeating; the broker's
  lease on the attempt expires, the same attempt is sent again (an infrastructure retry: the step has no
  `retry:`, and no policy attempt is used), and the other worker runs it.
- After runs that used a secret (an env secret in python, http and postgres steps, and a stored postgres
  credential), no record on any topic of the installation, no event the API serves and no service log
  contains a secret value.

Needs NOETL_TEST_PG_DSN; Kafka comes from the conftest fixtures. The cluster is shared by the module.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]

asyncpg = pytest.importorskip("asyncpg")
aiokafka = pytest.importorskip("aiokafka")

ROOT = Path(__file__).resolve().parents[2]
NOETL = str(Path(sys.executable).parent / "noetl")
LEASE_SECONDS = 2          # short, so a dead worker's attempt expires well before Tansu rebalances its group
API_TOKEN = f"tok-{uuid.uuid4().hex}"
DB_PASSWORD = f"pw-{uuid.uuid4().hex}"


class Cluster:
    def __init__(self, env: dict[str, str], url: str, info_file: str, info: dict[str, str]) -> None:
        self.env, self.url, self.info_file, self.info = env, url, info_file, info

    @property
    def worker_pids(self) -> dict[int, str]:
        return {int(self.info[f"PID_{r}"]): r for r in self.info["ROLES"].split() if r.startswith("worker")}

    def run(self, playbook: Path, *args: str, timeout: float = 120) -> subprocess.Popen[str]:
        return subprocess.Popen([NOETL, "run", "--server", self.url, str(playbook), "--json", *args],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.env['NOETL_API_TOKEN']}"}

    def logs(self) -> str:
        base = Path(self.info["BASE"])
        return "".join(p.read_text(errors="replace") for p in sorted(base.glob("*.log")))


def _exports(stdout: str) -> dict[str, str]:
    return dict(line[len("export "):].partition("=")[::2] for line in stdout.splitlines()
                if line.startswith("export "))


def _info(path: str) -> dict[str, str]:
    return {k: v.strip('"') for k, _, v in (line.partition("=") for line in Path(path).read_text().splitlines())}


async def _drop_schema(dsn: str, schema: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def cluster(kafka_endpoint: Any, pg_dsn: str) -> Iterator[Cluster]:
    run_id = uuid.uuid4().hex[:10]
    schema = f"faults_{run_id}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOETL_", "KAFKA_"))}
    env.update(KAFKA_BOOTSTRAP_SERVERS=kafka_endpoint.bootstrap, NOETL_DATABASE_URL=pg_dsn,
               NOETL_DATABASE_SCHEMA=schema, NOETL_TOPIC_PREFIX=f"faults-{run_id}.", PYTHON=sys.executable,
               NOETL_LOG_LEVEL="INFO", NOETL_CLUSTER_STOP_GRACE="10", NOETL_CLUSTER_WORKERS="2",
               NOETL_LEASE_SECONDS=str(LEASE_SECONDS), NOETL_SECRET_API_TOKEN=API_TOKEN)
    if kafka_endpoint.kind == "tansu":
        env["NOETL_KAFKA_SESSION_TIMEOUT_MS"] = os.environ.get("NOETL_KAFKA_SESSION_TIMEOUT_MS", "3000")
    started = subprocess.run(["bash", str(ROOT / "scripts" / "cluster-start.sh")], env=env, capture_output=True,
                             text=True, timeout=180)
    assert started.returncode == 0, started.stderr[-3000:]
    exports = _exports(started.stdout)
    info_file = exports["NOETL_CLUSTER_INFO"]
    env["NOETL_API_TOKEN"] = exports["NOETL_API_TOKEN"]   # the admin token cluster-start.sh created
    try:
        yield Cluster(env, exports["NOETL_SERVER_URL"], info_file, _info(info_file))
    finally:
        stopped = subprocess.run(["bash", str(ROOT / "scripts" / "cluster-stop.sh"), info_file], env=env,
                                 capture_output=True, text=True, timeout=90)
        asyncio.run(_drop_schema(pg_dsn, schema))
        assert stopped.returncode == 0, stopped.stderr


def _finish(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert out.strip(), err[-3000:]
    report = json.loads(out)
    report["_stderr"] = err
    return report


def _events(cluster: Cluster, execution_id: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{cluster.url}/api/executions/{execution_id}/events", timeout=10, headers=cluster.auth)
    assert answer.status_code == 200, answer.text
    return answer.json()["events"]


# -------------------------------------------------------------------------- SIGKILL → lease → infrastructure retry
def test_a_killed_workers_step_without_retry_is_sent_again_to_the_other_worker_after_its_lease_expires(
        cluster: Cluster, tmp_path: Path, step_dir: Path) -> None:
    marks = step_dir   # step code runs as the step user when the engine runs as root (tests/conftest.py)
    playbook = tmp_path / "slow.yaml"
    playbook.write_text(f"""\
apiVersion: noetl.io/v1
kind: Playbook
metadata: {{name: slow_step, path: tests/faults/slow_step}}
workflow:
  - step: start
    next: [{{step: slow}}]
  - step: slow
    type: python
    code: |
      import os, pathlib, time
      def main():
          # A step process is forked by a supervisor in the worker's process group (the worker leads it): that
          # group names the worker.
          worker = os.getpgid(os.getppid())
          mark = pathlib.Path({str(marks)!r}) / f"{{worker}}-{{time.time_ns()}}"
          mark.write_text("")
          time.sleep(4)
          return {{"worker_pid": worker}}
    next: [{{step: end}}]
  - step: end
    result: {{worker_pid: "{{{{ slow.worker_pid }}}}"}}
""")
    workers = cluster.worker_pids
    assert len(workers) == 2
    proc = cluster.run(playbook)
    # Kill only once the broker holds a lease on attempt 1: its `action_started` is in the event log. (A
    # worker that dies before reporting the start leaves no lease; Kafka's redelivery of the uncommitted
    # command covers that case, tested in test_worker_service.py.)
    deadline = time.monotonic() + 60
    started: list[dict[str, Any]] = []
    while not started:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "attempt 1 of the slow step was never reported started"
        time.sleep(0.1)
        listed = httpx.get(f"{cluster.url}/api/executions", params={"path": "tests/faults/slow_step"}, timeout=5,
                           headers=cluster.auth)
        if listed.status_code == 200 and listed.json():
            started = [e for e in _events(cluster, listed.json()[0]["execution_id"])
                       if e["event_type"] == "action_started"]
    while not any(marks.iterdir()):           # the step's code writes it once its process runs it
        assert time.monotonic() < deadline, "attempt 1 never ran its code"
        time.sleep(0.05)
    (first,) = {int(m.name.split("-")[0]) for m in marks.iterdir()}
    assert first in workers, (first, workers)
    os.killpg(first, signal.SIGKILL)            # the worker and its python subprocess, as a node dies
    killed_at = time.monotonic()

    report = _finish(proc, timeout=120)
    survivor = next(pid for pid in workers if pid != first)
    assert report["status"] == "COMPLETED", report
    assert report["result"] == {"worker_pid": survivor}

    slow = [e for e in _events(cluster, report["execution_id"]) if e.get("node_name") == "slow"]
    kinds = [(e["event_type"], e.get("attempt")) for e in slow]
    assert not [e for e in slow if e["event_type"] == "action_error"], kinds   # the attempt never failed
    retries = [e for e in slow if e["event_type"] == "action_retry"]
    assert retries and all(e["result"]["kind"] == "infrastructure" and e["result"]["reason"] == "lease_expired"
                           and e["attempt"] == 1 and e["result"]["next_attempt"] == 1 for e in retries), retries
    assert f"worker lease expired: no heartbeat for {LEASE_SECONDS}s" in retries[0]["error"], retries
    assert all(attempt == 1 for kind, attempt in kinds if attempt is not None), kinds  # no policy attempt 2
    assert sum(1 for kind, _ in kinds if kind == "action_completed") == 1, kinds
    assert sum(1 for kind, _ in kinds if kind == "step_completed") == 1, kinds
    # the events name the workers (`<host>-<pid>`): announced by the killed one, completed by the survivor
    started = [e.get("worker_id") or "" for e in slow if e["event_type"] == "action_started"]
    (completed,) = [e.get("worker_id") or "" for e in slow if e["event_type"] == "action_completed"]
    assert started[0].endswith(f"-{first}") and completed.endswith(f"-{survivor}"), (started, completed)
    print(f"killed worker {first}; attempt 1 completed on {survivor} after {len(retries)} infrastructure retry(ies) "
          f"{time.monotonic() - killed_at:.1f}s after the kill")


# ---------------------------------------------------------------------------------- secrets never leave a worker
def _secret_playbook(url: str) -> str:
    return f"""\
apiVersion: noetl.io/v1
kind: Playbook
metadata: {{name: uses_secrets, path: tests/faults/uses_secrets}}
workflow:
  - step: start
    next: [{{step: py}}]
  - step: py
    type: python
    data: {{token: "{{{{ secret.API_TOKEN }}}}"}}
    code: |
      def main(token):
          print("using", token)
          return {{"echo": token, "length": len(token)}}
    next: [{{step: call}}]
  - step: call
    type: http
    method: GET
    endpoint: "{url}/health"
    headers: {{X-Token: "{{{{ secret.API_TOKEN }}}}"}}
    next: [{{step: sql}}]
  - step: sql
    type: postgres
    auth: pg_secret
    command: "SELECT '{{{{ secret.API_TOKEN }}}}' AS echoed, current_database() AS db"
    next: [{{step: end}}]
  - step: end
    result:
      echo: "{{{{ py.echo }}}}"
      length: "{{{{ py.length }}}}"
      sql: "{{{{ sql.command_0.rows[0] }}}}"
"""


async def _all_records(bootstrap: str, prefix: str) -> dict[str, list[bytes]]:
    """Every record (key, value and headers) of every topic of the installation, read from the start."""
    consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                         auto_offset_reset="earliest", fetch_max_wait_ms=100)
    await consumer.start()
    try:
        names = sorted(t for t in await consumer.topics() if t.startswith(prefix))
        parts = [aiokafka.TopicPartition(t, p) for t in names for p in consumer.partitions_for_topic(t) or ()]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        records: dict[str, list[bytes]] = {t: [] for t in names}
        idle = 0
        while idle < 3:                        # not end_offsets: Tansu under-reports "latest" (docs/kafka.md)
            batch = await consumer.getmany(timeout_ms=700, max_records=5000)
            idle = 0 if batch else idle + 1
            for tp, recs in batch.items():
                for r in recs:
                    headers = b"".join(k.encode() + (v or b"") for k, v in r.headers or ())
                    records[tp.topic].append((r.key or b"") + b"\0" + (r.value or b"") + b"\0" + headers)
        return records
    finally:
        await consumer.stop()


def test_no_secret_reaches_any_topic_event_or_log(cluster: Cluster, pg_dsn: str, tmp_path: Path) -> None:
    dsn = urlsplit(pg_dsn)
    credential = {"name": "pg_secret", "type": "postgres",
                  "data": {"host": dsn.hostname, "port": dsn.port or 5432, "user": dsn.username or "postgres",
                           "database": dsn.path.lstrip("/") or "postgres", "password": DB_PASSWORD}}
    put = httpx.post(f"{cluster.url}/api/credentials", json=credential, timeout=10, headers=cluster.auth)
    assert put.status_code == 200, put.text
    playbook = tmp_path / "secrets.yaml"
    playbook.write_text(_secret_playbook(cluster.url))

    report = _finish(cluster.run(playbook), timeout=120)
    assert report["status"] == "COMPLETED", report
    assert report["result"]["echo"] == "***" and report["result"]["length"] == len(API_TOKEN)
    assert report["result"]["sql"] == {"echoed": "***", "db": dsn.path.lstrip("/") or "postgres"}, report["result"]

    records = asyncio.run(_all_records(cluster.env["KAFKA_BOOTSTRAP_SERVERS"], cluster.env["NOETL_TOPIC_PREFIX"]))
    prefix = cluster.env["NOETL_TOPIC_PREFIX"]
    for must in ("noetl.requests", "noetl.results", "noetl.events", "noetl.commands.default"):
        assert records.get(prefix + must), f"nothing read from {prefix + must}: {sorted(records)}"
    assert any(name.endswith("-changelog") and recs for name, recs in records.items()), sorted(records)
    everything = b"".join(b"".join(recs) for recs in records.values())
    assert report["execution_id"].encode() in everything         # the scan does see this execution
    for secret in (API_TOKEN, DB_PASSWORD):
        leaks = [name for name, recs in records.items() if any(secret.encode() in r for r in recs)]
        assert not leaks, f"a secret is on {leaks}"

    served = httpx.get(f"{cluster.url}/api/executions/{report['execution_id']}/events", timeout=10,
                       headers=cluster.auth).text
    assert "***" in served and API_TOKEN not in served and DB_PASSWORD not in served
    logs = cluster.logs()
    assert API_TOKEN not in logs and DB_PASSWORD not in logs
