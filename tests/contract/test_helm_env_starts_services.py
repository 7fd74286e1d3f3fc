"""Each service process started with exactly the environment the chart renders for its pod becomes ready.

The chart is rendered (real Helm engine) with values that point it at the local Kafka (the integration
suite's `kafka_endpoint`: KAFKA_BOOTSTRAP_SERVERS, testcontainers or Tansu) and Postgres
(`contract_pg_dsn`), a topic prefix and a database schema of this test's own, and a free port. Then, as a
kubelet would: the migration Job's command with the Job's environment, then each Deployment's command with
the container's environment (ConfigMap via envFrom, the Secret's keys, the literal variables: nothing from
this test's own environment but PATH/PYTHONPATH to find the interpreter), in a fresh working directory.
The test waits for GET /ready to answer 200 (the readiness probe), checks /health and /metrics, sends
SIGTERM (what Kubernetes sends) and expects a clean exit within the pod's terminationGracePeriodSeconds.

A role whose `python -m` module does not exist yet is skipped, naming it: nothing else skips.
"""
from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from support import bearer, free_port, pg_token

ROLES = {"ingest": "noetl_frontend", "query": "noetl_query", "render": "noetl_render",
         "broker": "noetl_broker", "worker": "noetl_worker"}
READY_TIMEOUT = 120.0
# What a process needs from outside the chart to find its interpreter and packages; nothing NOETL_*.
PASSED_THROUGH = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "SYSTEMROOT")


def has_main(module: str) -> bool:
    try:
        return importlib.util.find_spec(f"{module}.__main__") is not None
    except ModuleNotFoundError:
        return False


@pytest.fixture(scope="module")
def cluster_values(kafka_endpoint: Any, contract_pg_dsn: str) -> Iterator[dict[str, Any]]:
    """Values pointing the chart at the local Kafka and Postgres, in a schema and topic prefix of their
    own (the schema is dropped afterwards)."""
    run = uuid.uuid4().hex[:10]
    schema = f"helm_{run}"
    values = {
        "externalKafka": {"bootstrap": kafka_endpoint.bootstrap},
        "externalDatabase": {"url": contract_pg_dsn, "schema": schema},
        "topics": {"prefix": f"t.helm.{run}.", "partitions": 2},
        # Tansu answers a group join only after half the session timeout (docs/kafka.md).
        "config": {"kafkaSessionTimeoutMs": 3000 if kafka_endpoint.kind == "tansu" else 6000},
        "workers": [{"name": "default"}],
    }
    yield values

    async def drop() -> None:
        import asyncpg
        conn = await asyncpg.connect(contract_pg_dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
    asyncio.run(drop())


def process_env(rendered: Any, workload: dict[str, Any], home: Path) -> dict[str, str]:
    env, opaque = rendered.container_env(workload)
    assert not opaque, f"the chart refers to sources this test cannot see: {opaque}"
    unresolved = [v.name for v in env.values() if v.value is None]
    assert not unresolved, f"values the chart does not decide: {unresolved}"
    base = {k: os.environ[k] for k in PASSED_THROUGH if k in os.environ}
    return {**base, "HOME": str(home), **{name: var.value for name, var in env.items()}}


def command(workload: dict[str, Any]) -> list[str]:
    cmd = workload["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:2] == ["python", "-m"], cmd
    return [sys.executable, *cmd[1:]]


@pytest.fixture(scope="module")
def migrated(helm_chart: Any, cluster_values: dict[str, Any]) -> None:
    """The pre-install hook: the migration Job's command with the Job's environment."""
    rendered = helm_chart.render(cluster_values)
    job = rendered.workloads()["migrate"]
    with tempfile.TemporaryDirectory(prefix="noetl-helm-migrate.") as work:
        done = subprocess.run(command(job), env=process_env(rendered, job, Path(work)), cwd=work,
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"migration failed:\n{done.stdout}\n{done.stderr}"
    assert f"schema {cluster_values['externalDatabase']['schema']}:" in done.stdout


@pytest.mark.parametrize("role", list(ROLES))
def test_service_becomes_ready_with_the_charts_environment(role: str, helm_chart: Any, contract_pg_dsn: str,
                                                          cluster_values: dict[str, Any], migrated: None) -> None:
    assert has_main(ROLES[role]), f"`python -m {ROLES[role]}` cannot start: {ROLES[role]}.__main__ is missing"
    port = free_port()
    rendered = helm_chart.render({**cluster_values, "httpPort": port})
    key = "worker:default" if role == "worker" else role
    workload = rendered.workloads()[key]
    pod = workload["spec"]["template"]["spec"]
    grace = pod.get("terminationGracePeriodSeconds", 30)

    with tempfile.TemporaryDirectory(prefix=f"noetl-helm-{role}.") as work:
        log_path = Path(work) / "process.log"
        home = Path(work) / "home"
        workdir = Path(work) / "workdir"           # the pod's emptyDir workingDir
        home.mkdir()
        workdir.mkdir()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(command(workload), env=process_env(rendered, workload, home), cwd=workdir,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            ready = wait_ready(proc, base, log_path)
            assert ready.json().get("status") == "ready", ready.text
            with httpx.Client(timeout=5) as client:
                assert client.get(f"{base}/health").status_code == 200
                # the API roles' /metrics takes a token (a viewer's); the worker's listener serves nothing
                # but ops, and its /metrics is open there; the broker's takes the broker token from the
                # chart's Secret (docs/security.md)
                if role == "broker":
                    token = process_env(rendered, workload, home)["NOETL_BROKER_TOKEN"]
                    assert client.get(f"{base}/metrics").status_code == 401
                else:
                    token = pg_token(contract_pg_dsn, cluster_values["externalDatabase"]["schema"], "viewer")
                metrics = client.get(f"{base}/metrics", headers=bearer(token))
                assert metrics.status_code == 200 and "# TYPE" in metrics.text, metrics.text[:500]
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{role} did not stop within terminationGracePeriodSeconds={grace} after SIGTERM:\n"
                            f"{tail(log_path)}")
            assert code == 0, f"{role} exited {code} after SIGTERM:\n{tail(log_path)}"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_ready(proc: subprocess.Popen[bytes], base: str, log_path: Path) -> httpx.Response:
    deadline = time.monotonic() + READY_TIMEOUT
    last = "no answer"
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"exited {proc.returncode} before it was ready:\n{tail(log_path)}")
            try:
                answer = client.get(f"{base}/ready")
                if answer.status_code == 200:
                    return answer
                last = f"{answer.status_code} {answer.text[:300]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.25)
    pytest.fail(f"not ready after {READY_TIMEOUT:.0f}s (last /ready: {last}):\n{tail(log_path)}")


def tail(path: Path, size: int = 4000) -> str:
    return path.read_bytes()[-size:].decode(errors="replace")
