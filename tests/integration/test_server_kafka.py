"""`noetl server --kafka BOOTSTRAP --database-url DSN`: every role in one process, on real Kafka (Tansu, from
the conftest fixtures) and real Postgres (NOETL_TEST_PG_DSN), started as a subprocess like a user would.

- examples run through `noetl run --server URL` (hello world, a fan-out + join), and the API shows them;
- a restart resumes in-flight executions: after SIGTERM (graceful: the running step finishes first) and
  after SIGKILL of the whole process group (a crash: the interrupted step runs again), every step's side
  effect happens exactly once, except the interrupted step's start;
- unreachable Kafka or Postgres, and half a configuration, end the command with a reason and no traceback.

Each test has its own topic prefix and Postgres schema.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest

pytest.importorskip("asyncpg")
pytest.importorskip("aiokafka")
pytest.importorskip("faust")

import httpx  # noqa: E402

from noetl_common.topics import Topics  # noqa: E402
from support import bearer, declared, free_port, local_admin_token, pg_token  # noqa: E402

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]

ROOT = Path(__file__).resolve().parents[2]
NOETL = str(Path(sys.executable).parent / "noetl")
READY_TIMEOUT = 90.0     # a restarted process on Tansu waits out its dead predecessor's sessions (3 s each)
SLOW_STEP_SECONDS = 4.0  # long enough to be caught mid-step


def _wait(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


class Server:
    """One `noetl server --kafka` process (its own session, so a crash can take its python children too)."""

    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.env, self.port, self.log = env, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        # The DSN as operators are told to give it (docs/security.md): from a 0600 file, never on argv, and
        # not exported to the server either, so the file is what it connects with.
        dsn_file = self.log.parent / "database-url"
        dsn_file.touch(mode=0o600)
        dsn_file.write_text(self.env["NOETL_DATABASE_URL"] + "\n")
        env = {k: v for k, v in self.env.items() if k != "NOETL_DATABASE_URL"}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [NOETL, "server", "--port", str(self.port), "--kafka", self.env["NOETL_KAFKA_BOOTSTRAP"],
                 "--database-url-file", str(dsn_file)],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=self.log.parent)
        _wait(self._ready, READY_TIMEOUT, f"the server's /ready (log: {self.log})")
        cmdline = Path(f"/proc/{self.proc.pid}/cmdline").read_bytes().decode()
        assert self.env["NOETL_DATABASE_URL"] not in cmdline     # what `ps` shows every local user
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the server exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{self.url}/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def terminate(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def crash(self) -> None:
        """SIGKILL to the whole process group: no shutdown, no commit, the python step's process dies too."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop_quietly(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.terminate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    @property
    def auth(self) -> dict[str, str]:
        return bearer(self.env["NOETL_API_TOKEN"])

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.url}{path}", timeout=10, headers=self.auth)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture
def schema(pg_dsn: str) -> Iterator[str]:
    import asyncio

    import asyncpg

    name = f"srvkafka_{uuid.uuid4().hex[:12]}"
    yield name

    async def drop() -> None:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        finally:
            await conn.close()
    asyncio.run(drop())


