"""A NoETL DSL v10 pipeline's result (V10-2.10) as carried, and as read.

Read, a pipeline's result is the last completed task's mapping overlaid with `{status, results, _prev, ctx}`:
the last task's result is in it three times (its fields, `results.<task>`, `_prev`). In memory those are one
object; as JSON they are three copies, so a 900 KB task result became a 2.7 MB message, over Kafka's 1 MB.

So the worker reports, the fold stores and the events carry the compact form, each task result once:

    {"$noetl_pipeline": {"last": <name of the last completed task or null>, "status": "ok" | "break",
                         "ctx": <the pipeline's ctx patch>}, "results": {<task>: <result>, ...}}

and the overlay is built where a result is read: the fold's render context and step scope, the worker's
pipeline scope, the report and read models (`noetl_common.projection`). `view` of anything else is that value.
Pure and total: a malformed compact form is returned as is, never raised on.
"""
from __future__ import annotations

from typing import Any

MARK = "$noetl_pipeline"


class Overlaid(dict):
    """The overlay view of a compact result; remembers the compact form, which is what gets shipped on."""
    __slots__ = ("compact",)


def compact(results: dict[str, Any], last: str | None, status: str, ctx: dict[str, Any]) -> dict[str, Any]:
    return {MARK: {"last": last, "status": status, "ctx": ctx}, "results": results}


def is_compact(value: Any) -> bool:
    return (type(value) is dict and len(value) == 2 and type(value.get(MARK)) is dict
            and type(value.get("results")) is dict)


def view(value: Any) -> Any:
    """The V10-2.10 overlay of a compact result (anything else as is)."""
    if not is_compact(value):
        return value
    meta, results = value[MARK], value["results"]
    name = meta.get("last")
    last = results.get(name) if isinstance(name, str) else None
    out = Overlaid(last if isinstance(last, dict) else {"value": last})
    ctx = meta.get("ctx")
    out.update(status=meta.get("status", "ok"), results=results, _prev=last, ctx=ctx if isinstance(ctx, dict) else {})
    out.compact = value
    return out


def views(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with every compact result as its view (the same dict when there is none)."""
    if not any(is_compact(v) for v in values.values()):
        return values
    return {k: view(v) for k, v in values.items()}


def shipped(value: Any) -> Any:
    """What to put in a message for a value that may be a view: its compact form."""
    return value.compact if isinstance(value, Overlaid) else value
