"""The shape every action module shares: what it is given, what it returns, how it fails."""
from __future__ import annotations

import datetime as dt
import decimal
import math
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from noetl_common.messages import Command

from noetl_worker.credentials import Secrets

if TYPE_CHECKING:
    from noetl_worker.ports import WorkerPorts


class ActionError(Exception):
    """An expected failure of an attempt: the message is the step's error as the user sees it.

    `status_code` and `result` travel on ActionFailed so `retry_when` can look at them (http)."""

    def __init__(self, message: str, *, status_code: int | None = None, result: Any = None,
                 log: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.result = result
        self.log = log


@dataclass
class Invocation:
    """One attempt's inputs, with the deferred templates already rendered."""
    cmd: Command
    type: str
    data: dict[str, Any]
    config: dict[str, Any]
    auth: Any
    timeout: float | None
    ports: WorkerPorts
    secrets: Secrets
    notes: list[str] = field(default_factory=list)    # worker-side log lines (e.g. a skipped DuckDB secret)

    def note(self, line: str) -> None:
        self.notes.append(line)


@dataclass
class ActionOutput:
    result: Any = None
    log: str | None = None


def sql_text(config: dict[str, Any], data: dict[str, Any] | None = None) -> str:
    """The SQL of a postgres/duckdb step: `command` | `commands` | `sql` | `query` (synonyms)."""
    for source in (config, data or {}):
        for key in ("command", "commands", "sql", "query", "statement"):
            value = source.get(key)
            if isinstance(value, list):
                return ";\n".join(str(v) for v in value)
            if isinstance(value, str) and value.strip():
                return value
    raise ActionError("no SQL given: set `command` (or `commands`, `sql`, `query`)")


def json_cell(value: Any) -> Any:
    """A database value as JSON: Decimal -> float, dates -> ISO-8601, UUID -> str, bytes -> \\x hex
    (postgres's own text form), NaN/Infinity -> the strings postgres's row_to_json writes."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, decimal.Decimal):
        return json_cell(float(value)) if value.is_finite() else str(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(value).hex()
    if isinstance(value, dict):
        return {str(k): json_cell(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_cell(v) for v in value]
    return str(value)
