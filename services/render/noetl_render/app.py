"""The context-render service's HTTP transport.

    router(ports)      POST /api/context/render, mounted by noetl_frontend.app.build_api too
    create_app(ports)  the app of `python -m noetl_render`: the router + /health, /ready, /metrics
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI

from noetl_runtime.auth import Authenticator
from noetl_runtime.http_ops import ReadyCheck, answer, install_ops, refusals
from noetl_render import handlers as h
from noetl_render.handlers import RenderPorts, RenderRequest


def router(ports: RenderPorts) -> APIRouter:
    api = APIRouter(prefix="/api", tags=["render"])

    @api.post("/context/render", responses=refusals(400, 404))
    async def render_context(body: RenderRequest) -> Any:
        return await answer(h.render_template(ports, body))

    return api


def create_app(ports: RenderPorts, *, auth: Authenticator, ready: ReadyCheck | None = None) -> FastAPI:
    app = FastAPI(title="noetl context-render", version="1")
    app.include_router(router(ports))
    install_ops(app, service="render", auth=auth, ready=ready)
    return app
