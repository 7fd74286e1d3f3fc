"""The fault campaign (tests/fault_campaign.py) in both modes, as deployed:

- the cluster: ingest, broker, two workers, query and render as separate processes (scripts/cluster-start.sh)
  on Kafka (Tansu) and Postgres; the killer SIGKILLs workers, the broker and ingest and restarts each with
  its own command line, environment and directory, as a supervisor would;
- embedded: `noetl server` on a SQLite store; the killer SIGKILLs the whole server (its python step
  processes too) and restarts it on the same store and port.

Each asserts 0 hung, 0 lost, 0 wrong and 0 failed executions, and prints the duplicate side effects as a
figure. Why 0 failed: every step is deterministic, the one that fails on purpose (`retry`) succeeds on its
second attempt, and a process that dies takes no execution with it: a lost lease is retried by the
infrastructure retries before a step's own `retry:` counts, and a restarted runtime resumes what it held.
A FAILED execution is printed with its events' errors, the kills and the seed (NOETL_FAULT_SEED replays).
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fault_campaign import Campaign, Victim, http_ready, kill_group, wait_for
from support import free_port

ROOT = Path(__file__).resolve().parents[2]
NOETL = str(Path(sys.executable).parent / "noetl")
LEASE_SECONDS = "3"     # a killed worker's attempt is noticed in seconds, not the default 30


def _seed() -> int:
    return int(os.environ.get("NOETL_FAULT_SEED") or random.SystemRandom().randrange(1, 10**6))


@pytest.fixture
def campaign_dir() -> Iterator[Path]:
    """Outside pytest's tmp dirs (mode 700): step processes run as another user when the tests run as root."""
    path = Path(tempfile.mkdtemp(prefix="noetl-campaign."))
    path.chmod(0o755)
    yield path / "campaign"
    shutil.rmtree(path, ignore_errors=True)


def _check(report: dict[str, Any], victims: list[str]) -> None:
    brief = {k: report[k] for k in ("seed", "executions", "kills", "kills_by_victim", "running_at_kills", "status",
                                     "side_effects", "duplicate_side_effects", "retries", "requests_retried",
                                     "seconds")}
    print("campaign figures:", json.dumps(brief))
    print("kills (s after start, victim):", report["kill_times"])
    print("duplicated side effects (key, execution, step, process, s after start):", report["duplicated"])
    for eid, events in report["duplicated_events"].items():
        print(f"  {eid} (event, attempt, worker, retry kind, s after start): {events}")
    detail = json.dumps({k: v for k, v in report.items() if k not in brief}, indent=1, default=str)[:6000]
    assert report["kills"] >= 3, f"too few kills to mean anything: {brief}"
    assert set(report["kills_by_victim"]) == set(victims), f"not every victim was killed: {brief}"
    assert max(report["running_at_kills"]) > 0, f"no kill hit a running execution: {brief}"
    # each `retry` execution fails its first attempt on purpose: the step's own policy retried it
    assert report["retries"].get("policy", 0) >= report["executions"] // 5, brief
    assert not report["hung"], f"hung: {detail}"
    assert not report["lost"] and not report["not_one_execution"] and not report["stray_executions"], \
        f"lost or duplicated executions: {detail}"
    assert not report["wrong"], f"wrong results: {detail}"
    assert not report["failed"], f"failed executions: {detail}"
    assert not report["missing_side_effect"], f"completed without their side effect: {detail}"
    assert report["status"] == {"COMPLETED": report["executions"]}, detail


# ------------------------------------------------------------------------------------------------- embedded
class ServerProcess:
    """`noetl server` in its own process group; restarted on the same store and port."""

    def __init__(self, store: Path, env: dict[str, str]) -> None:
        self.store, self.env, self.port = store, env, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = store.with_suffix(".log")
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen([NOETL, "server", "--port", str(self.port), "--store", str(self.store)],
                                          stdout=log, stderr=log, env=self.env, start_new_session=True,
                                          stdin=subprocess.DEVNULL)

    def kill(self) -> None:
        assert self.popen is not None
        kill_group(self.popen.pid, self.popen)

    def ready(self) -> bool:
        assert self.popen is not None and self.popen.poll() is None, self.log.read_text()[-3000:]
        return http_ready(self.url + "/ready")


