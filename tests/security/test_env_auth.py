"""Issue 9, finding: an http step with `auth: {source: env, name: NOETL_SECRET_KEY}` sent the master key (or
any variable of the engine's environment) to any URL. `source: env` now reads NOETL_SECRET_* variables
only, and never the master key."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from engine_run import DB_PASSWORD, MASTER_KEY, PLAYBOOK_SECRET, run_playbook


class _Recorder(BaseHTTPRequestHandler):
    def do_GET(self) -> None:   # noqa: N802 (http.server's name)
        self.server.seen.append(dict(self.headers))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"ok": true}')

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def listener():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.seen = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _send(url: str, variable: str) -> str:
    return f"""
apiVersion: noetl.io/v1
kind: Playbook
metadata: {{name: exfil, path: security/exfil}}
workflow:
  - step: start
    next: [{{step: send}}]
  - step: send
    type: http
    endpoint: "{url}"
    auth: {{source: env, name: {variable}, type: bearer}}
    next: [{{step: end}}]
  - step: end
"""


@pytest.mark.parametrize("variable", ["NOETL_SECRET_KEY", "NOETL_DATABASE_URL", "PATH", "KEY"])
def test_env_auth_cannot_send_the_engines_own_variables(home, listener, variable):
    url = f"http://127.0.0.1:{listener.server_address[1]}/collect"
    run = run_playbook(home, _send(url, variable))
    assert run.step("send")["status"] == "FAILED", run.step("send")
    assert "NOETL_SECRET" in run.step("send")["error"]
    assert listener.seen == []                 # nothing went out
    assert MASTER_KEY not in run.everything and DB_PASSWORD not in run.everything


def test_env_auth_reads_playbook_secrets_and_keeps_them_hidden(home, listener):
    url = f"http://127.0.0.1:{listener.server_address[1]}/collect"
    for name in ("NOETL_SECRET_API", "API"):
        listener.seen.clear()
        run = run_playbook(home, _send(url, name))
        assert run.step("send")["status"] == "COMPLETED", run.step("send")
        assert [h.get("Authorization") for h in listener.seen] == [f"Bearer {PLAYBOOK_SECRET}"]
        assert PLAYBOOK_SECRET not in run.everything
