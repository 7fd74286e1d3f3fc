"""A real `noetl server` (embedded mode) for the limit tests, driven over HTTP like a client. A plain module
(not conftest.py: tests/conftest.py already takes that module name)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from support import bearer, free_port, local_admin_token

NOETL = Path(sys.executable).with_name("noetl")
BODY_LIMIT = 256 * 1024      # NOETL_MAX_BODY_BYTES for the limits server: small, so tests send little


class LimitsServer:
    def __init__(self, store: Path) -> None:
        self.store = store
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = store.with_suffix(".log")
        env = {k: v for k, v in os.environ.items() if not k.startswith("NOETL_")}
        env["NOETL_MAX_BODY_BYTES"] = str(BODY_LIMIT)
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen([str(NOETL), "server", "--port", str(self.port), "--store", str(store)],
                                          stdout=log, stderr=log, env=env, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.popen.poll() is None, self.log.read_text()
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"noetl server not ready:\n{self.log.read_text()}")

    @property
    def headers(self) -> dict[str, str]:
        """The admin token the server wrote beside its store on first start."""
        return bearer(local_admin_token(self.store))

    def post(self, path: str, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, headers={**self.headers, **kwargs.pop("headers", {})},
                          timeout=kwargs.pop("timeout", 30), **kwargs)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers, timeout=kwargs.pop("timeout", 30), **kwargs)

    def stop(self) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)


def health_latency(url: str) -> float:
    started = time.monotonic()
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    return time.monotonic() - started
