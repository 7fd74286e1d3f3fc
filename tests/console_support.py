"""The browser tests' helpers: a real server process (`noetl server`, or `noetl server --kafka`), the
playbooks they run, and Chromium from the distribution (`apt-get install chromium`) driven by Playwright.

`browser()` skips when Chromium or Playwright is missing, unless NOETL_REQUIRE_BROWSER=1 (CI sets it after
installing both), where a missing browser is a failure.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from support import bearer

NOETL = str(Path(sys.executable).parent / "noetl")
CHROMIUM = os.environ.get("NOETL_CHROMIUM", "/usr/bin/chromium")
READY_TIMEOUT = 90.0
ROOT = Path(__file__).resolve().parents[1]

# A playbook whose name, step names and path carry markup: the console must show it as text.
HOSTILE_NAME = "<script>window.__pwned = 1</script>"
HOSTILE_STEP = "<img src=x onerror=\"window.__pwned=2\">"

PLAYBOOKS = {
    "console/slow_ok": """
apiVersion: noetl.io/v1
kind: Playbook
metadata: {name: slow_ok, path: console/slow_ok}
workload: {pause: 1.5}
workflow:
  - step: start
    next: [{step: first, when: "{{ workload.pause > 0 }}"}]
  - step: first
    type: python
    data: {pause: "{{ workload.pause }}", password: "hunter2-not-shown"}
    code: |
      import time
      def main(pause, password):
          time.sleep(pause)
          return {"slept": pause}
    next: [{step: second}]
  - step: second
    type: python
    data: {n: "{{ first.slept }}"}
    code: |
      def main(n):
          return {"double": n * 2}
    next: [{step: end}]
  - step: end
""",
    "console/fails": """
apiVersion: noetl.io/v1
kind: Playbook
metadata: {name: fails, path: console/fails}
workflow:
  - step: start
    next: [{step: talk}]
  - step: talk
    type: python
    code: |
      def main():
          print("hello-from-talk")
          return {"said": "hello"}
    next: [{step: explode}]
  - step: explode
    type: python
    code: |
      def main():
          print("about-to-explode")
          raise ValueError("boom-xyz")
    next: [{step: end}]
  - step: end
""",
    "console/sleeper": """
apiVersion: noetl.io/v1
kind: Playbook
metadata: {name: sleeper, path: console/sleeper}
workflow:
  - step: start
    next: [{step: nap}]
  - step: nap
    type: python
    code: |
      import time
      def main():
          time.sleep(60)
          return {}
    next: [{step: end}]
  - step: end
""",
    "console/retrying": """
apiVersion: noetl.io/v1
kind: Playbook
metadata: {name: retrying, path: console/retrying}
workflow:
  - step: start
    next: [{step: flaky}]
  - step: flaky
    type: python
    retry: {max_attempts: 3, initial_delay: 120}
    code: |
      def main():
          raise RuntimeError("not yet")
    next: [{step: end}]
  - step: end
""",
    "console/hostile": f"""
apiVersion: noetl.io/v1
kind: Playbook
metadata: {{name: {json.dumps(HOSTILE_NAME)}, path: console/hostile, description: {json.dumps(HOSTILE_NAME)}}}
workload: {{note: {json.dumps(HOSTILE_NAME)}}}
workflow:
  - step: start
    next: [{{step: {json.dumps(HOSTILE_STEP)}}}]
  - step: {json.dumps(HOSTILE_STEP)}
    type: python
    code: |
      def main():
          return {{"html": "<script>window.__pwned = 3</script>"}}
    next: [{{step: end}}]
  - step: end
""",
}
EXAMPLES = ("child_multiply", "child_playbook")


class ServerProcess:
    """One `noetl server` process (embedded, or with --kafka when `kafka` is given) and its API token."""

    def __init__(self, workdir: Path, port: int, env: dict[str, str], kafka: str | None = None) -> None:
        self.workdir, self.port, self.env, self.kafka = workdir, port, env, kafka
        self.url = f"http://127.0.0.1:{port}"
        self.log = workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.token = env.get("NOETL_API_TOKEN", "")

    def start(self) -> ServerProcess:
        args = [NOETL, "server", "--port", str(self.port)]
        env = dict(self.env)
        if self.kafka:
            dsn_file = self.workdir / "database-url"
            dsn_file.touch(mode=0o600)
            dsn_file.write_text(env.pop("NOETL_DATABASE_URL") + "\n")
            args += ["--kafka", self.kafka, "--database-url-file", str(dsn_file)]
        else:
            args += ["--store", str(self.workdir / "noetl.db")]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, cwd=self.workdir)
        deadline = time.monotonic() + READY_TIMEOUT
        while not self._ready():
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not get ready: {self.log.read_text()[-3000:]}")
            time.sleep(0.1)
        if not self.kafka:
            self.token = (self.workdir / "admin.token").read_text().strip()
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the server exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
        try:
            return httpx.get(f"{self.url}/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    # ----------------------------------------------------------------------------------------- the API
    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        response = httpx.request(method, f"{self.url}{path}", headers=bearer(self.token), timeout=30, **kwargs)
        assert response.status_code < 300, f"{method} {path}: {response.status_code} {response.text}"
        return response.json()

    def register_all(self) -> None:
        for text in PLAYBOOKS.values():
            self.api("POST", "/api/catalog/register", json={"content": text})
        for name in EXAMPLES:
            self.api("POST", "/api/catalog/register", json={"content": (ROOT / "examples" / f"{name}.yaml").read_text()})

    def run(self, path: str, **workload: Any) -> str:
        return self.api("POST", "/api/executions/run", json={"path": path, "parameters": workload})["execution_id"]

    def wait_status(self, execution_id: str, statuses: tuple[str, ...], timeout: float = 90.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            response = httpx.get(f"{self.url}/api/executions/{execution_id}?events=false", headers=bearer(self.token),
                                 timeout=10)
            if response.status_code == 200 and response.json().get("status") in statuses:
                return response.json()
            if time.monotonic() > deadline:
                raise AssertionError(f"{execution_id} did not reach {statuses}: {response.text[:500]}")
            time.sleep(0.2)


@contextmanager
def browser() -> Iterator[Any]:
    """A headless Chromium from the distribution, through Playwright (never `playwright install`)."""
    required = os.environ.get("NOETL_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            raise
        pytest.skip("Playwright is not installed (pip install playwright; CI installs it)")
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        if required:
            raise AssertionError(f"no Chromium at {CHROMIUM}: apt-get install chromium")
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium chromium-driver)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield chromium
        finally:
            chromium.close()


def logged_in_page(chromium: Any, server: ServerProcess, width: int = 1400, height: int = 1000) -> Any:
    """A page of a fresh browser context, logged in through the login form with the server's token."""
    context = chromium.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.errors = []   # JavaScript errors on the page: the tests assert there were none
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.goto(f"{server.url}/")
    assert page.url.endswith("/login"), page.url     # no session yet: the login page
    page.fill("#token", server.token)
    page.click("#login")
    page.wait_for_url(f"{server.url}/")
    return page
