"""The console's reads: each page's data from the read model, the catalog and the explainer.

    Console                 the ports the console uses (the app's own: read model, ingest ports, explainer,
                            change feed, authenticator), plus a small cache of parsed playbooks
    Console.listing(...)    one page of the executions list
    Console.execution(id)   everything one execution's page shows (graph, timeline, explainer, events)
    Console.playbook(p, v)  a catalog entry with its graph

The JSON API's handlers do the reading (noetl_query.handlers, noetl_ingest.handlers): the console shows
what the API answers, never a second interpretation of the events.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from noetl_common import projection
from noetl_common.caps import CEILING_MAX_VISITS, Caps
from noetl_common.dsl import Playbook, load_playbook
from noetl_common.explain import finished_explanation
from noetl_common.messages import Event
from noetl_common.ports import CatalogEntry
from noetl_frontend.console import graph, views
from noetl_ingest.handlers import IngestPorts
from noetl_query import handlers as qh
from noetl_query.handlers import ExecutionFilters, Explainer, NoLiveState, Page, ReadModel
from noetl_runtime.auth import Authenticator
from noetl_runtime.change_feed import ChangeFeed

PAGE_SIZES = (25, 50, 100, 200)
MAX_EVENTS_SHOWN = 100        # the event log shows the latest ones; the JSON API has them all
MAX_CHILDREN = 200            # child executions listed on a parent's page
PLAYBOOK_CACHE = 64
DRAW_CAPS = Caps(max_visits=CEILING_MAX_VISITS)   # the console draws every registered version
MAX_CHILD_LOOKUPS = 50      # children whose start event is read to find their step


@dataclass
class Console:
    read: ReadModel
    ingest: IngestPorts
    auth: Authenticator
    explainer: Explainer | None = None
    feed: ChangeFeed | None = None
    _playbooks: OrderedDict[tuple[str, int], tuple[CatalogEntry, Playbook | None]] = field(
        default_factory=OrderedDict)

    # -------------------------------------------------------------------------------------------- list
    async def listing(self, status: str | None, path: str | None, since: str | None, until: str | None,
                      page: int, size: int) -> dict[str, Any]:
        filters = ExecutionFilters.model_validate({k: v for k, v in (
            ("status", status), ("path", path), ("since", since), ("until", until)) if v})
        size = size if size in PAGE_SIZES else PAGE_SIZES[1]
        page = max(1, page)
        rows, total = await self.read.executions(filters, Page(limit=size, offset=(page - 1) * size))
        now = time.time()
        for row in rows:
            row["duration_text"] = duration_text(row, now)
        return {"rows": rows, "total": total, "page": page, "size": size,
                "pages": max(1, -(-total // size))}

    # ----------------------------------------------------------------------------------------- playbooks
    async def entry(self, path: str | None, version: int | None) -> tuple[CatalogEntry, Playbook | None] | None:
        if not path:
            return None
        if version is not None and (path, version) in self._playbooks:
            self._playbooks.move_to_end((path, version))
            return self._playbooks[(path, version)]
        entry = await self.read.playbook(path, version)
        if entry is None:
            return None
        # Drawn, not judged: a version registered under a higher cap than today's still shows its graph.
        playbook, _problems = load_playbook(entry.content, DRAW_CAPS) if entry.content else (None, [])
        self._playbooks[(path, entry.version)] = (entry, playbook)
        while len(self._playbooks) > PLAYBOOK_CACHE:
            self._playbooks.popitem(last=False)
        return entry, playbook

    async def playbook(self, path: str, version: int | None) -> dict[str, Any] | None:
        found = await self.entry(path, version)
        if found is None:
            return None
        entry, playbook = found
        versions = sorted({e.version for e in await self.read.catalog() if e.path == path}, reverse=True)
        return {"entry": entry, "versions": versions, "playbook": playbook,
                "graph": graph.svg(graph.layout(playbook)) if playbook is not None else None}

    # ------------------------------------------------------------------------------------------ execution
    async def execution(self, execution_id: str, *, now: float | None = None) -> dict[str, Any] | None:
        now = time.time() if now is None else now
        events = await self.read.events(execution_id)
        if not events:
            return None
        summary = projection.summary(events)
        found = await self.entry(summary.get("path"), summary.get("version"))
        playbook = found[1] if found else None
        children, _ = await self.read.executions(ExecutionFilters(parent_execution_id=execution_id),
                                                 Page(limit=MAX_CHILDREN))
        children.sort(key=lambda c: c.get("start_time") or "")
        by_step = await _children_by_step(self.read, playbook, children)
        steps = views.live_steps(events, by_step)
        return {
            "summary": summary, "duration_text": duration_text(summary, now),
            "graph": graph.svg(graph.layout(playbook), steps, execution_id) if playbook is not None else None,
            "steps": steps, "children": children,
            "explain": await self.explain(execution_id, now, summary),
            "timeline": views.timeline(events, now, children),
            "events": events[-MAX_EVENTS_SHOWN:], "event_count": len(events),
            "workload": views.masked((events[0].meta or {}).get("workload")),
            "started_by": (events[0].meta or {}).get("principal"),
        }

    async def explain(self, execution_id: str, now: float, summary: dict[str, Any] | None = None) -> dict[str, Any]:
        """The explainer's answer (GET /api/executions/{id}/explain); with the `summary` already read, a running
        execution's live state is asked for directly (no second read of its events)."""
        if summary is not None and summary.get("status") in ("COMPLETED", "FAILED", "CANCELLED"):
            end = views._epoch(summary.get("end_time"))   # what explain_execution answers for a finished one
            return finished_explanation(execution_id, summary["status"], now, end, summary.get("error")).as_json()
        if summary is not None and self.explainer is not None:
            live = await self.explainer(execution_id, now)
            if live is not None:
                return live
        try:
            return await qh.explain_execution(self.read, self.explainer, execution_id, now)
        except (NoLiveState, LookupError) as exc:
            return {"text": str(exc.args[0]) if exc.args else str(exc), "items": []}

    async def events(self, execution_id: str) -> list[Event]:
        return await self.read.events(execution_id)


async def _children_by_step(read: ReadModel, playbook: Playbook | None,
                            children: list[dict[str, Any]]) -> dict[str, list[str]]:
    """A child execution belongs to the playbook step (or iterator task) that names its path; when several
    steps name one path, the child's own start event says which step started it (parent_step)."""
    if playbook is None or not children:
        return {}
    owners: dict[str, list[str]] = {}
    for name, step in playbook.steps.items():
        action = step.iterator.task if step.iterator is not None else step
        if action.type == "playbook" and isinstance(action.config.get("path"), str):
            owners.setdefault(action.config["path"], []).append(name)
    out: dict[str, list[str]] = {}
    asked = 0
    for child in children:
        steps = owners.get(child.get("path") or "", [])
        owner = steps[0] if len(steps) == 1 else None
        if len(steps) > 1 and asked < MAX_CHILD_LOOKUPS:
            asked += 1
            events = await read.events(child["execution_id"])
            owner = (events[0].meta or {}).get("parent_step") if events else None
        if owner is not None:
            out.setdefault(owner, []).append(child["execution_id"])
    return out


def duration_text(summary: dict[str, Any], now: float) -> str:
    start = views._epoch(summary.get("start_time"))
    if start is None:
        return ""
    end = views._epoch(summary.get("end_time")) or now
    seconds = max(0.0, end - start)
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"
