"""Issue 9 scope 5, against the real runtimes: NOETL_MAX_VISITS, NOETL_MAX_ITERATOR_ITEMS and the step
maximums NOETL_STEP_MAX_* are honoured the same way by `noetl run`, `noetl validate`, `noetl server` and
`noetl server --kafka` (real Tansu and Postgres; there the iterator cap is enforced by the broker's fold):

- a playbook over a cap is refused where it is loaded: INVALID (exit 2) for `noetl run`/`validate`, 400 for a
  registration, each naming the step, the value, the cap and the setting;
- an iterator over the cap fails its execution with the cap and the setting named; one at the cap completes,
  and the server keeps serving;
- an execution keeps the caps it started under across a restart of `noetl server` with other settings;
- a setting that is not a whole number within its bounds stops the command at start with one line naming it
  (no traceback), in every mode, the separate broker and API services included.

The core's side (given/when/then): tests/security/test_limits_core.py."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from support import NOETL, NoetlServer, bearer, free_port, local_admin_token, pg_token, until
from test_auth_server import clean_env

PYTHON = sys.executable
CAPS = {"NOETL_MAX_VISITS": "50", "NOETL_MAX_ITERATOR_ITEMS": "5", "NOETL_STEP_MAX_MEMORY_MB": "1024"}

ITERATE = textwrap.dedent("""\
    apiVersion: noetl.io/v1
    kind: Playbook
    metadata: {name: iterate, path: limits/iterate}
    workload: {n: 1, nap: 0}
    workflow:
      - step: start
        next: [{step: first}]
      - step: first
        type: python
        code: |
          import time
          def main(nap):
              time.sleep(nap)
              return 1
        data: {nap: "{{ workload.nap }}"}
        next: [{step: each}]
      - step: each
        type: iterator
        collection: "{{ range(workload.n) | list }}"
        element: x
        task:
          type: python
          code: "def main(x): return x"
          data: {x: "{{ x }}"}
        next: [{step: end}]
      - step: end
        result: "{{ each }}"
    """)


def visits(n: int) -> str:
    return textwrap.dedent(f"""\
        apiVersion: noetl.io/v1
        kind: Playbook
        metadata: {{name: visits, path: limits/visits}}
        workflow:
          - step: start
            next: [{{step: loop}}]
          - step: loop
            max_visits: {n}
            next: [{{step: end}}]
          - step: end
        """)


def memory(mb: int) -> str:
    return textwrap.dedent(f"""\
        apiVersion: noetl.io/v1
        kind: Playbook
        metadata: {{name: memory, path: limits/memory}}
        workflow:
          - step: start
            next: [{{step: crunch}}]
          - step: crunch
            type: python
            limits: {{memory_mb: {mb}}}
            code: "def main(): return 1"
            next: [{{step: end}}]
          - step: end
        """)


def env_for(home: Path, **extra: str) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return clean_env(HOME=str(home), NOETL_STORE=str(home / "noetl.db"), NOETL_STEP_USER="nobody", **extra)


def noetl(env: dict[str, str], *args: Any, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NOETL, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=env["HOME"])


def report(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON report (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------ noetl run / validate
@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    path.chmod(0o755)   # the step user works below the store's folder's parent
    return path


def test_noetl_run_fails_an_iterator_over_the_setting_and_runs_one_at_it(home: Path) -> None:
    env = env_for(home, **CAPS)
    (home / "iterate.yaml").write_text(ITERATE)
    over = noetl(env, "run", home / "iterate.yaml", "--json", "--set", "n=6")
    assert over.returncode == 1 and "Traceback" not in over.stderr, over.stderr
    failed = report(over)
    assert failed["status"] == "FAILED"
    assert "iterator collection has 6 items, over the limit of 5 (NOETL_MAX_ITERATOR_ITEMS" in json.dumps(failed)
    at = report(noetl(env, "run", home / "iterate.yaml", "--json", "--set", "n=5"))
    assert at["status"] == "COMPLETED" and at["result"] == [0, 1, 2, 3, 4], at


@pytest.mark.parametrize("command", ["run", "validate"])
def test_noetl_run_and_validate_refuse_max_visits_over_the_setting_at_load(home: Path, command: str) -> None:
    (home / "over.yaml").write_text(visits(51))
    (home / "at.yaml").write_text(visits(50))
    env = env_for(home, **CAPS)
    over = noetl(env, command, home / "over.yaml", "--json")
    assert over.returncode == 2, over.stdout + over.stderr
    text = over.stdout
    assert "workflow[1].max_visits" in text and "max_visits 51 is over the cap of 50 (NOETL_MAX_VISITS)" in text
    assert noetl(env, command, home / "at.yaml", "--json").returncode == 0
    # the default cap (10,000) when the operator sets nothing
    assert noetl(env_for(home), command, home / "over.yaml", "--json").returncode == 0


@pytest.mark.parametrize("command", ["run", "validate"])
def test_noetl_run_and_validate_refuse_step_limits_over_the_maximum_at_load(home: Path, command: str) -> None:
    (home / "big.yaml").write_text(memory(2048))
    env = env_for(home, **CAPS)
    over = noetl(env, command, home / "big.yaml", "--json")
    assert over.returncode == 2, over.stdout + over.stderr
    assert "workflow[1].limits.memory_mb" in over.stdout
    assert "limits.memory_mb = 2048 is above the maximum 1024 (NOETL_STEP_MAX_MEMORY_MB)" in over.stdout
    if command == "run":
        assert report(over)["status"] == "INVALID" and "crunch" not in json.dumps(report(over).get("steps", {}))
    assert noetl(env_for(home), command, home / "big.yaml", "--json").returncode == 0   # default maximum 16384


# not a number, negative, zero, a fraction, empty, a float's notation, huge, one over the ceiling
HOSTILE = ["abc", "-1", "0", "1.5", "", "1e3", "9" * 40, "ceiling+1"]
CEILING = {"NOETL_MAX_VISITS": 1_000_000, "NOETL_MAX_ITERATOR_ITEMS": 10_000_000}


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("name", ["NOETL_MAX_VISITS", "NOETL_MAX_ITERATOR_ITEMS"])
def test_noetl_run_refuses_a_hostile_setting_at_start_with_one_line_naming_it(home: Path, name: str,
                                                                             value: str) -> None:
    value = str(CEILING[name] + 1) if value == "ceiling+1" else value
    (home / "at.yaml").write_text(visits(5))
    done = noetl(env_for(home, **{name: value}), "run", home / "at.yaml")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert f"invalid settings: {name}:" in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("name, value", [("NOETL_MAX_VISITS", "x"), ("NOETL_STEP_MAX_MEMORY_MB", "-1")])
def test_noetl_validate_refuses_a_hostile_setting_too(home: Path, name: str, value: str) -> None:
    (home / "at.yaml").write_text(visits(5))
    done = noetl(env_for(home, **{name: value}), "validate", home / "at.yaml")
    assert done.returncode == 2 and f"invalid settings: {name}:" in done.stderr, done.stderr


def test_the_ceilings_themselves_are_accepted(home: Path) -> None:
    (home / "at.yaml").write_text(visits(1_000_000))
    env = env_for(home, NOETL_MAX_VISITS=str(CEILING["NOETL_MAX_VISITS"]),
                  NOETL_MAX_ITERATOR_ITEMS=str(CEILING["NOETL_MAX_ITERATOR_ITEMS"]))
    done = noetl(env, "validate", home / "at.yaml")
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------- the servers
class Api:
    """A running server, as a client sees it."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.client = httpx.Client(base_url=url, headers=headers, timeout=30)

    def register(self, content: str) -> httpx.Response:
        return self.client.post("/api/catalog/register", json={"content": content})

    def run(self, path: str, parameters: dict[str, Any]) -> str:
        answer = self.client.post("/api/executions/run", json={"path": path, "parameters": parameters})
        assert answer.status_code == 200, answer.text
        return answer.json()["execution_id"]

    def finished(self, execution_id: str, timeout: float = 120) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            answer = self.client.get(f"/api/executions/{execution_id}")
            return answer.json() if answer.status_code == 200 and answer.json()["status"] != "RUNNING" else None
        return until(done, timeout)

    def everything(self, execution_id: str) -> str:
        return self.client.get(f"/api/executions/{execution_id}").text + \
            self.client.get(f"/api/events/by-execution/{execution_id}").text


