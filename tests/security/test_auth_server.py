"""A real `noetl server` process with authentication on by default (issue 9, scopes 1, 2 and 4):

- first start writes an admin token beside the store (0600), and `noetl run --server` on this machine
  picks it up, so the README's two commands keep working;
- anonymous calls get 401 over real HTTP; tokens made with `noetl token create` while the server runs work
  at once with their role; a revoked token stops working at once;
- the principal is recorded on the events it causes (start, cancel) and on the catalog, and shown by the
  query API; a principal written in a posted body is ignored;
- cross-site POSTs (another Origin, content in the query string, a non-JSON body) are refused;
- NOETL_AUTH=off on a non-loopback address refuses to start.
"""
from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support import NOETL, NoetlServer, bearer, free_port, local_admin_token, until


HELLO = textwrap.dedent("""\
    apiVersion: noetl.io/v1
    kind: Playbook
    metadata: {name: auth_hello, path: tests/auth_hello}
    workload: {name: World}
    workflow:
      - step: start
        next: [{step: end}]
      - step: end
        result: {greeting: "Hello, {{ workload.name }}!"}
    """)
SLOW = textwrap.dedent("""\
    apiVersion: noetl.io/v1
    kind: Playbook
    metadata: {name: auth_slow, path: tests/auth_slow}
    workflow:
      - step: start
        next: [{step: nap}]
      - step: nap
        type: python
        code: |
          import time
          def main():
              time.sleep(30)
              return {}
        next: [{step: end}]
      - step: end
    """)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOETL_", "KAFKA_"))}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


class Server(NoetlServer):
    def __init__(self, store: Path) -> None:
        super().__init__(["--store", store], clean_env(), store.with_suffix(".log"))
        self.store = store

    def cli(self, *args: str | Path, **env: str) -> subprocess.CompletedProcess[str]:
        """`noetl ARGS` on this machine: NOETL_STORE in the server's folder, as ~/.noetl would be."""
        return subprocess.run([NOETL, *map(str, args)], capture_output=True, text=True, timeout=60,
                              env=clean_env(NOETL_STORE=str(self.store), **env), stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("auth") / "noetl.db").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def admin(server: Server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=30, headers=bearer(local_admin_token(server.store))) as c:
        yield c


def token(server: Server, role: str, name: str) -> str:
    made = server.cli("token", "create", "--name", name, "--role", role, "--expires", "1h", "--store", server.store)
    assert made.returncode == 0, made.stderr
    value = made.stdout.strip()
    assert value.startswith("noetl_") and value not in made.stderr   # on stdout alone, once
    return value


# --------------------------------------------------------------------------------------------------- tests
def test_first_start_writes_an_admin_token_0600_that_the_local_cli_uses(server: Server, tmp_path: Path) -> None:
    path = server.store.parent / "admin.token"
    assert path.stat().st_mode & 0o777 == 0o600
    assert "created the admin token" in server.log.read_text()
    assert local_admin_token(server.store) not in server.log.read_text()
    playbook = tmp_path / "hello.yaml"
    playbook.write_text(HELLO)
    done = server.cli("run", playbook, "--server", server.url, "--json", "--payload", '{"name": "Auth"}')
    assert done.returncode == 0, done.stderr
    assert '"Hello, Auth!"' in done.stdout


def test_anonymous_is_401_over_http_and_probes_stay_open(server: Server) -> None:
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/ready").status_code == 200
    for method, path in (("GET", "/metrics"), ("GET", "/api/executions"), ("GET", "/openapi.json"),
                         ("POST", "/api/executions/run"), ("GET", "/api/credentials"), ("GET", "/nowhere")):
        answer = httpx.request(method, server.url + path, json={} if method == "POST" else None)
        assert answer.status_code == 401, (method, path, answer.text)


def test_tokens_made_while_the_server_runs_work_with_their_role_and_revoke_at_once(server: Server,
                                                                                     tmp_path: Path) -> None:
    viewer = token(server, "viewer", "live-viewer")
    assert httpx.get(server.url + "/api/executions", headers=bearer(viewer)).status_code == 200
    assert httpx.get(server.url + "/metrics", headers=bearer(viewer)).status_code == 200
    refused = httpx.post(server.url + "/api/executions/run", json={"path": "tests/auth_hello"}, headers=bearer(viewer))
    assert refused.status_code == 403 and "operator" in refused.json()["detail"]
    listed = server.cli("token", "list", "--store", server.store)
    assert "live-viewer\tviewer" in listed.stdout and viewer not in listed.stdout
    assert server.cli("token", "revoke", "live-viewer", "--store", server.store).returncode == 0
    assert httpx.get(server.url + "/api/executions", headers=bearer(viewer)).status_code == 401
    # the CLI with a revoked NOETL_API_TOKEN (it wins over admin.token): a clear error naming the way out
    playbook = tmp_path / "hello.yaml"
    playbook.write_text(HELLO)
    done = server.cli("run", playbook, "--server", server.url, NOETL_API_TOKEN=viewer)
    assert done.returncode == 2 and "HTTP 401" in done.stderr and "NOETL_API_TOKEN" in done.stderr
    assert viewer not in done.stderr


