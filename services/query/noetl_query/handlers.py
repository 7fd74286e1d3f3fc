"""The read API's logic, free of any transport, over a `ReadModel` (SQLite in embedded mode, Postgres in the
cluster). Shapes follow NoETL's API (reference §13) with status and progress by DSL §7: every status,
progress, step report and summary is computed by `noetl_common.projection` from the execution's events, so
the embedded report, `noetl run --server` and this API cannot disagree.

Handlers raise LookupError for an unknown execution or playbook (404); pydantic validates the filters.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any, Literal, Protocol, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from noetl_common import projection
from noetl_common.attempt_logs import log_item
from noetl_common.explain import finished_explanation
from noetl_common.messages import Event
from noetl_common.ports import MAX_VERSION, CatalogEntry

Status = Literal["PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED"]
STATUSES: tuple[str, ...] = get_args(Status)


class ExecutionFilters(BaseModel):
    """Filters of GET /api/executions. `since`/`until` bound the start time (inclusive); a naive datetime
    is taken as UTC."""
    model_config = ConfigDict(extra="forbid")
    status: Status | None = None
    path: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    parent_execution_id: str | None = None

    @field_validator("status", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("since", "until")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        """In UTC; a moment whose UTC form falls outside years 1..9999 (0001-01-01T00:00+01:00) is clamped to
        the first or last representable moment, which selects the same executions."""
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        try:
            return value.astimezone(timezone.utc)
        except OverflowError:
            return (datetime.min if value.year == 1 else datetime.max).replace(tzinfo=timezone.utc)

    def since_iso(self) -> str | None:
        return iso(self.since) if self.since else None

    def until_iso(self) -> str | None:
        return iso(self.until) if self.until else None


MAX_PAGE = 1000     # the largest page a list route answers (docs/security.md, Limits)


class Page(BaseModel):
    model_config = ConfigDict(extra="forbid")
    limit: int = Field(50, ge=1, le=MAX_PAGE)
    offset: int = Field(0, ge=0)


INT4_MAX = 2**31 - 1   # attempts and indexes are Postgres integers: a larger filter is a 422, not a 500


class LogFilters(BaseModel):
    """Filters of GET /api/executions/{id}/logs: one step, one attempt, one iteration item (all optional)."""
    model_config = ConfigDict(extra="forbid")
    step: str | None = Field(None, max_length=1000)
    attempt: int | None = Field(None, ge=1, le=INT4_MAX)
    index: int | None = Field(None, ge=0, le=INT4_MAX)

    @field_validator("step")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:   # Postgres text cannot hold it: a 422, not a 500
            raise ValueError("step must not contain NUL")
        return value


class LogPage(Page):
    """A page of step logs: each item may hold NOETL_STEP_LOG_MAX_BYTES of output, so pages are smaller."""
    limit: int = Field(50, ge=1, le=200)
    offset: int = Field(0, ge=0, le=2**62)


def iso(moment: datetime) -> str:
    """The events' timestamp format (ISO-8601 UTC, milliseconds, Z), so range filters compare as text."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ReadModel(Protocol):
    """What the query service reads. Implementations: `noetl_query.sqlite_reads.SqliteReadModel` (embedded),
    the Postgres projection (cluster). A summary is exactly `projection.summary(events)` of the execution."""

    async def executions(self, filters: ExecutionFilters, page: Page) -> tuple[list[dict[str, Any]], int]:
        """(summaries of the page, newest start first; how many executions match in all)."""
        ...

    async def execution(self, execution_id: str) -> dict[str, Any] | None:
        """projection.summary of the execution, or None when it has no events."""
        ...

    async def events(self, execution_id: str, after_seq: int = -1) -> list[Event]:
        """The execution's events in seq order (seq > after_seq); [] when unknown."""
        ...

    async def attempt_logs(self, execution_id: str, filters: LogFilters,
                           page: LogPage) -> tuple[list[Event], int] | None:
        """(the page of events that `noetl_common.attempt_logs.is_attempt_log` selects, by timestamp then
        seq; how many match in all), or None when the execution is unknown."""
        ...

    async def catalog(self) -> list[CatalogEntry]:
        """Every registered playbook version."""
        ...

    async def playbook(self, path: str, version: int | None = None) -> CatalogEntry | None:
        """One version (None = the latest), or None."""
        ...


