"""Live pages: server-sent events that carry the re-rendered part of a page each time it changes.

    GET /live/executions?<the list's filters>   `event: rows` with the list's table body
    GET /live/executions/{id}                   `event: execution` with the execution's live part (header,
                                                graph, explainer, timeline, event log); it ends after the
                                                execution is terminal and that final state was sent

The source is the app's ChangeFeed (embedded: the runtime's event listener; Kafka and cluster: the
projector's NOTIFY). Signals that arrive together are coalesced (COALESCE seconds), so a burst of 5,000
iteration events renders a page a few times, not 5,000 times. The browser only swaps the HTML it is sent:
it never polls. Without a feed (an app built without one) the stream says so and ends.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from jinja2 import Environment

from noetl_runtime.change_feed import OVERFLOW

COALESCE = 0.15         # seconds of quiet gathered into one render
MAX_RENDER_RATE = 0.5   # at least this long between two renders of one page (a busy execution)
KEEPALIVE = 15.0        # a comment line so that proxies keep an idle stream open
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")
UNKNOWN_GRACE = 120.0   # seconds a stream waits for an execution nobody has heard of (it may be in flight)


def sse(event: str, html: str) -> bytes:
    """One server-sent event: every line of the payload gets its own `data:` (the browser joins them)."""
    lines = html.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return (f"event: {event}\n" + "".join(f"data: {line}\n" for line in lines) + "\n").encode()


def install(pages: APIRouter, console: Any, env: Environment) -> None:
    @pages.get("/live/executions")
    async def live_list(request: Request, status: str | None = None, path: str | None = None,
                        since: str | None = None, until: str | None = None, page_no: int = 1,
                        size: int = 50) -> StreamingResponse:
        async def render() -> str | None:
            try:
                listing = await console.listing(status, path, since, until, page_no, size)
            except ValueError:
                return None
            query = {k: v for k, v in (("status", status), ("path", path), ("since", since), ("until", until)) if v}
            return env.get_template("_rows.html").render(listing=listing, query=query)
        return _stream(request, console, "rows", render, lambda execution_id: True)

    @pages.get("/live/executions/{execution_id}")
    async def live_execution(request: Request, execution_id: str) -> StreamingResponse:
        principal = getattr(request.state, "principal", None)
        from noetl_runtime.auth import OPERATOR, allows
        can_act = allows(principal.role if principal is not None else None, OPERATOR)
        final = {"sent": False}
        opened = time.monotonic()

        async def render() -> str | None:
            if final["sent"]:
                return None
            shown = await console.execution(execution_id)
            if shown is None:   # accepted and not folded yet (Kafka), or never: give up after a while
                final["sent"] = time.monotonic() - opened > UNKNOWN_GRACE
                return None
            final["sent"] = shown["summary"].get("status") in TERMINAL
            return env.get_template("_execution_live.html").render(execution_id=execution_id, x=shown,
                                                                   can_act=can_act)
        return _stream(request, console, "execution", render, lambda changed: changed == execution_id,
                       done=lambda: final["sent"])


def _stream(request: Request, console: Any, event: str, render: Any, wanted: Any,
            done: Any = lambda: False) -> StreamingResponse:
    async def events() -> AsyncIterator[bytes]:
        if console.feed is None:
            yield sse("error", "this server has no change feed: reload the page to see new events")
            return
        async with console.feed.subscribe() as queue:
            yield b"retry: 2000\n\n"
            html = await render()       # what changed between the page's render and the subscription
            if html is not None:
                yield sse(event, html)
            last = time.monotonic()
            while not done():
                if await request.is_disconnected():
                    return
                try:
                    changed = await asyncio.wait_for(queue.get(), KEEPALIVE)
                except TimeoutError:
                    yield b": keepalive\n\n"
                    continue
                if changed != OVERFLOW and not wanted(changed):
                    continue
                await asyncio.sleep(max(COALESCE, MAX_RENDER_RATE - (time.monotonic() - last)))
                while not queue.empty():   # everything that arrived meanwhile is in this render
                    queue.get_nowait()
                html = await render()
                last = time.monotonic()
                if html is not None:
                    yield sse(event, html)
            yield sse("end", "")   # nothing will change any more: the page closes the stream (no reconnect)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