def test_the_principal_is_recorded_and_shown(server: Server, admin: httpx.Client) -> None:
    author = token(server, "author", "p-author")
    operator = token(server, "operator", "p-operator")
    registered = httpx.post(server.url + "/api/catalog/register", json={"content": SLOW}, headers=bearer(author))
    assert registered.status_code == 200, registered.text
    entry = next(e for e in admin.get("/api/catalog/list").json()["entries"] if e["path"] == "tests/auth_slow")
    assert entry["registered_by"] == "token:p-author"
    started = httpx.post(server.url + "/api/executions/run", json={"path": "tests/auth_slow"}, headers=bearer(operator))
    assert started.status_code == 200, started.text
    eid = started.json()["execution_id"]
    until(lambda: admin.get(f"/api/executions/{eid}").status_code == 200)
    cancel = admin.post("/api/events", json={"kind": "cancel", "execution_id": eid, "reason": "test",
                                             "principal": "token:someone-else"})
    assert cancel.status_code == 202, cancel.text
    detail = until(lambda: (d := admin.get(f"/api/executions/{eid}").json())["status"] == "CANCELLED" and d)
    events = {e["event_type"]: e for e in detail["events"]}
    assert events["execution_start"]["meta"]["principal"] == "token:p-operator"
    assert events["execution_cancelled"]["meta"]["principal"] == "token:local-admin"   # not what the body said
    assert detail["started_by"] == "token:p-operator"


def test_cross_site_requests_are_refused(server: Server, admin: httpx.Client) -> None:
    evil = admin.post("/api/catalog/register", json={"content": HELLO}, headers={"Origin": "https://evil.example"})
    assert evil.status_code == 403 and "cross-site" in evil.json()["detail"]
    null = admin.post("/api/catalog/register", json={"content": HELLO}, headers={"Origin": "null"})
    assert null.status_code == 403
    same = admin.post("/api/catalog/register", json={"content": HELLO}, headers={"Origin": server.url})
    assert same.status_code == 200, same.text
    # the old NoETL form: the playbook in the query string, no body
    query = admin.post("/api/catalog/register", params={"content": HELLO})
    assert query.status_code == 400 and "query string" in query.json()["detail"]
    # what an HTML form can send cross-site without a preflight: not JSON
    for kind, body in (("text/plain", '{"content": "x"}'), ("application/x-www-form-urlencoded", "content=x"),
                       ("multipart/form-data; boundary=x", "--x--")):
        answer = admin.post("/api/catalog/register", content=body, headers={"Content-Type": kind})
        assert answer.status_code == 415, (kind, answer.text)
    cancel = admin.post("/api/executions/x/cancel", headers={"Origin": "http://127.0.0.1:1"})
    assert cancel.status_code == 403
    # CORS is closed: no Access-Control-Allow-Origin for anyone
    read = admin.get("/api/executions", headers={"Origin": "https://evil.example"})
    assert read.status_code == 200 and "access-control-allow-origin" not in read.headers
    preflight = httpx.options(server.url + "/api/catalog/register",
                              headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


def test_auth_off_beyond_loopback_refuses_to_start(tmp_path: Path) -> None:
    started = time.monotonic()
    done = subprocess.run([NOETL, "server", "--host", "0.0.0.0", "--port", str(free_port()), "--store",
                           str(tmp_path / "x.db")], env=clean_env(NOETL_AUTH="off"), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and "NOETL_AUTH=off is allowed only on a loopback address" in done.stderr
    assert time.monotonic() - started < 30 and not (tmp_path / "admin.token").exists()


def test_auth_off_on_loopback_serves_anonymous_callers(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen([NOETL, "server", "--port", str(port), "--store", str(tmp_path / "x.db")],
                            env=clean_env(NOETL_AUTH="off"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        def ready() -> bool:
            assert proc.poll() is None
            try:
                return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
        until(ready, 30)
        assert httpx.get(f"http://127.0.0.1:{port}/api/credentials").status_code == 200
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