# ----------------------------------------------------------------------------------------------- executions
def execution_out(summary: dict[str, Any]) -> dict[str, Any]:
    """A summary under NoETL's names too (`id`, `playbook_id`)."""
    return {"id": summary.get("execution_id"), "playbook_id": summary.get("path"), **summary}


def event_out(event: Event) -> dict[str, Any]:
    return event.model_dump(mode="json", exclude_none=True)


async def list_executions(read: ReadModel, filters: ExecutionFilters, page: Page) -> tuple[list[dict[str, Any]], int]:
    summaries, total = await read.executions(filters, page)
    return [execution_out(s) for s in summaries], total


async def _events_or_404(read: ReadModel, execution_id: str, after_seq: int = -1) -> list[Event]:
    events = await read.events(execution_id, after_seq)
    if not events and (after_seq < 0 or await read.execution(execution_id) is None):
        raise LookupError(f"no execution {execution_id!r}")
    return events


async def get_execution(read: ReadModel, execution_id: str, include_events: bool = True) -> dict[str, Any]:
    """The summary + `steps` (the per-step report of the command contract) + `events`. With
    include_events=False only the summary (a cheap poll)."""
    if not include_events:
        summary = await read.execution(execution_id)
        if summary is None:
            raise LookupError(f"no execution {execution_id!r}")
        return execution_out(summary)
    events = await _events_or_404(read, execution_id)
    return {**execution_out(projection.summary(events)), "started_by": _started_by(events),
            "steps": projection.steps(events), "events": [event_out(e) for e in events]}


def _started_by(events: list[Event]) -> str | None:
    """The principal that started the execution (execution_start's meta; docs/security.md); None for a
    child execution (its parent's start names the principal) and for executions from before authentication."""
    start = next((e for e in events if e.event_type == "execution_start"), None)
    return (start.meta or {}).get("principal") if start is not None else None


async def execution_events(read: ReadModel, execution_id: str, after_seq: int = -1) -> dict[str, Any]:
    events = await _events_or_404(read, execution_id, after_seq)
    return {"execution_id": execution_id, "events": [event_out(e) for e in events]}


async def execution_data(read: ReadModel, execution_id: str) -> dict[str, Any]:
    """NoETL's GET /api/execution/data/{id}: {"events": [...]} (only execution ids are accepted here)."""
    return {"events": [event_out(e) for e in await _events_or_404(read, execution_id)]}


async def events_summary(read: ReadModel, execution_id: str) -> dict[str, Any]:
    events = await _events_or_404(read, execution_id)
    counts: dict[str, int] = {}
    for event in events:
        counts[event.event_type] = counts.get(event.event_type, 0) + 1
    skipped = sum(1 for e in events if e.event_type == "action_completed" and isinstance(e.result, dict)
                  and e.result.get("skipped"))
    errors = [{"node_name": e.node_name, "error": e.error, "created_at": e.timestamp, "attempt": e.attempt}
              for e in events if e.event_type == "action_error"][-3:]
    return {"status": "ok", "summary": {"execution_id": execution_id, "status": projection.execution_status(events),
                                        "counts": counts, "skipped": skipped, "errors": errors}}


# ----------------------------------------------------------------------------------------------- logs
async def attempt_logs(read: ReadModel, execution_id: str, filters: LogFilters,
                       page: LogPage) -> tuple[dict[str, Any], int]:
    """GET /api/executions/{id}/logs: each attempt's captured output (python stdout/stderr, tracebacks,
    worker notes) and error, redacted and bounded by the worker; (the body, the total number matching)."""
    # An id with NUL names nothing (and Postgres text cannot hold it)
    found = await read.attempt_logs(execution_id, filters, page) if "\x00" not in execution_id else None
    if found is None:
        raise LookupError(f"no execution {execution_id!r}")
    events, total = found
    return {"execution_id": execution_id, "items": [log_item(e) for e in events]}, total


