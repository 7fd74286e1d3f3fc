"""The worker's HTTP side: /health, /ready and /metrics (noetl_runtime.http_ops), served by uvicorn on the
worker's own event loop.

    app, registry = ops_app(ready=service.not_ready, in_flight=lambda: ..., concurrency=64)
    server = OpsServer(app); port = await server.start(host, port); ...; await server.stop()
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any


def ops_app(ready: Callable[[], str | None], in_flight: Callable[[], int], concurrency: int) -> tuple[Any, Any]:
    """The FastAPI app and the Prometheus registry its /metrics serves."""
    from fastapi import FastAPI
    from noetl_runtime.http_ops import install_ops   # the ops endpoints every service shares

    app = FastAPI(title="noetl worker", version="1")
    # auth=None: this listener serves only the probes and /metrics ("its own listener", docs/security.md)
    registry = install_ops(app, service="worker", auth=None, ready=ready, gauges={
        "noetl_worker_commands_in_flight": ("commands running now", lambda: float(in_flight())),
        "noetl_worker_concurrency": ("commands this worker runs at once at most", lambda: float(concurrency)),
    })
    return app, registry


class OpsServer:
    def __init__(self, app: Any) -> None:
        self.app = app
        self._server: Any = None
        self._task: asyncio.Task[Any] | None = None

    async def start(self, host: str, port: int) -> int:
        """Serve; return the port bound (port 0: any free one)."""
        import uvicorn

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Any:   # the worker handles SIGTERM/SIGINT itself
                yield

        config = uvicorn.Config(self.app, host=host, port=port, log_config=None, lifespan="off", access_log=False)
        self._server = _Server(config)
        serving = asyncio.create_task(self._server.serve(), name="worker-http")
        while not self._server.started:
            if serving.done():
                await serving
                raise RuntimeError(f"HTTP server did not start on {host}:{port}")
            await asyncio.sleep(0.01)
        self._task = serving
        return int(self._server.servers[0].sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.gather(self._task, return_exceptions=True)
        self._server = self._task = None