def check_caps_over_http(api: Api) -> None:
    """What every server must do with CAPS set (the same assertions for each mode)."""
    over = api.register(visits(51))
    assert over.status_code == 400, over.text
    assert {"path": "workflow[1].max_visits", "line": 8,
            "message": "max_visits 51 is over the cap of 50 (NOETL_MAX_VISITS); lower it, or ask the operator "
                       "to raise the cap"} in over.json()["errors"]
    big = api.register(memory(2048))
    assert big.status_code == 400, big.text
    assert any(e["path"] == "workflow[1].limits.memory_mb" and "limits.memory_mb = 2048 is above the maximum 1024 "
               "(NOETL_STEP_MAX_MEMORY_MB)" in e["message"] for e in big.json()["errors"]), big.text
    assert api.register(visits(50)).status_code == 200
    assert api.register(ITERATE).status_code == 200
    over_id, at_id = api.run("limits/iterate", {"n": 6}), api.run("limits/iterate", {"n": 5})
    failed, completed = api.finished(over_id), api.finished(at_id)
    assert failed["status"] == "FAILED", failed
    assert "iterator collection has 6 items, over the limit of 5 (NOETL_MAX_ITERATOR_ITEMS" in api.everything(over_id)
    assert completed["status"] == "COMPLETED" and completed["result"] == [0, 1, 2, 3, 4], completed
    assert api.client.get("/health").status_code == 200