# ----------------------------------------------------------------------------------------------- explain
# (execution_id, now) -> noetl_common.explain.explain(state, now) as JSON, or None when this process does not
# hold the execution's live state. Embedded: the runtime's states; `noetl server --kafka`: the broker's table.
Explainer = Callable[[str, float], Awaitable[dict[str, Any] | None]]


class NoLiveState(RuntimeError):
    """The execution is running but this process cannot see its state (a 503: ask a process that can)."""


async def explain_execution(read: ReadModel, explainer: Explainer | None, execution_id: str,
                            now: float) -> dict[str, Any]:
    """GET /api/executions/{id}/explain: what a running execution waits for (items with kind, step, fields
    and a sentence, plus `text`, the sentences one per line). A finished one has nothing to wait for: its
    projected summary says so (terminal is final), without asking the explainer."""
    summary = await read.execution(execution_id)
    status = summary.get("status") if summary is not None else None
    if summary is not None and status in ("COMPLETED", "FAILED", "CANCELLED"):
        end = summary.get("end_time")
        finished = datetime.fromisoformat(end.replace("Z", "+00:00")).timestamp() if end else None
        return finished_explanation(execution_id, status, now, finished, summary.get("error")).as_json()
    live = await explainer(execution_id, now) if explainer is not None else None
    if live is not None:
        return live
    if summary is None:   # (or accepted and not folded yet)
        raise LookupError(f"no execution {execution_id!r}")
    raise NoLiveState(f"execution {execution_id!r} is {status}, but this process does not hold its live state "
                      f"and has no broker to ask (NOETL_BROKER_URL; see docs/query.md)")


# ----------------------------------------------------------------------------------------------- catalog
def _entry_out(entry: CatalogEntry, *, with_payload: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"path": entry.path, "kind": "Playbook", "version": entry.version,
                           "catalog_id": f"{entry.path}:{entry.version}", "content": entry.content,
                           "meta": None, "created_at": iso(datetime.fromtimestamp(entry.created_at, timezone.utc)),
                           "registered_by": entry.registered_by}
    if with_payload:
        out["payload"] = entry.document
    return out


# A page with every version's content can be megabytes per entry: a smaller page size when content is asked for.
MAX_CATALOG_PAGE_WITH_CONTENT = 100


async def catalog_list(read: ReadModel, resource_type: str | None = None, page: Page | None = None,
                       include_content: bool = False) -> dict[str, Any]:
    """Registered versions, newest first (NoETL's order), one page at a time (`total` counts them all).
    Without include_content an entry has no `content`/`payload`: GET /api/catalog/playbook gives those."""
    page = page or Page()
    if include_content and page.limit > MAX_CATALOG_PAGE_WITH_CONTENT:
        raise ValueError(f"limit must be at most {MAX_CATALOG_PAGE_WITH_CONTENT} with include_content=true")
    if resource_type not in (None, "", "Playbook", "playbook"):
        return {"entries": [], "total": 0, "limit": page.limit, "offset": page.offset}
    entries = sorted(await read.catalog(), key=lambda e: (e.created_at, e.version), reverse=True)
    window = entries[page.offset:page.offset + page.limit]
    out = [_entry_out(e) for e in window]
    if not include_content:
        for entry in out:
            del entry["content"], entry["payload"]
    return {"entries": out, "total": len(entries), "limit": page.limit, "offset": page.offset}


async def catalog_playbook(read: ReadModel, playbook_id: str, version: int | None = None) -> dict[str, Any]:
    entry = await read.playbook(playbook_id, version) if (version or 0) <= MAX_VERSION else None
    if entry is None:
        raise LookupError(f"playbook {playbook_id!r} {'version ' + str(version) if version else '(latest)'}"
                          " is not in the catalog")
    return _entry_out(entry)
