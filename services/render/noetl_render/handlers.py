"""Rendering against an execution's context, free of any transport.

The context is `projection.render_context(events)` (DSL §5: workload, execution_id, parent_execution_id,
vars and every completed step's latest result by name) with `extra_context` laid over it. Rendering is
`noetl_common.render.render`, the engine's own renderer: a template renders here exactly as in a step, but
in a child process on a time, memory and size budget (noetl_render.budget): a runaway is a 400.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from noetl_common import projection
from noetl_common.messages import Event
from noetl_render.budget import MAX_DEPTH, TemplateFailed, deeper_than, render_in_child

# Renders at once per process: each is a child process for up to RENDER_SECONDS; more wait their turn.
MAX_CONCURRENT_RENDERS = 4


@dataclass
class RenderPorts:
    events: Callable[[str], Awaitable[list[Event]]]   # execution_id -> its events in order ([] if unknown)
    slots: asyncio.Semaphore | None = None            # bounds concurrent renders (made on first use)


class RenderRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    execution_id: str = Field(min_length=1)
    template: Any = Field(...)           # a string, or any JSON value whose strings are templates
    extra_context: dict[str, Any] | None = None
    # strict (default): an undefined name or a bad template is a 400 naming it. Not strict: NoETL's
    # all-or-nothing rule, the template comes back unrendered.
    strict: bool = True


async def render_template(ports: RenderPorts, req: RenderRequest) -> dict[str, Any]:
    if deeper_than(req.template) or deeper_than(req.extra_context):
        raise ValueError(f"the template or extra_context nests lists/objects more than {MAX_DEPTH} levels deep")
    events = await ports.events(req.execution_id)
    if not events:
        raise LookupError(f"no execution {req.execution_id!r}")
    context = {**projection.render_context(events), **(req.extra_context or {})}
    if ports.slots is None:
        ports.slots = asyncio.Semaphore(MAX_CONCURRENT_RENDERS)
    try:
        async with ports.slots:     # off the event loop, in a child with a deadline (noetl_render.budget)
            rendered = await asyncio.to_thread(render_in_child, req.template, context)
    except TemplateFailed as exc:
        if req.strict:
            raise ValueError(f"cannot render: {exc}") from exc
        rendered = req.template
    return {"status": "ok", "rendered": rendered, "context_keys": sorted(context)}
