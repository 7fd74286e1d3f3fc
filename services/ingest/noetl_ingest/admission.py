"""What the front door admits: idempotent submission and the bound on in-flight executions.

Idempotency (docs/decisions.md, "Idempotent submission"). A run with an `Idempotency-Key` header, or with a
client-chosen `execution_id`, has a *scope* ("key:<key>" or "id:<execution_id>"). The first request of a
scope records (scope, hash of the request, execution id, request, answer) durably *before* it submits the
start; a later request of the scope gets the recorded answer, and the recorded execution's start is sent
again (same id) unless the execution is known, so a start lost between the record and the submit (Kafka
down, a crash) is recovered by the retry, and a start already folded is a duplicate the fold drops
(advance() answers `stale` for a start of an existing execution). A reuse of the scope with another
request is a 409.

Back-pressure. `InFlight` estimates the executions in flight as: the runtime's own count (embedded: the
fold's live states; Kafka: PENDING/RUNNING rows of the read model), refreshed at most every `refresh`
seconds, plus the starts this process accepted that the count cannot show yet (not folded, not projected),
plus the admissions in progress. At or above `limit`, `admit()` refuses with Overloaded (429,
Retry-After). The bound is at the HTTP door only: a start produced straight to Kafka, or a child started by
the fold, is never refused; it waits in its topic like any other message.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from noetl_common.refusals import Overloaded
from noetl_runtime.settings import DEFAULT_MAX_IN_FLIGHT

__all__ = ["DEFAULT_MAX_IN_FLIGHT", "EXECUTION_ID_PATTERN", "InFlight", "check_key", "request_hash", "scope_of"]

# Visible ASCII (RFC 9110 token characters and more), as the IETF idempotency-key draft's examples use; a
# header is Latin-1 on the wire, so anything else (unicode, controls, NUL) is refused rather than guessed at.
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
# A client-chosen execution id: it becomes part of event ids ("<execution_id>:<seq>"), Kafka keys, URLs
# (/api/executions/{id}) and file names in logs, so letters, digits, '-' and '_' only (a UUID fits).
EXECUTION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"


def check_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not IDEMPOTENCY_KEY.fullmatch(value):
        raise ValueError("Idempotency-Key must be 1 to 255 visible ASCII characters (no spaces, no controls)")
    return value


def scope_of(key: str | None, execution_id: str | None) -> str | None:
    if key is not None:
        return f"key:{key}"
    if execution_id is not None:
        return f"id:{execution_id}"
    return None


def request_hash(request: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the request: the same request in another key order or spacing hashes
    the same."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class InFlight:
    """The estimate of executions in flight and the bound on it (see the module's docstring)."""

    def __init__(self, limit: int, running: Callable[[], Awaitable[int]],
                 seen: Callable[[Collection[str]], Awaitable[set[str]]], *, refresh: float = 0.5,
                 retry_after: int = 1, forget_after: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit                  # <= 0: no bound
        self._running, self._seen = running, seen
        self.refresh, self.retry_after, self.forget_after = refresh, retry_after, forget_after
        self._clock = clock
        self._count = 0
        self._read_at: float | None = None
        self._pending: dict[str, float] = {}   # accepted here, not yet in the count -> accepted at
        self._admitting = 0
        self._lock = asyncio.Lock()
        self.refused = 0

    async def estimate(self) -> int:
        now = self._clock()
        if self._read_at is None or now - self._read_at >= self.refresh:
            async with self._lock:
                if self._read_at is None or self._clock() - self._read_at >= self.refresh:
                    await self._read()
        return self._count + len(self._pending) + self._admitting

    async def _read(self) -> None:
        # `seen` before `running`: an execution that shows up between the two reads is counted twice
        # (once too many, for one refresh) rather than not at all.
        now = self._clock()
        for eid in [e for e, at in self._pending.items() if now - at > self.forget_after]:
            del self._pending[eid]   # never showed up (lost with a crash): stop counting it
        for eid in await self._seen(list(self._pending)):
            self._pending.pop(eid, None)
        self._count = await self._running()
        self._read_at = self._clock()

    async def admit(self) -> None:
        """Take a place or raise Overloaded. Pair with `accepted(id)` or `release()`."""
        if self.limit > 0:
            current = await self.estimate()
            if current >= self.limit:
                self.refused += 1
                raise Overloaded(f"{current} executions in flight, the bound is {self.limit}: retry later",
                                 self.retry_after)
        self._admitting += 1

    def accepted(self, execution_id: str) -> None:
        self._admitting -= 1
        self._pending[execution_id] = self._clock()

    def release(self) -> None:
        self._admitting -= 1
