"""A real `noetl server` (embedded mode) for the limit tests, driven over HTTP like a client. A plain module
(not conftest.py: tests/conftest.py already takes that module name)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import httpx

from support import NoetlServer, bearer, local_admin_token

BODY_LIMIT = 256 * 1024      # NOETL_MAX_BODY_BYTES for the limits server: small, so tests send little


class LimitsServer(NoetlServer):
    """Started at once (the module-scoped `limits_server` fixture), with a small NOETL_MAX_BODY_BYTES."""

    def __init__(self, store: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NOETL_")}
        env["NOETL_MAX_BODY_BYTES"] = str(BODY_LIMIT)
        super().__init__(["--store", store], env, store.with_suffix(".log"))
        self.store = store
        self.start(30)

    @property
    def headers(self) -> dict[str, str]:
        """The admin token the server wrote beside its store on first start."""
        return bearer(local_admin_token(self.store))

    def post(self, path: str, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, headers={**self.headers, **kwargs.pop("headers", {})},
                          timeout=kwargs.pop("timeout", 30), **kwargs)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers, timeout=kwargs.pop("timeout", 30), **kwargs)


def health_latency(url: str) -> float:
    started = time.monotonic()
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    return time.monotonic() - started
