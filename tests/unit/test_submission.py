"""What the front door of `noetl server` (embedded) admits, against a real server subprocess:

- idempotent submission: an Idempotency-Key (or a client-chosen execution_id) repeated gives the same
  execution, also across a restart (SIGTERM and SIGKILL); the key reused with another body is a 409; a
  client id naming an existing execution is a 409; hostile keys and ids are refused and nothing else is hurt;
- `noetl run --server` retries a start whose answer was lost (a proxy drops the connection after the
  server took the request) and the server holds one execution; it waits out a 429;
- back-pressure: above --max-in-flight, 429 with Retry-After; a retry of an accepted key still answers 200;
- honest process state: when a loop of the runtime dies, /health is 503, a run is refused with 503, and the
  process exits 1 within seconds.
"""
from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from support import bearer, free_port, local_admin_token
from test_http_api import HELLO, NOETL, ROOT, SLOW, Server, register, server_env, until

RUN = "/api/executions/run"


class BoundedServer(Server):
    """`noetl server` with extra options (--max-in-flight)."""

    def __init__(self, store: Path, *options: str) -> None:
        super().__init__(store)
        self.options = options

    def start(self, timeout: float = 30) -> "BoundedServer":
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen([str(NOETL), "server", "--port", str(self.port), "--store", str(self.store),
                                           *self.options], stdout=log, stderr=log, env=server_env(),
                                          start_new_session=True)
        until(lambda: _ready(self), timeout, "the server to be ready")
        return self