@pytest.fixture
def server_env(kafka_endpoint: Any, topics: Topics, pg_dsn: str, schema: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOETL_", "KAFKA_"))}
    env.update(NOETL_KAFKA_BOOTSTRAP=kafka_endpoint.bootstrap, NOETL_DATABASE_URL=pg_dsn,
               NOETL_STORE=str(tmp_path / "home" / "noetl.db"),   # where the local secret.key goes
               NOETL_DATABASE_SCHEMA=schema, NOETL_TOPIC_PREFIX=topics.prefix, NOETL_TOPIC_PARTITIONS="2",
               NOETL_WORKER_PYTHON_PROCESSES="1", PYTHONUNBUFFERED="1",
               # A restart that outlasts the lease (30 s) makes the broker count the running attempt as lost
               # (docs/cluster.md); on a busy machine a crash + restart on Tansu can come close to that.
               NOETL_LEASE_SECONDS="120",
               # the cluster's tokens are in Postgres: `noetl run --server` and the test's calls use this one
               NOETL_API_TOKEN=pg_token(pg_dsn, schema, "admin"))
    if kafka_endpoint.kind == "tansu":   # Tansu answers a group join after half the session timeout
        env["NOETL_KAFKA_SESSION_TIMEOUT_MS"] = os.environ.get("NOETL_KAFKA_SESSION_TIMEOUT_MS", "3000")
    return env


@pytest.fixture
def server(server_env: dict[str, str], tmp_path: Path) -> Iterator[Server]:
    s = Server(server_env, free_port(), tmp_path / "server.log")
    try:
        yield s
    finally:
        s.stop_quietly()


def _run(server: Server, playbook: Path, *args: str) -> dict[str, Any]:
    done = subprocess.run([NOETL, "run", "--server", server.url, str(playbook), "--json", *args], env=server.env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(done.stdout)


# ------------------------------------------------------------------------------------------ examples
def test_examples_run_through_noetl_run_server(server: Server) -> None:
    server.start()
    hello = _run(server, ROOT / "examples" / "hello_world.yaml", "--payload", '{"name": "Kafka"}')
    assert hello["status"] == "COMPLETED"
    assert hello["result"] == {"greeting": "Hello, Kafka!", "name_length": 5}
    assert {s: v["status"] for s, v in hello["steps"].items()} == dict.fromkeys(("start", "greet", "end"),
                                                                              "COMPLETED")

    fan = _run(server, ROOT / "examples" / "fan_out_join.yaml", "--set", "numbers=[10, 20, 30]")
    assert fan["status"] == "COMPLETED"
    assert fan["result"] == {"mean": 20.0, "min": 10, "max": 30, "spread": 20}
    steps = {s: (v["status"], v["attempts"]) for s, v in fan["steps"].items()}
    assert steps == dict.fromkeys(("start", "total", "extremes", "spread", "report", "end"), ("COMPLETED", 1))
    assert fan["steps"]["report"]["visits"] == 1   # the join ran once, after both branches

    # The same data through the read API of the one process (what the projection wrote to Postgres) ...
    execution = server.get(f"/api/executions/{fan['execution_id']}")
    assert execution["status"] == "COMPLETED"
    listed = {e["execution_id"] for e in server.get("/api/executions")}
    assert {hello["execution_id"], fan["execution_id"]} <= listed
    registered = {e["path"] for e in server.get("/api/catalog/list")["entries"]}
    assert {"examples/hello_world", "examples/fan_out_join"} <= registered
    # ... and the render route over the projected events
    rendered = httpx.post(f"{server.url}/api/context/render", timeout=10, headers=server.auth,
                          json={"execution_id": hello["execution_id"], "template": "{{ greet.greeting }}"})
    assert rendered.json()["rendered"] == "Hello, Kafka!", rendered.text

    # Without NOETL_SECRET_KEY, credentials use the local key embedded mode uses (secret.key beside the
    # store): stored encrypted in Postgres, resolved by the worker, redacted in the result.
    token = f"tok-{uuid.uuid4().hex}"
    put = httpx.post(f"{server.url}/api/credentials", timeout=10, headers=server.auth,
                     json={"name": "demo", "type": "bearer", "data": {"token": token}})
    assert put.status_code == 200 and token not in put.text, put.text
    key_file = Path(server.env["NOETL_STORE"]).parent / "secret.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    uses = server.log.parent / "uses_secret.yaml"
    uses.write_text(textwrap.dedent("""\
        apiVersion: noetl.io/v1
        kind: Playbook
        metadata: {name: uses_secret, path: tests/server_kafka/uses_secret}
        workflow:
          - step: start
            next: [{step: echo}]
          - step: echo
            type: python
            data: {token: "{{ secret.demo }}"}
            code: |
              def main(token):
                  return {"token": token, "length": len(token)}
            next: [{step: end}]
          - step: end
        """))
    used = _run(server, uses)
    assert used["status"] == "COMPLETED", used
    assert used["steps"]["echo"]["result"] == {"token": "***", "length": len(token)}

    # one /metrics for every role of the process: the API's, the worker's counters, the broker's
    scraped = httpx.get(f"{server.url}/metrics", timeout=5, headers=server.auth).text
    metrics = {line.split()[0]: float(line.split()[1]) for line in scraped.splitlines()
               if line and not line.startswith("#")}
    assert metrics["noetl_worker_commands_completed_total"] >= 3        # greet, total/extremes/..., echo
    assert metrics["noetl_broker_executions_finished_total"] == 3
    assert metrics["noetl_broker_ready"] == 1 and metrics["noetl_ingest_messages_produced"] >= 3

    assert server.terminate() == 0
    assert not list(server.log.parent.glob("*-data")), "faust's data directory was left in the working directory"
    log = server.log.read_text()
    assert "Traceback" not in log and '"level": "error"' not in log, log[-3000:]


# ------------------------------------------------------------------------------------------ poison playbooks
POISON_END = textwrap.dedent("""\
    apiVersion: noetl.io/v1
    kind: Playbook
    metadata: {name: poison_end, path: tests/server_kafka/poison_end}
    workload: {n: 1}
    workflow:
      - step: start
        next: [{step: end}]
      - step: end
        result: {x: "{{ workload.items }}"}
    """)
POISON_CYCLER = textwrap.dedent("""\
    apiVersion: noetl.io/v1
    kind: Playbook
    metadata: {name: poison_cycler, path: tests/server_kafka/poison_cycler}
    workflow:
      - step: start
        next: [{step: s}]
      - step: s
        type: python
        data: {x: "{{ cycler }}"}
        code: |
          def main(x):
              return x
        next: [{step: end}]
      - step: end
    """)
STEADY = textwrap.dedent("""\
    apiVersion: noetl.io/v1
    kind: Playbook
    metadata: {name: steady, path: tests/server_kafka/steady}
    workload: {x: 1}
    workflow:
      - step: start
        next: [{step: work}]
      - step: work
        type: python
        data: {x: "{{ workload.x }}"}
        code: |
          import time
          def main(x):
              time.sleep(1)
              return {"y": x + 1}
        next: [{step: end}]
      - step: end
        result: {y: "{{ work.y }}"}
    """)


def test_poison_playbooks_fail_naming_the_template_and_the_server_stays_ready(server: Server) -> None:
    """Issue 8: these crashed the broker inside the process at every restart. Now each ends FAILED with a
    message naming the template, an execution running meanwhile completes, /ready stays 200 and the process
    never restarts."""
    server.start()
    with httpx.Client(base_url=server.url, timeout=10, headers=server.auth) as api:
        for text in (POISON_END, POISON_CYCLER, STEADY):
            assert api.post("/api/catalog/register", json={"content": text}).status_code == 200

        def run(path: str) -> str:
            r = api.post("/api/executions/run", json={"path": f"tests/server_kafka/{path}"})
            assert r.status_code == 200, r.text
            return r.json()["execution_id"]

        def finished(execution_id: str) -> dict[str, Any]:
            def done() -> dict[str, Any] | None:
                r = api.get(f"/api/executions/{execution_id}")
                return r.json() if r.status_code == 200 and r.json()["status"] in ("COMPLETED", "FAILED") else None
            return _wait(done, 60, f"execution {execution_id}")
        steady, end, cycler = run("steady"), run("poison_end"), run("poison_cycler")
        results = {"steady": finished(steady), "end": finished(end), "cycler": finished(cycler)}
        assert api.get("/ready").status_code == 200
        again = finished(run("steady"))
        assert api.get("/ready").status_code == 200
    assert server.proc is not None and server.proc.poll() is None
    assert results["steady"]["status"] == "COMPLETED" and results["steady"]["result"] == {"y": 2}
    assert (results["end"]["status"], results["end"]["error"]) == ("FAILED", (
        "step 'end' failed: result: `workload.items` is a method of the mapping, not a value (the mapping has no "
        "key 'items') in template '{{ workload.items }}'"))
    assert (results["cycler"]["status"], results["cycler"]["error"]) == ("FAILED", (
        "step 's' failed: data.x: `cycler` is a class (Cycler), not a value in template '{{ cycler }}'"))
    assert again["status"] == "COMPLETED"
    assert server.terminate() == 0
    assert "Traceback" not in server.log.read_text()


# ------------------------------------------------------------------------------------------ restarts
def _slow_playbook(tmp_path: Path) -> Path:
    """first -> slow (SLOW_STEP_SECONDS) -> after -> end. Each python step appends its name to the marker
    file when it runs, so the file counts executions of step code, whoever ran them."""
    path = tmp_path / "slow.yaml"
    path.write_text(textwrap.dedent(f"""\
        apiVersion: noetl.io/v1
        kind: Playbook
        metadata: {{name: slow, path: tests/server_kafka/slow}}
        workload: {{marker: ""}}
        workflow:
          - step: start
            next: [{{step: first}}]
          - step: first
            type: python
            data: {{marker: "{{{{ workload.marker }}}}"}}
            code: |
              def main(marker):
                  with open(marker, "a") as f:
                      f.write("first\\n")
                  return {{"n": 1}}
            next: [{{step: slow}}]
          - step: slow
            type: python
            data: {{marker: "{{{{ workload.marker }}}}"}}
            code: |
              import time
              def main(marker):
                  with open(marker, "a") as f:
                      f.write("slow-begin\\n")
                  time.sleep({SLOW_STEP_SECONDS})
                  with open(marker, "a") as f:
                      f.write("slow-end\\n")
                  return {{"n": 2}}
            next: [{{step: after}}]
          - step: after
            type: python
            data: {{marker: "{{{{ workload.marker }}}}", n: "{{{{ slow.n }}}}"}}
            code: |
              def main(marker, n):
                  with open(marker, "a") as f:
                      f.write("after\\n")
                  return {{"n": n + 1}}
            next: [{{step: end}}]
          - step: end
            result: "{{{{ after.n }}}}"
        """))
    return path


def _marks(marker: Path) -> Counter[str]:
    return Counter(marker.read_text().split()) if marker.exists() else Counter()


def _restart_mid_step(server: Server, tmp_path: Path, step_dir: Path,
                      interrupt: Any) -> tuple[dict[str, Any], Counter[str]]:
    """Start the slow playbook with `noetl run --server` in the background, interrupt the server while
    `slow` runs, start it again on the same port: the same client sees the execution finish."""
    marker = step_dir / "marks.txt"
    server.start()
    client = subprocess.Popen([NOETL, "run", "--server", server.url, str(_slow_playbook(tmp_path)), "--json",
                               "--payload", json.dumps({"marker": str(marker)})],
                              env=server.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: _marks(marker)["slow-begin"] == 1, 60, "the slow step to start")
        interrupt(server)
        server.start()   # same topics, same schema, same port
        out, errors = client.communicate(timeout=120)
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
    assert client.returncode == 0, out[-2000:] + errors[-2000:]
    return json.loads(out), _marks(marker)


def test_restart_after_sigterm_resumes_and_runs_each_step_once(server: Server, tmp_path: Path,
                                                               step_dir: Path) -> None:
    def graceful(s: Server) -> None:
        started = time.monotonic()
        assert s.terminate() == 0
        # the worker's grace let the running step finish before the process ended
        assert _marks(step_dir / "marks.txt")["slow-end"] == 1
        assert time.monotonic() - started < 30

    report, marks = _restart_mid_step(server, tmp_path, step_dir, graceful)
    assert report["status"] == "COMPLETED" and report["result"] == 3, report
    assert marks == Counter({"first": 1, "slow-begin": 1, "slow-end": 1, "after": 1})
    assert {s: v["status"] for s, v in report["steps"].items()} == dict.fromkeys(
        ("start", "first", "slow", "after", "end"), "COMPLETED")
    assert server.get(f"/api/executions/{report['execution_id']}")["status"] == "COMPLETED"


def test_restart_after_a_crash_resumes_and_reruns_only_the_interrupted_step(server: Server, tmp_path: Path,
                                                                           step_dir: Path) -> None:
    report, marks = _restart_mid_step(server, tmp_path, step_dir, Server.crash)
    assert report["status"] == "COMPLETED" and report["result"] == 3, report
    # `slow` was killed halfway and run again from the start; nothing else ran twice, nothing was skipped
    assert marks == Counter({"first": 1, "slow-begin": 2, "slow-end": 1, "after": 1})
    completed = [e["node_name"] for e in report["events"] if e["event_type"] == "step_completed"]
    assert sorted(completed) == sorted(["start", "first", "slow", "after", "end"])   # each step completed once
    assert server.get(f"/api/executions/{report['execution_id']}")["status"] == "COMPLETED"


# ------------------------------------------------------------------------------------------ start errors
def _start_fails(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    done = subprocess.run([NOETL, "server", "--port", str(free_port()), *args], env=env, capture_output=True,
                          text=True, timeout=90)
    assert time.monotonic() - started < 60
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
    return done


def test_unreachable_kafka_is_a_clear_error(server_env: dict[str, str]) -> None:
    closed = f"127.0.0.1:{free_port()}"   # nothing listens there
    done = _start_fails(server_env, "--kafka", closed, "--database-url", server_env["NOETL_DATABASE_URL"])
    assert done.returncode == 1
    assert f"cannot reach Kafka at {closed}" in done.stderr, done.stderr[-3000:]


def test_unreachable_postgres_is_a_clear_error_without_the_password(server_env: dict[str, str]) -> None:
    dsn = f"postgresql://noetl:hunter2@127.0.0.1:{free_port()}/nowhere"
    done = _start_fails(server_env, "--kafka", server_env["NOETL_KAFKA_BOOTSTRAP"], "--database-url", dsn)
    assert done.returncode == 1
    assert "cannot use Postgres at 127.0.0.1:" in done.stderr and "/nowhere" in done.stderr, done.stderr[-3000:]
    assert "hunter2" not in done.stderr


def test_half_a_kafka_configuration_is_a_usage_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOETL_", "KAFKA_"))}
    no_db = _start_fails(env, "--kafka", "127.0.0.1:9092")
    assert no_db.returncode == 2 and "--kafka needs --database-url" in no_db.stderr
    no_kafka = _start_fails(env, "--database-url", "postgresql://x@127.0.0.1/x")
    assert no_kafka.returncode == 2 and "--database-url needs --kafka" in no_kafka.stderr
    with_store = _start_fails(env, "--kafka", "127.0.0.1:9092", "--database-url", "postgresql://x@127.0.0.1/x",
                              "--store", str(tmp_path / "x.db"))
    assert with_store.returncode == 2 and "--store is for embedded mode" in with_store.stderr
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text("postgresql://x:hunter2@127.0.0.1/x\n")
    file_no_kafka = _start_fails(env, "--database-url-file", str(dsn_file))
    assert file_no_kafka.returncode == 2 and "--database-url-file needs --kafka" in file_no_kafka.stderr
    both = _start_fails(env, "--kafka", "127.0.0.1:9092", "--database-url-file", str(dsn_file),
                        "--database-url", "postgresql://x@127.0.0.1/x")
    assert both.returncode == 2 and "give the DSN once" in both.stderr


@pytest.mark.parametrize("content, expected", [
    (None, "cannot read the database URL file"),
    (b"", "is empty"),
    (b"postgresql://a:hunter2@h/db\npostgresql://b:hunter2@h/db\n", "2 non-empty lines"),
    (b"postgresql://a:hunter2@h/db\0", "NUL bytes"),
    (b"hunter2" * 2000, "larger than 8192 bytes"),
    (b"\xffhunter2", "not UTF-8"),
])
def test_a_bad_database_url_file_is_a_clear_usage_error_that_does_not_echo_it(
        tmp_path: Path, content: bytes | None, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOETL_", "KAFKA_"))}
    path = tmp_path / "dsn"
    if content is not None:
        path.write_bytes(content)
    done = _start_fails(env, "--kafka", "127.0.0.1:9092", "--database-url-file", str(path))
    said = " ".join(done.stderr.split())      # rich wraps long lines at spaces
    assert done.returncode == 2 and expected in said and str(path) in done.stderr.replace("\n", ""), said
    assert "hunter2" not in done.stdout + done.stderr
    from_env = _start_fails({**env, "NOETL_DATABASE_URL_FILE": str(path)}, "--kafka", "127.0.0.1:9092")
    assert from_env.returncode == 2 and expected in " ".join(from_env.stderr.split()), from_env.stderr


def test_exported_kafka_and_database_variables_do_not_switch_a_plain_server_to_kafka(tmp_path: Path) -> None:
    """The shell of an operator of the services has NOETL_KAFKA_BOOTSTRAP and NOETL_DATABASE_URL exported:
    a plain `noetl server` still serves embedded (here both point at nothing, so Kafka mode would fail)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOETL_", "KAFKA_"))}
    env.update(NOETL_KAFKA_BOOTSTRAP=f"127.0.0.1:{free_port()}", NOETL_DATABASE_URL="postgresql://x@127.0.0.1:1/x",
               NOETL_HTTP_PORT=str(free_port()), NOETL_STORE=str(tmp_path / "noetl.db"))
    url = f"http://127.0.0.1:{env['NOETL_HTTP_PORT']}"      # the port comes from NOETL_HTTP_PORT
    proc = subprocess.Popen([NOETL, "server"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        def ready() -> bool:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            try:
                return httpx.get(f"{url}/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        _wait(ready, 60, "the embedded server")
        admin = bearer(local_admin_token(tmp_path / "noetl.db"))   # written by the embedded server only
        assert httpx.get(f"{url}/api/executions", timeout=5, headers=admin).json() == []
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert (tmp_path / "noetl.db").exists()                   # it used the SQLite store


def test_values_postgres_cannot_hold_are_declared_refusals_not_server_errors(server: Server) -> None:
    """schemathesis's findings in Kafka mode (scripts/schemathesis.sh): a NUL character in a path, query or
    body value, and integers over a Postgres `integer`, were 500s. Now 400 (or 404/422), as declared."""
    server.start()
    document = server.get("/openapi.json")
    get = lambda route, **params: httpx.get(f"{server.url}{route}", params=params, headers=server.auth, timeout=30)  # noqa: E731
    post = lambda path, body: httpx.post(f"{server.url}{path}", json=body, headers=server.auth, timeout=30)  # noqa: E731
    for template, response in [
        ("/api/executions/{execution_id}", get("/api/executions/a%00b")),
        ("/api/executions/{execution_id}/events", get("/api/executions/a%00b/events")),
        ("/api/executions/{execution_id}/explain", get("/api/executions/a%00b/explain")),
        ("/api/executions", get("/api/executions", path="a\x00b")),
        ("/api/catalog/playbook", get("/api/catalog/playbook", playbook_id="a\x00")),
    ]:
        assert response.status_code == 400, (template, response.text)
        declared(document, "GET", template, response)
    for template, body in [("/api/executions/run", {"path": "a\x00b"}),
                           ("/api/credentials", {"name": "nul_type", "type": "a\x00b", "data": {"k": "v"}}),
                           ("/api/context/render", {"execution_id": "a\x00b", "template": "x"})]:
        response = post(template, body)
        assert response.status_code == 400, (template, response.text)
        declared(document, "POST", template, response)
    response = get("/api/catalog/playbook", playbook_id="a", version="27913500456")
    assert response.status_code == 404, response.text
    response = post("/api/executions/run", {"path": "a", "version": 2457086956691292160})
    assert response.status_code == 404, response.text
    declared(document, "POST", "/api/executions/run", response)
    response = get("/api/executions/a/events", after_seq=str(2**63 - 2))
    assert response.status_code == 422, response.text
    assert httpx.get(f"{server.url}/ready", timeout=10).status_code == 200
