"""Ports: the interfaces the edges implement (SQLite/in-memory for embedded mode, Postgres/Kafka for the cluster).

One contract suite per port runs against every implementation.
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable, Protocol

from pydantic import BaseModel


MAX_VERSION = 2**31 - 1   # catalog versions are Postgres integers: a larger one names no entry


class CatalogEntry(BaseModel):
    path: str
    version: int
    content: str                 # the YAML text as registered
    document: dict[str, Any]     # parsed
    created_at: float
    registered_by: str | None = None   # the principal that registered this version (docs/security.md)


class Credential(BaseModel):
    name: str
    type: str                    # postgres | bearer | basic | api_key | header | generic ...
    data: dict[str, Any]         # decrypted; never logged, never in events
    description: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0


class CatalogPort(Protocol):
    async def register(self, content: str, document: dict[str, Any], path: str,
                       registered_by: str | None = None) -> CatalogEntry: ...
    async def get(self, path: str, version: int | None = None) -> CatalogEntry | None: ...  # None = latest
    async def list(self) -> list[CatalogEntry]: ...


class CredentialPort(Protocol):
    async def put(self, name: str, type: str, data: dict[str, Any], description: str | None = None) -> Credential: ...
    async def get(self, name: str) -> Credential | None: ...
    async def list(self) -> list[Credential]: ...         # `data` emptied
    async def delete(self, name: str) -> bool: ...


class Claim(BaseModel):
    """What a submission with an idempotency scope (an Idempotency-Key, or a client-chosen execution_id)
    recorded: the execution it started, the hash of the request, the request and the answer given."""
    scope: str
    request_hash: str
    execution_id: str
    request: dict[str, Any]
    answer: dict[str, Any]
    created_at: float            # the StartExecution's `time`: a re-send repeats it (see docs/broker.md)


class IdempotencyPort(Protocol):
    async def get(self, scope: str) -> Claim | None: ...
    # Record `claim` unless its scope is taken: None when recorded, else the claim already there. Raises
    # noetl_common.refusals.Conflict when another scope holds the same execution_id.
    async def claim(self, claim: Claim) -> Claim | None: ...


# The worker reports facts (ActionStarted/Completed/Failed, heartbeats, ChildStarted) and starts child
# executions (StartExecution) through one callable: the runtime routes each message to the right topic.
Emit = Callable[[BaseModel], Awaitable[None]]
