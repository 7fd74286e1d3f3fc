"""Rendering against an execution's context, free of any transport.

The context is `projection.render_context(events)` (DSL §5: workload, execution_id, parent_execution_id,
vars and every completed step's latest result by name) with `extra_context` laid over it. Rendering is
`noetl_common.render.render`, the engine's own renderer: a template renders here exactly as in a step.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from noetl_common import projection
from noetl_common.messages import Event
from noetl_common.render import TemplateError, render


@dataclass
class RenderPorts:
    events: Callable[[str], Awaitable[list[Event]]]   # execution_id -> its events in order ([] if unknown)


class RenderRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    execution_id: str = Field(min_length=1)
    template: Any = Field(...)           # a string, or any JSON value whose strings are templates
    extra_context: dict[str, Any] | None = None
    # strict (default): an undefined name or a bad template is a 400 naming it. Not strict: NoETL's
    # all-or-nothing rule, the template comes back unrendered.
    strict: bool = True


async def render_template(ports: RenderPorts, req: RenderRequest) -> dict[str, Any]:
    events = await ports.events(req.execution_id)
    if not events:
        raise LookupError(f"no execution {req.execution_id!r}")
    context = {**projection.render_context(events), **(req.extra_context or {})}
    try:
        rendered = render(req.template, context)
    except TemplateError as exc:
        if req.strict:
            raise ValueError(f"cannot render: {exc}") from exc
        rendered = req.template
    return {"status": "ok", "rendered": rendered, "context_keys": sorted(context)}
