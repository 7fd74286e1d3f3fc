"""`noetl run FILE --server URL`: the command contract (shared/conformance/README.md) against a real
`noetl server` subprocess. The reports are compared with embedded `noetl run` on the same playbooks, and a
server killed mid-step (SIGKILL of its process group) and restarted finishes the execution it was running.
"""
from __future__ import annotations

import json
import signal
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from support import bearer, local_admin_token, printed_traceback
from test_http_api import HELLO, NOETL, SLOW, Server, server_env, until

TOKEN = "tok-Remote-7Hq2-never-printed"
FAILING = textwrap.dedent("""\
    apiVersion: noetl.io/v1
    kind: Playbook
    metadata: {name: remote_fail, path: tests/remote_fail}
    workflow:
      - step: start
        next: [{step: boom}]
      - step: boom
        type: python
        code: |
          def main():
              raise ValueError("kaput")
        next: [{step: end}]
      - step: end
    """)
SECRETIVE = textwrap.dedent("""\
    apiVersion: noetl.io/v1
    kind: Playbook
    metadata: {name: remote_secret, path: tests/remote_secret}
    workflow:
      - step: start
        next: [{step: check}]
      - step: check
        type: python
        data: {token: "{{ secret.MY_TOKEN }}"}
        code: |
          def main(token):
              return {"match": token == "%s", "length": len(token)}
        next: [{step: end}]
      - step: end
        result: {match: "{{ check.match }}"}
    """ % TOKEN)
PARENT = textwrap.dedent("""\
    apiVersion: noetl.io/v1
    kind: Playbook
    metadata: {name: remote_parent, path: tests/remote_parent}
    workflow:
      - step: start
        next: [{step: call}]
      - step: call
        type: playbook
        path: tests/remote_child
        data: {x: 6}
        next: [{step: end}]
      - step: end
        result: {child: "{{ call }}"}
    """)
CHILD = textwrap.dedent("""\
    apiVersion: noetl.io/v1
    kind: Playbook
    metadata: {name: remote_child, path: tests/remote_child}
    workload: {x: 1}
    workflow:
      - step: start
        next: [{step: double}]
      - step: double
        type: python
        data: {x: "{{ workload.x }}"}
        code: |
          def main(x):
              return {"twice": 2 * x}
        next: [{step: end}]
      - step: end
        result: {twice: "{{ double.twice }}"}
    """)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = Server(tmp_path_factory.mktemp("remote") / "noetl.db").start()
    yield srv
    srv.kill(signal.SIGTERM)
    assert TOKEN not in srv.logs()


def noetl(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 60
          ) -> tuple[int, dict[str, Any] | None, subprocess.CompletedProcess[str]]:
    proc = subprocess.run([str(NOETL), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**server_env(), **_store_of(args), **(env or {})}, stdin=subprocess.DEVNULL)
    assert not printed_traceback(proc.stderr + proc.stdout), proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    report = json.loads(lines[0]) if "--json" in args and len(lines) == 1 else None
    return proc.returncode, report, proc


def _store_of(args: tuple[str | Path, ...]) -> dict[str, str]:
    """NOETL_STORE of the server a `--server URL` names: the command finds the server's admin.token beside
    it, as on a developer's machine (the default store's folder)."""
    if "--server" not in args:
        return {}
    store = Server.stores.get(str(args[args.index("--server") + 1]))
    return {"NOETL_STORE": str(store)} if store is not None else {}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def both(tmp_path: Path, server: Server, file: Path, *args: str) -> tuple[tuple[int, dict], tuple[int, dict]]:
    """The same command embedded (own store) and against the server."""
    code_e, embedded, _ = noetl("run", file, "--json", "--store", tmp_path / "embedded.db", *args)
    code_r, remote, proc = noetl("run", file, "--json", "--server", server.url, *args)
    assert remote is not None, proc.stdout + proc.stderr
    return (code_e, embedded), (code_r, remote)


def strip_ids(events: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(e["event_type"], e["node_name"], e["status"]) for e in events]


def test_hello_world_reports_like_embedded(tmp_path: Path, server: Server) -> None:
    (code_e, embedded), (code_r, remote) = both(tmp_path, server, write(tmp_path, "hello.yaml", HELLO),
                                                "--payload", '{"name": "Remote"}')
    assert code_e == code_r == 0
    assert list(remote) == list(embedded) == ["execution_id", "status", "result", "error", "steps", "events",
                                              "duration_ms"]
    assert remote["status"] == "COMPLETED" and remote["result"] == {"greeting": "Hello, Remote!"}
    assert remote["result"] == embedded["result"] and remote["steps"] == embedded["steps"]
    assert strip_ids(remote["events"]) == strip_ids(embedded["events"])
    assert set(remote["events"][0]) == set(embedded["events"][0])
    # the API holds the same execution
    detail = httpx.get(f"{server.url}/api/executions/{remote['execution_id']}", headers=server.auth).json()
    assert detail["events"] == remote["events"]


def test_human_output(tmp_path: Path, server: Server) -> None:
    code, _, proc = noetl("run", write(tmp_path, "hello.yaml", HELLO), "--server", server.url)
    assert code == 0 and "COMPLETED" in proc.stdout and "Hello, World!" in proc.stdout
    assert "✓ greet" in proc.stdout                       # the live view, from the polled events


