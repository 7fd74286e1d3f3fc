"""Refusals a port or a handler raises when a well-formed request cannot be taken now or at all.

The HTTP edge (`noetl_runtime.http_ops.answer`) maps them to their status; the handlers and ports stay free
of any transport. Each says what the client may do next.

    Conflict      409  the request contradicts one already taken (an Idempotency-Key reused with another
                       body, a client-chosen execution_id that names another execution); do not retry
    Overloaded    429  too many executions in flight; retry after `retry_after` seconds
    TooLarge      413  over a size limit of the transport (a Kafka topic's); retrying cannot help
    Unavailable   503  the runtime cannot take it now (it died, Kafka is down); nothing was accepted
"""
from __future__ import annotations


class Refusal(Exception):
    status = 500

    @property
    def reason(self) -> str:
        return str(self.args[0]) if self.args else type(self).__name__


class Conflict(Refusal):
    status = 409


class Overloaded(Refusal):
    status = 429

    def __init__(self, reason: str, retry_after: int = 1) -> None:
        super().__init__(reason)
        self.retry_after = max(1, int(retry_after))


class TooLarge(Refusal):
    status = 413


class Unavailable(Refusal):
    status = 503