class EmbeddedServer(NoetlServer):
    """`noetl server` on the store named by the env's NOETL_STORE, in `home`."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        port = free_port()
        super().__init__([], env, home / f"server-{port}.log", port=port, cwd=home)
        self.home = home

    def api(self) -> Api:
        return Api(self.url, bearer(local_admin_token(Path(self.env["NOETL_STORE"]))))


def test_noetl_server_honours_the_caps(home: Path) -> None:
    server = EmbeddedServer(home, env_for(home, **CAPS)).start()
    try:
        check_caps_over_http(server.api())
    finally:
        server.stop()


def test_an_execution_keeps_its_caps_across_a_restart_of_noetl_server_with_other_settings(home: Path) -> None:
    server = EmbeddedServer(home, env_for(home, **CAPS)).start()
    try:
        api = server.api()
        assert api.register(ITERATE).status_code == 200
        early = api.run("limits/iterate", {"n": 6, "nap": 4})   # still in its first step at the restart
        until(lambda: '"action_started"' in api.everything(early), 30)
    finally:
        server.kill()   # a crash: the snapshot in the store is all that survives
    server = EmbeddedServer(home, env_for(home, NOETL_MAX_ITERATOR_ITEMS="100")).start()
    try:
        api = server.api()
        assert api.finished(early)["status"] == "FAILED"
        assert "over the limit of 5 (NOETL_MAX_ITERATOR_ITEMS" in api.everything(early)
        late = api.finished(api.run("limits/iterate", {"n": 6}))
        assert late["status"] == "COMPLETED" and late["result"] == [0, 1, 2, 3, 4, 5], late
    finally:
        server.stop()


@pytest.mark.parametrize("name, value", [("NOETL_MAX_VISITS", "lots"), ("NOETL_MAX_ITERATOR_ITEMS", "-5"),
                                         ("NOETL_MAX_VISITS", "1" * 30)])
def test_noetl_server_refuses_a_hostile_setting_at_start(home: Path, name: str, value: str) -> None:
    done = noetl(env_for(home, **{name: value}), "server", "--port", free_port(), timeout=60)
    assert done.returncode == 1 and f"invalid settings: {name}:" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("module, name, value", [("noetl_broker", "NOETL_MAX_ITERATOR_ITEMS", "1e6"),
                                                  ("noetl_frontend", "NOETL_MAX_ITERATOR_ITEMS", "1e6"),
                                                  ("noetl_frontend", "NOETL_MAX_VISITS", "-1"),
                                                  ("noetl_frontend", "NOETL_STEP_MAX_OPEN_FILES", "many")])
def test_the_separate_services_refuse_a_hostile_setting_at_start(home: Path, module: str, name: str,
                                                                 value: str) -> None:
    """The broker (the fold's owner in a cluster) and the API read the same variables; a bad one stops them
    before they connect to anything (nothing listens at the addresses given)."""
    env = env_for(home, **{name: value}, NOETL_KAFKA_BOOTSTRAP="127.0.0.1:9",
                  NOETL_DATABASE_URL="postgresql://nobody@127.0.0.1:9/none")
    done = subprocess.run([PYTHON, "-m", module], env=env, capture_output=True, text=True, timeout=60,
                          cwd=env["HOME"])
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"invalid settings: {name}:" in done.stderr and "Traceback" not in done.stderr, done.stderr


# -------------------------------------------------------------------------------- noetl server --kafka
class KafkaServer(EmbeddedServer):
    """`noetl server --kafka` (the DSN from a 0600 file, as the docs tell operators)."""

    def start(self, timeout: float = 120) -> KafkaServer:
        dsn_file = self.home / "database-url"
        dsn_file.touch(mode=0o600)
        dsn_file.write_text(self.env["NOETL_DATABASE_URL"] + "\n")
        self.env = {k: v for k, v in self.env.items() if k != "NOETL_DATABASE_URL"}
        self.args = ["--kafka", self.env["NOETL_KAFKA_BOOTSTRAP"], "--database-url-file", dsn_file]
        return super().start(timeout)

    def api(self) -> Api:
        return Api(self.url, bearer(self.env["NOETL_API_TOKEN"]))


@pytest.fixture
def kafka_env(kafka_endpoint: Any, pg_dsn: str, home: Path) -> Iterator[dict[str, str]]:
    pytest.importorskip("faust")
    import asyncio

    import asyncpg

    schema = f"limits_{uuid.uuid4().hex[:12]}"
    env = env_for(home, NOETL_KAFKA_BOOTSTRAP=kafka_endpoint.bootstrap, NOETL_DATABASE_URL=pg_dsn,
                  NOETL_DATABASE_SCHEMA=schema, NOETL_TOPIC_PREFIX=f"limits-{uuid.uuid4().hex[:8]}-",
                  NOETL_TOPIC_PARTITIONS="2", NOETL_WORKER_PYTHON_PROCESSES="1",
                  NOETL_API_TOKEN=pg_token(pg_dsn, schema, "admin"))
    if kafka_endpoint.kind == "tansu":   # Tansu answers a group join after half the session timeout
        env["NOETL_KAFKA_SESSION_TIMEOUT_MS"] = "3000"
    try:
        yield env
    finally:
        async def drop() -> None:
            conn = await asyncpg.connect(pg_dsn)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()
        asyncio.run(drop())


@pytest.mark.kafka
@pytest.mark.postgres
def test_noetl_server_kafka_honours_the_caps_in_its_api_and_its_broker(kafka_env: dict[str, str],
                                                                        home: Path) -> None:
    server = KafkaServer(home, {**kafka_env, **CAPS}).start()
    try:
        check_caps_over_http(server.api())
    finally:
        server.stop()


@pytest.mark.kafka
@pytest.mark.postgres
def test_noetl_server_kafka_refuses_a_hostile_setting_at_start(kafka_env: dict[str, str], home: Path) -> None:
    env = {**kafka_env, "NOETL_MAX_VISITS": "0"}
    started = time.monotonic()
    done = subprocess.run([NOETL, "server", "--port", str(free_port()), "--kafka", env["NOETL_KAFKA_BOOTSTRAP"]],
                          env=env, capture_output=True, text=True, timeout=60, cwd=home)
    assert done.returncode == 1 and "invalid settings: NOETL_MAX_VISITS:" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and time.monotonic() - started < 30