def _ready(server: Server) -> bool:
    assert server.popen is not None and server.popen.poll() is None, server.logs()
    try:
        return httpx.get(server.url + "/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = Server(tmp_path_factory.mktemp("submission") / "noetl.db").start()
    with httpx.Client(base_url=srv.url, timeout=30, headers=srv.auth) as api:
        register(api, HELLO)
        register(api, SLOW)
    yield srv
    srv.kill(signal.SIGTERM)


@pytest.fixture
def api(server: Server):
    with httpx.Client(base_url=server.url, timeout=30, headers=server.auth) as client:
        yield client


def executions_of(api: httpx.Client, path: str) -> list[str]:
    return [row["id"] for row in api.get("/api/executions", params={"path": path, "limit": 500}).json()]


def finished(api: httpx.Client, execution_id: str) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        r = api.get(f"/api/executions/{execution_id}")
        return r.json() if r.status_code == 200 and r.json()["status"] in ("COMPLETED", "FAILED") else None
    return until(done, 30, f"execution {execution_id} to finish")


# ----------------------------------------------------------------------------------------- idempotency
def test_same_key_twice_is_one_execution(api: httpx.Client) -> None:
    key = f"retry-{uuid.uuid4()}"
    body = {"path": "tests/api_hello", "parameters": {"name": "Once"}}
    before = set(executions_of(api, "tests/api_hello"))
    first = api.post(RUN, json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 200, first.text
    eid = first.json()["execution_id"]
    assert finished(api, eid)["status"] == "COMPLETED"
    # the same request again, with the keys in another order: the first answer, word for word
    again = api.post(RUN, json={"parameters": {"name": "Once"}, "path": "tests/api_hello"},
                     headers={"Idempotency-Key": key})
    assert again.status_code == 200 and again.json() == first.json()
    time.sleep(0.3)   # a second execution, had one been started, would show by now
    assert set(executions_of(api, "tests/api_hello")) - before == {eid}
    events = api.get(f"/api/executions/{eid}").json()["events"]
    assert [e["event_type"] for e in events].count("execution_start") == 1


def test_concurrent_requests_with_one_key_are_one_execution(api: httpx.Client, server: Server) -> None:
    key = f"race-{uuid.uuid4()}"
    before = set(executions_of(api, "tests/api_hello"))
    answers: list[httpx.Response] = []

    def post() -> None:
        with httpx.Client(base_url=server.url, timeout=30, headers=server.auth) as own:
            answers.append(own.post(RUN, json={"path": "tests/api_hello"}, headers={"Idempotency-Key": key}))
    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {a.status_code for a in answers} == {200}
    ids = {a.json()["execution_id"] for a in answers}
    assert len(ids) == 1
    finished(api, ids.pop())
    assert len(set(executions_of(api, "tests/api_hello")) - before) == 1


def test_key_reused_with_another_body_is_409(api: httpx.Client) -> None:
    key = f"reuse-{uuid.uuid4()}"
    first = api.post(RUN, json={"path": "tests/api_hello", "parameters": {"name": "A"}},
                     headers={"Idempotency-Key": key})
    assert first.status_code == 200
    other = api.post(RUN, json={"path": "tests/api_hello", "parameters": {"name": "B"}},
                     headers={"Idempotency-Key": key})
    assert other.status_code == 409 and first.json()["execution_id"] in other.json()["detail"]
    finished(api, first.json()["execution_id"])


@pytest.mark.parametrize("key", ["x" * 256, "has space", "tab\there", "ключ", "emoji-\U0001f600", "\x7f"])
def test_hostile_keys_are_refused(api: httpx.Client, key: str) -> None:
    before = len(executions_of(api, "tests/api_hello"))
    response = api.post(RUN, json={"path": "tests/api_hello"}, headers={"Idempotency-Key": key.encode("utf-8")})
    assert response.status_code == 400 and "Idempotency-Key" in response.json()["detail"]
    assert len(executions_of(api, "tests/api_hello")) == before


def test_huge_and_nul_keys_never_reach_a_handler(server: Server, api: httpx.Client) -> None:
    """Beyond what the handler sees: a 100 kB header and a NUL byte are refused by the HTTP layer; the
    server goes on."""
    for value in (b"k" * 100_000, b"a\x00b"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            body = b'{"path": "tests/api_hello"}'
            raw.sendall(b"POST " + RUN.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        + "".join(f"{k}: {v}\r\n" for k, v in server.auth.items()).encode()
                        + b"Idempotency-Key: " + value + b"\r\nContent-Length: " + str(len(body)).encode()
                        + b"\r\nConnection: close\r\n\r\n" + body)
            reply = raw.recv(200)
        assert reply.startswith(b"HTTP/1.1 4"), reply
    assert api.post(RUN, json={"path": "tests/api_hello"}).status_code == 200


def test_client_chosen_execution_id(api: httpx.Client) -> None:
    eid = f"client-{uuid.uuid4().hex}"
    first = api.post(RUN, json={"path": "tests/api_hello", "execution_id": eid})
    assert first.status_code == 200 and first.json()["execution_id"] == eid
    assert finished(api, eid)["status"] == "COMPLETED"
    # the same request: a retry, the same execution
    assert api.post(RUN, json={"path": "tests/api_hello", "execution_id": eid}).json() == first.json()
    # the same id for another request: a collision, not a merge
    clash = api.post(RUN, json={"path": "tests/api_hello", "execution_id": eid, "parameters": {"name": "X"}})
    assert clash.status_code == 409
    # the same id under an Idempotency-Key: it names an execution already
    keyed = api.post(RUN, json={"path": "tests/api_hello", "execution_id": eid},
                     headers={"Idempotency-Key": f"k-{uuid.uuid4()}"})
    assert keyed.status_code == 409
    events = api.get(f"/api/executions/{eid}").json()["events"]
    assert [e["event_type"] for e in events].count("execution_start") == 1


def test_client_id_of_an_execution_started_without_one_is_409(api: httpx.Client) -> None:
    other = api.post(RUN, json={"path": "tests/api_hello"}).json()["execution_id"]
    finished(api, other)
    response = api.post(RUN, json={"path": "tests/api_hello", "execution_id": other})
    assert response.status_code == 409 and other in response.json()["detail"]


@pytest.mark.parametrize("eid", ["", "x" * 65, "ключ", "a\x00b", "../etc", "a:b", "a b", "-leading", "a/b"])
def test_hostile_execution_ids_are_422(api: httpx.Client, eid: str) -> None:
    response = api.post(RUN, json={"path": "tests/api_hello", "execution_id": eid})
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["body", "execution_id"]


def test_same_key_across_restarts(tmp_path: Path) -> None:
    """SIGTERM, then SIGKILL of the whole process group: the key still names the first execution."""
    srv = Server(tmp_path / "restart.db").start()
    try:
        with httpx.Client(base_url=srv.url, timeout=30, headers=srv.auth) as api:
            register(api, HELLO)
            key = "across-restarts"
            eid = api.post(RUN, json={"path": "tests/api_hello"}, headers={"Idempotency-Key": key}).json()["id"]
            finished(api, eid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            srv.kill(sig)
            srv.start()
            with httpx.Client(base_url=srv.url, timeout=30, headers=srv.auth) as api:
                again = api.post(RUN, json={"path": "tests/api_hello"}, headers={"Idempotency-Key": key})
                assert again.status_code == 200 and again.json()["execution_id"] == eid
                time.sleep(0.3)
                assert executions_of(api, "tests/api_hello") == [eid]
                events = api.get(f"/api/executions/{eid}").json()["events"]
                assert [e["event_type"] for e in events].count("execution_start") == 1
    finally:
        srv.kill(signal.SIGTERM)


# ----------------------------------------------------------------------------------------- noetl run --server
class DropFirstRunAnswer:
    """A TCP proxy to `upstream` that forwards the first POST /api/executions/run whole, and when the
    server's answer comes back, closes the client's connection instead of forwarding it: the client sees the
    request fail although the server took it (a timeout after the fact)."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.dropped = 0
        self._armed: set[int] = set()   # connections whose next answer is the first run's
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._up, args=(client, server), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket) -> None:
        try:
            while chunk := client.recv(65536):
                if b"POST " + RUN.encode() in chunk:
                    with self._lock:
                        if self.dropped == 0 and not self._armed:
                            self._armed.add(id(server))
                server.sendall(chunk)
        except OSError:
            pass

    def _down(self, server: socket.socket, client: socket.socket) -> None:
        try:
            while chunk := server.recv(65536):
                with self._lock:
                    drop = id(server) in self._armed
                    if drop:
                        self._armed.discard(id(server))
                        self.dropped += 1
                if drop:
                    break                       # the answer to the run: nobody forwards it
                client.sendall(chunk)
        except OSError:
            pass
        for s in (client, server):
            try:
                s.shutdown(socket.SHUT_RDWR)   # close() alone waits for the other thread's recv to return
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()


def test_run_server_retries_a_lost_answer_with_the_same_key(tmp_path: Path, server: Server,
                                                            api: httpx.Client) -> None:
    proxy = DropFirstRunAnswer(server.port)
    try:
        playbook = tmp_path / "hello.yaml"
        playbook.write_text(HELLO.replace("tests/api_hello", "tests/api_hello_retry"))
        proc = subprocess.run([str(NOETL), "run", str(playbook), "--json", "--server",
                               f"http://127.0.0.1:{proxy.port}"], capture_output=True, text=True, timeout=120,
                              env={**server_env(), "NOETL_API_TOKEN": local_admin_token(server.store)})
    finally:
        proxy.close()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proxy.dropped == 1 and "retrying the start" in proc.stderr
    report = json.loads(proc.stdout)
    assert report["status"] == "COMPLETED"
    assert executions_of(api, "tests/api_hello_retry") == [report["execution_id"]]


# ----------------------------------------------------------------------------------------- back-pressure
def test_above_the_bound_429_with_retry_after(tmp_path: Path) -> None:
    srv = BoundedServer(tmp_path / "bounded.db", "--max-in-flight", "2").start()
    try:
        with httpx.Client(base_url=srv.url, timeout=30, headers=srv.auth) as api:
            register(api, SLOW)
            register(api, HELLO)
            key = "bounded-first"
            first = api.post(RUN, json={"path": "tests/api_slow", "parameters": {"seconds": 8}},
                             headers={"Idempotency-Key": key})
            second = api.post(RUN, json={"path": "tests/api_slow", "parameters": {"seconds": 8}})
            assert first.status_code == 200 and second.status_code == 200
            third = api.post(RUN, json={"path": "tests/api_hello"})
            assert third.status_code == 429, third.text
            assert int(third.headers["Retry-After"]) >= 1 and "bound is 2" in third.json()["detail"]
            # a retry of an accepted start is not a new execution: it is answered, bound or not
            retry = api.post(RUN, json={"path": "tests/api_slow", "parameters": {"seconds": 8}},
                             headers={"Idempotency-Key": key})
            assert retry.status_code == 200 and retry.json() == first.json()
            assert executions_of(api, "tests/api_hello") == []
            # once they are done, the door opens again; `noetl run --server` waits for that by itself
            playbook = tmp_path / "hello.yaml"
            playbook.write_text(HELLO)
            proc = subprocess.run([str(NOETL), "run", str(playbook), "--json", "--server", srv.url],
                                  capture_output=True, text=True, timeout=120,
                                  env={**server_env(), "NOETL_STORE": str(srv.store)})   # its admin.token
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert "HTTP 429" in proc.stderr and json.loads(proc.stdout)["status"] == "COMPLETED"
            for eid in (first.json()["id"], second.json()["id"]):
                assert finished(api, eid)["status"] == "COMPLETED"
    finally:
        srv.kill(signal.SIGTERM)


# ----------------------------------------------------------------------------------------- a dead runtime
FRAGILE = textwrap.dedent("""\
    import sys
    from pathlib import Path
    from noetl_cli import server
    from noetl_embedded.runtime import EmbeddedRuntime

    class Fragile(EmbeddedRuntime):
        async def _worker_loop(self):   # dies on the first command, as a loop with a bug would
            await self.bus.take(self.topics.commands("default"), 1)
            raise RuntimeError("injected: the worker loop died")

    server.EmbeddedRuntime = Fragile
    sys.exit(server.serve("127.0.0.1", int(sys.argv[1]), Path(sys.argv[2])))
    """)


def test_a_dead_runtime_is_not_healthy_refuses_runs_and_exits_1(tmp_path: Path) -> None:
    port = free_port()
    script = tmp_path / "fragile.py"
    script.write_text(FRAGILE)
    log = tmp_path / "fragile.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(script), str(port), str(tmp_path / "f.db")], stdout=out,
                                stderr=out, env=server_env(), cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        until(lambda: _up(url), 30, "the fragile server")
        with httpx.Client(base_url=url, timeout=10, headers=bearer(local_admin_token(tmp_path / "f.db"))) as api:
            assert api.get("/health").status_code == 200
            register(api, HELLO)
            assert api.post(RUN, json={"path": "tests/api_hello"}).status_code == 200   # its command kills it
            died = time.monotonic()
            code = proc.wait(timeout=15)
        assert code == 1, log.read_text()
        assert time.monotonic() - died < 5
        assert "the runtime died" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_dead_runtime_answers_503_on_health_and_run(tmp_path: Path) -> None:
    """In process (the app and the runtime of `noetl server`, through Starlette's TestClient): after the
    worker loop dies and before the process stops, /health and /ready are 503 and a run is refused."""
    from fastapi.testclient import TestClient


    from noetl_cli.server import build_app
    from noetl_embedded.runtime import EmbeddedRuntime
    from noetl_runtime.auth import Authenticator
    from noetl_runtime.sqlite_store import SqliteStore
    from noetl_runtime.tokens import SqliteTokens

    class Fragile(EmbeddedRuntime):
        async def _worker_loop(self) -> None:
            await self.bus.take(self.topics.commands("default"), 1)
            raise RuntimeError("injected: the worker loop died")


    store = SqliteStore(tmp_path / "inproc.db")
    runtime = Fragile(store)
    tokens = SqliteTokens(store)
    admin, _ = asyncio.run(tokens.create("admin", "admin", None))
    try:
        with TestClient(build_app(store, runtime, auth=Authenticator(tokens)),
                        headers={"Authorization": f"Bearer {admin}"}) as api:
            assert api.get("/health").status_code == 200
            assert api.post("/api/catalog/register", json={"content": HELLO}).status_code == 200
            assert api.post(RUN, json={"path": "tests/api_hello"}).status_code == 200
            until(lambda: runtime.crashed is not None, 10, "the loop to die")
            health = api.get("/health")
            assert health.status_code == 503 and "injected" in health.json()["reason"]
            assert api.get("/ready").status_code == 503
            refused = api.post(RUN, json={"path": "tests/api_hello"})
            assert refused.status_code == 503 and "nothing was accepted" in refused.json()["detail"]
            assert api.post(RUN, json={"path": "tests/api_hello", "parameters": {"name": "Again"}},
                            headers={"Idempotency-Key": "while-dead"}).status_code == 503
        # restarted on the same store (what the supervisor does): the retry of the refused start runs it
        with TestClient(build_app(store, EmbeddedRuntime(store), auth=Authenticator(tokens)),
                        headers={"Authorization": f"Bearer {admin}"}) as api:
            retry = api.post(RUN, json={"path": "tests/api_hello", "parameters": {"name": "Again"}},
                             headers={"Idempotency-Key": "while-dead"})
            assert retry.status_code == 200, retry.text
            eid = retry.json()["execution_id"]

            def done() -> dict[str, Any] | None:
                r = api.get(f"/api/executions/{eid}")
                return r.json() if r.status_code == 200 and r.json()["status"] == "COMPLETED" else None
            assert until(done, 20, "the retried start to complete")["result"] == {"greeting": "Hello, Again!"}
            again = api.post(RUN, json={"path": "tests/api_hello", "parameters": {"name": "Again"}},
                             headers={"Idempotency-Key": "while-dead"})
            assert again.json() == retry.json()
            events = api.get(f"/api/executions/{eid}").json()["events"]
            assert [e["event_type"] for e in events].count("execution_start") == 1
    finally:
        store.close()