def test_invalid_playbook_reports_every_error(tmp_path: Path, server: Server) -> None:
    from test_http_api import INVALID
    (code_e, embedded), (code_r, remote) = both(tmp_path, server, write(tmp_path, "bad.yaml", INVALID))
    assert code_e == code_r == 2
    assert remote["status"] == "INVALID" and remote["errors"] == embedded["errors"] and len(remote["errors"]) == 2


def test_failure_and_timeout(tmp_path: Path, server: Server) -> None:
    (code_e, embedded), (code_r, remote) = both(tmp_path, server, write(tmp_path, "fail.yaml", FAILING))
    assert code_e == code_r == 1
    assert remote["status"] == "FAILED" and remote["error"] == embedded["error"] and "kaput" in remote["error"]
    assert remote["steps"]["boom"]["status"] == "FAILED"

    started = time.monotonic()
    code, report, _ = noetl("run", write(tmp_path, "slow.yaml", SLOW), "--json", "--server", server.url,
                            "--timeout", "1", "--payload", '{"seconds": 30}')
    assert code == 1 and report is not None
    assert report["status"] == "CANCELLED" and report["error"] == "timed out after 1s (--timeout)"
    assert report["steps"]["nap"]["status"] == "CANCELLED"
    assert time.monotonic() - started < 15


def test_secrets_and_credentials_are_uploaded_never_printed(tmp_path: Path, server: Server) -> None:
    creds = write(tmp_path, "creds.json", json.dumps({"remote_bearer": {"type": "bearer", "data": {"token": TOKEN}}}))
    code, report, proc = noetl("run", write(tmp_path, "secret.yaml", SECRETIVE), "--json", "--server", server.url,
                               "--credentials", creds,
                               env={"NOETL_SECRET_MY_TOKEN": TOKEN,
                                    "NOETL_SECRET_KEY": "q6cR6mHqJ1aX0m0e3bN0o2yZ3bJ4c5d6e7f8g9h0i1U="})
    assert code == 0, proc.stderr
    assert report is not None and report["result"] == {"match": True}
    assert report["steps"]["check"]["result"]["length"] == len(TOKEN)
    assert TOKEN not in proc.stdout + proc.stderr
    stored = {c["name"]: c for c in httpx.get(f"{server.url}/api/credentials", headers=server.auth).json()["items"]}
    assert stored["MY_TOKEN"]["type"] == "secret" and stored["remote_bearer"]["type"] == "bearer"
    assert "KEY" not in stored                               # the local store key is not a playbook secret
    detail = httpx.get(f"{server.url}/api/executions/{report['execution_id']}", headers=server.auth)
    assert TOKEN not in detail.text


def test_catalog_folder_registers_children(tmp_path: Path, server: Server) -> None:
    folder = tmp_path / "cat"
    folder.mkdir()
    write(folder, "child.yaml", CHILD)
    write(folder, "case.yaml", "description: not a playbook\n")
    write(folder, "broken.yaml", HELLO.replace("api_hello", "remote_broken").replace("type: python", "type: nope"))
    parent = write(folder, "parent.yaml", PARENT)
    code, report, proc = noetl("run", parent, "--json", "--server", server.url, "--catalog", folder)
    assert code == 0, proc.stdout + proc.stderr
    assert report is not None and report["result"] == {"child": {"twice": 12}}
    assert "skipped invalid playbook tests/remote_broken" in proc.stderr


def test_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    code, _, proc = noetl("run", write(tmp_path, "hello.yaml", HELLO), "--json", "--server", "http://127.0.0.1:9")
    assert code == 2 and "cannot reach the server" in proc.stderr and proc.stdout == ""


def test_server_killed_mid_step_resumes_after_restart(tmp_path: Path) -> None:
    """SIGKILL of the server's whole process group while a 2 s step runs; a new server on the same store
    and port resumes the execution; the client, polling through the outage, reports it COMPLETED."""
    srv = Server(tmp_path / "restart.db").start()
    client = None
    try:
        slow = write(tmp_path, "slow.yaml", SLOW)
        client = subprocess.Popen([str(NOETL), "run", str(slow), "--json", "--server", srv.url, "--payload",
                                   '{"seconds": 2}'], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**server_env(), "NOETL_STORE": str(srv.store)})
        api = httpx.Client(base_url=srv.url, timeout=5, headers=bearer(local_admin_token(srv.store)))

        def running() -> str | None:
            rows = api.get("/api/executions", params={"path": "tests/api_slow"}).json()
            return rows[0]["id"] if rows and rows[0]["status"] == "RUNNING" else None
        execution_id = until(running, 20, "the slow step to start")
        until(lambda: "nap" in api.get(f"/api/executions/{execution_id}").json()["steps"], 10, "nap")
        api.close()
        srv.kill(signal.SIGKILL)
        srv.start()
        restarted = time.time()
        out, err = client.communicate(timeout=40)
        assert client.returncode == 0, out + err
        report = json.loads(out)
        assert report["execution_id"] == execution_id and report["status"] == "COMPLETED"
        assert report["result"] == {"slept": 2} and report["steps"]["nap"]["status"] == "COMPLETED"
        assert [e["event_type"] for e in report["events"]].count("execution_start") == 1
        done = next(e for e in report["events"] if e["event_type"] == "action_completed" and e["node_name"] == "nap")
        assert done["time"] > restarted + 1.0          # the step ran (again, whole) on the new server
        assert [e["seq"] for e in report["events"]] == list(range(len(report["events"])))
    finally:
        if client is not None and client.poll() is None:
            client.kill()
        srv.kill(signal.SIGTERM)