def test_fault_campaign_embedded_server(tmp_path: Path, campaign_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOETL_", "KAFKA_"))}
    # loopback only, so no token is needed (docs/security.md); the lease as in the cluster
    env.update(NOETL_AUTH="off", NOETL_LEASE_SECONDS=LEASE_SECONDS, NOETL_LOG_LEVEL="INFO")
    server = ServerProcess(tmp_path / "noetl.db", env)
    server.start()
    try:
        wait_for(server.ready, 60, "noetl server ready")
        victim = Victim("noetl server", server.kill, server.start, server.ready)
        campaign = Campaign(server.url, {}, [victim], campaign_dir, _seed(), kill_every=(3.0, 5.0),
                            max_kills=6)
        report = campaign.run()
    finally:
        if server.popen is not None and server.popen.poll() is None:
            server.kill()
    if report["failed"] or report["hung"]:
        print(server.log.read_text()[-4000:])
    _check(report, [v.name for v in campaign.victims])


# -------------------------------------------------------------------------------------------------- cluster
class ClusterRole:
    """A role cluster-start.sh started; restarted with the command line, environment and directory read
    from /proc before it is killed, and its new pid appended to the info file (cluster-stop.sh reads it)."""

    def __init__(self, name: str, info: dict[str, str], info_file: Path) -> None:
        self.name, self.info_file = name, info_file
        self.pid = int(info[f"PID_{name}"])
        self.port = int(info[f"PORT_{name}"])
        self.log = Path(info["BASE"]) / f"{name}.log"
        proc = Path(f"/proc/{self.pid}")
        self.argv = [a.decode() for a in proc.joinpath("cmdline").read_bytes().split(b"\0") if a]
        self.env = dict(e.decode().partition("=")[::2] for e in proc.joinpath("environ").read_bytes().split(b"\0") if e)
        self.cwd = os.readlink(proc / "cwd")
        self.popen: subprocess.Popen[bytes] | None = None

    def kill(self) -> None:
        kill_group(self.pid, self.popen)

    def restart(self) -> None:
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.popen.pid
        with open(self.info_file, "a") as info:
            info.write(f"PID_{self.name}={self.pid}\n")

    def ready(self) -> bool:
        assert self.popen is None or self.popen.poll() is None, self.log.read_text()[-3000:]
        return http_ready(f"http://127.0.0.1:{self.port}/ready")


def _exports(stdout: str) -> dict[str, str]:
    return dict(line[len("export "):].partition("=")[::2] for line in stdout.splitlines()
                if line.startswith("export "))


def _info(path: Path) -> dict[str, str]:
    return {k: v.strip('"') for k, _, v in (line.partition("=") for line in path.read_text().splitlines())}


async def _drop_schema(dsn: str, schema: str) -> None:
    import asyncpg
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
def cluster(kafka_endpoint: Any, pg_dsn: str) -> Iterator[tuple[str, dict[str, str], Path]]:
    pytest.importorskip("asyncpg")
    pytest.importorskip("faust")
    run_id = uuid.uuid4().hex[:10]
    schema = f"campaign_{run_id}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOETL_", "KAFKA_"))}
    env.update(KAFKA_BOOTSTRAP_SERVERS=kafka_endpoint.bootstrap, NOETL_DATABASE_URL=pg_dsn,
               NOETL_DATABASE_SCHEMA=schema, NOETL_TOPIC_PREFIX=f"campaign-{run_id}.", PYTHON=sys.executable,
               NOETL_LOG_LEVEL="INFO", NOETL_CLUSTER_STOP_GRACE="10", NOETL_CLUSTER_WORKERS="2",
               NOETL_LEASE_SECONDS=LEASE_SECONDS, NOETL_BROKER_SESSION_TIMEOUT="3")
    if kafka_endpoint.kind == "tansu":
        env["NOETL_KAFKA_SESSION_TIMEOUT_MS"] = os.environ.get("NOETL_KAFKA_SESSION_TIMEOUT_MS", "3000")
    started = subprocess.run(["bash", str(ROOT / "scripts" / "cluster-start.sh")], env=env, capture_output=True,
                             text=True, timeout=180)
    assert started.returncode == 0, started.stderr[-3000:]
    exports = _exports(started.stdout)
    info_file = Path(exports["NOETL_CLUSTER_INFO"])
    try:
        yield exports["NOETL_SERVER_URL"], exports, info_file
    finally:
        stopped = subprocess.run(["bash", str(ROOT / "scripts" / "cluster-stop.sh"), str(info_file)], env=env,
                                 capture_output=True, text=True, timeout=120)
        asyncio.run(_drop_schema(pg_dsn, schema))
        assert stopped.returncode == 0, stopped.stderr


@pytest.mark.postgres
@pytest.mark.kafka
def test_fault_campaign_cluster_of_separate_processes(cluster: tuple[str, dict[str, str], Path],
                                                      campaign_dir: Path) -> None:
    url, exports, info_file = cluster
    info = _info(info_file)
    roles = {name: ClusterRole(name, info, info_file) for name in info["ROLES"].split()}
    # workers die most often (two of them), then the broker and ingest (the API: submissions see the outage)
    weights = {"worker1": 1.5, "worker2": 1.5, "broker": 1.0, "ingest": 1.0}
    victims = [Victim(n, roles[n].kill, roles[n].restart, roles[n].ready, w) for n, w in weights.items()]
    token = exports.get("NOETL_API_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    campaign = Campaign(url, headers, victims, campaign_dir, _seed(), kill_every=(2.0, 4.0))
    report = campaign.run()
    if report["failed"] or report["hung"]:
        for role in roles.values():
            print(f"--- {role.name} log (tail)\n{role.log.read_text(errors='replace')[-2500:]}")
    _check(report, [v.name for v in campaign.victims])
