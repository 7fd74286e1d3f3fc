"""The write API's logic, free of any transport: plain async functions of (ports, request model).

The same functions serve embedded mode (`submit` = the in-process runtime) and the cluster (`submit` =
produce to noetl.requests / noetl.results). They raise plain exceptions that the app maps to answers
(`noetl_runtime.http_ops.answer`): LookupError 404, ValueError 400 (with `errors`), PermissionError 403,
pydantic ValidationError and codec DecodeError 422, and `noetl_common.refusals` (409, 413, 429, 503).

Secret data goes in (POST /api/credentials) and never comes back out: every credential answer is built
by `_public`, which has no `data` field at all.
"""
from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from noetl_common.caps import DEFAULT_CAPS, Caps
from noetl_common.codec import DecodeError, decode_inbound
from noetl_common.dsl import load_playbook
from noetl_common.messages import DEFAULT_LEASE_RETRIES, DEFAULT_LEASE_RETRY_DELAY, CancelExecution, StartExecution
from noetl_common.ports import MAX_VERSION, CatalogPort, Claim, Credential, CredentialPort, IdempotencyPort
from noetl_common.refusals import Conflict
from noetl_ingest.admission import EXECUTION_ID_PATTERN, InFlight, check_key, request_hash, scope_of
from noetl_runtime.auth import OPERATOR, allows
from noetl_runtime.fact_keys import new_fact_key

Submit = Callable[[BaseModel], Awaitable[None]]
# Facts an outside system may post (a worker of its own, a callback). Starting goes through the catalog
# (/api/executions/run) and timers are the broker's own, so those two kinds are refused here.
POSTABLE_KINDS = ("cancel", "action_started", "heartbeat", "action_completed", "action_failed", "child_started",
                  "child_finished")


@dataclass
class IngestPorts:
    catalog: CatalogPort
    credentials: CredentialPort
    submit: Submit                                    # routes an inbound message to the fold (requests/results)
    clock: Callable[[], float] = time.time
    new_id: Callable[[], str] = field(default=lambda: str(uuid.uuid4()))
    lease_seconds: float = 30.0
    lease_retries: int = DEFAULT_LEASE_RETRIES
    lease_retry_delay: float = DEFAULT_LEASE_RETRY_DELAY
    # Idempotent submission: where scopes are recorded, and whether an execution exists (folded, or
    # projected in Kafka mode). Without them a run with an Idempotency-Key or an execution_id is refused.
    idempotency: IdempotencyPort | None = None
    known: Callable[[str], Awaitable[bool]] | None = None
    in_flight: InFlight | None = None                 # the bound on in-flight executions (None: no bound)
    # The operator's caps a playbook is judged against when registered or run (noetl_common.caps): max_visits
    # and the step maximums of `limits:` (NOETL_MAX_VISITS, NOETL_STEP_MAX_*), so going over is a 400 here.
    caps: Caps = DEFAULT_CAPS


class Rejected(ValueError):
    """A well-formed request the engine refuses (an invalid playbook): 400 with every located error."""

    def __init__(self, reason: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(reason)
        self.errors = errors


# ----------------------------------------------------------------------------------------------- requests
class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    content: str | None = None
    content_base64: str | None = None
    resource_type: str | None = "Playbook"

    @model_validator(mode="after")
    def _one_source(self) -> "RegisterRequest":
        if (self.content is None) == (self.content_base64 is None):
            raise ValueError("give exactly one of `content` (YAML text) or `content_base64`")
        if self.resource_type not in (None, "Playbook", "playbook"):
            raise ValueError(f"resource_type {self.resource_type!r} is not supported (only Playbook)")
        return self

    def text(self) -> str:
        if self.content is not None:
            return self.content
        try:
            return base64.b64decode(self.content_base64 or "", validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise Rejected(f"content_base64 is not base64 of UTF-8 text: {exc}") from exc


def parse_version(value: Any) -> int | None:
    """None, "latest" or "" -> None (the newest); 3 or "3" -> 3; anything else is an error."""
    if value is None or value == "" or value == "latest":
        return None
    if isinstance(value, bool):
        raise ValueError("version must be a positive integer or 'latest'")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        version = int(value)
        if version >= 1:
            return version
    raise ValueError(f"version must be a positive integer or 'latest', got {value!r}")


def _run_request_schema(schema: dict[str, Any]) -> None:
    """The document states what the validators check: a playbook named, a version that parses."""
    named = {"type": "string", "minLength": 1}
    # `path` wins over its alias `playbook_id` when both are present (even as null)
    schema["anyOf"] = [{"required": ["path"], "properties": {"path": named}},
                       {"required": ["playbook_id"], "properties": {"playbook_id": named},
                        "not": {"required": ["path"]}},
                       {"required": ["catalog_id"], "properties": {"catalog_id": named}}]
    schema["properties"]["playbook_id"] = {"type": "string", "title": "Playbook Id (alias of path)"}
    schema["properties"]["input_payload"] = {"anyOf": [{"type": "object"}, {"type": "null"}],
                                             "title": "Input Payload (alias of parameters)"}
    schema["properties"]["version"] = {"anyOf": [{"type": "integer", "minimum": 1},
                                                 {"type": "string", "pattern": r"^(latest|\s*0*[1-9][0-9]*\s*)?$"},
                                                 {"type": "null"}], "title": "Version"}


class RunRequest(BaseModel):
    """NoETL's body: `path` (alias `playbook_id`) or `catalog_id` ("path:version"), `version`,
    `parameters` (alias `input_payload`), `merge`. Other NoETL fields are accepted and ignored."""
    model_config = ConfigDict(extra="ignore", json_schema_extra=_run_request_schema)
    path: str | None = Field(None, validation_alias=AliasChoices("path", "playbook_id"))
    catalog_id: str | None = None
    version: int | str | None = None
    parameters: dict[str, Any] | None = Field(None, validation_alias=AliasChoices("parameters", "input_payload"))
    # NoETL's `merge`: our payload is always deep-merged over the playbook's workload (DSL §2), so both
    # values behave the same; the flag is accepted for compatibility.
    merge: bool = False
    # Client-chosen id (idempotent like an Idempotency-Key: see noetl_ingest.admission)
    execution_id: str | None = Field(None, pattern=EXECUTION_ID_PATTERN)

    @field_validator("version")
    @classmethod
    def _version(cls, value: Any) -> Any:
        parse_version(value)
        return value

    @model_validator(mode="after")
    def _target(self) -> "RunRequest":
        if not self.path and not self.catalog_id:
            raise ValueError("give the playbook: `path` (or `playbook_id`) or `catalog_id`")
        return self

    def target(self) -> tuple[str, int | None]:
        if self.path:
            return self.path, parse_version(self.version)
        path, _, version = (self.catalog_id or "").rpartition(":")
        if not path:
            raise LookupError(f"unknown catalog_id {self.catalog_id!r} (expected 'path:version')")
        return path, parse_version(version)


class CancelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field("cancelled by request", max_length=1000)


class CredentialRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.\-]+$")
    type: str = Field("generic", min_length=1, max_length=100,
                      validation_alias=AliasChoices("type", "credential_type"))
    data: dict[str, Any]
    description: str | None = Field(None, max_length=2000)


# ----------------------------------------------------------------------------------------------- catalog
async def register(ports: IngestPorts, req: RegisterRequest, principal: str | None = None) -> dict[str, Any]:
    text = req.text()
    playbook, problems = load_playbook(text, ports.caps)
    if playbook is None:
        errors = _errors(problems)
        raise Rejected(f"invalid playbook: {len(errors)} error(s)", errors)
    document = yaml.safe_load(text)
    entry = await ports.catalog.register(text, document, playbook.path, registered_by=principal)
    return {"status": "success", "message": f"registered {entry.path} version {entry.version}",
            "path": entry.path, "version": entry.version, "catalog_id": f"{entry.path}:{entry.version}",
            "kind": "Playbook",
            "warnings": [p.model_dump() for p in problems if p.severity != "error"]}


def _errors(problems: list[Any]) -> list[dict[str, Any]]:
    return [{"path": p.path, "line": p.line, "message": p.message} for p in problems if p.severity == "error"]


# ----------------------------------------------------------------------------------------------- executions
async def run(ports: IngestPorts, req: RunRequest, idempotency_key: str | None = None,
              principal: str | None = None) -> dict[str, Any]:
    """Resolve the playbook, validate it, submit the start. Returns before any step runs. With an
    Idempotency-Key or an execution_id, a retry gets the first answer (noetl_ingest.admission)."""
    scope = scope_of(check_key(idempotency_key), req.execution_id)
    request = req.model_dump(mode="json")
    digest = request_hash(request)
    if scope is not None:
        if ports.idempotency is None or ports.known is None:
            raise ValueError("this server does not take an Idempotency-Key or an execution_id")
        prior = await ports.idempotency.get(scope)
        if prior is not None:
            return await _again(ports, prior, digest)
    if ports.in_flight is not None:
        await ports.in_flight.admit()
    try:
        answer = await _start(ports, req, scope, request, digest, principal)
    except BaseException:
        if ports.in_flight is not None:
            ports.in_flight.release()
        raise
    if ports.in_flight is not None:
        ports.in_flight.accepted(answer["execution_id"])
    return answer


async def _start(ports: IngestPorts, req: RunRequest, scope: str | None, request: dict[str, Any],
                 digest: str, principal: str | None = None) -> dict[str, Any]:
    path, version = req.target()
    entry = await ports.catalog.get(path, version) if (version or 0) <= MAX_VERSION else None
    if entry is None:
        raise LookupError(f"playbook {path!r} {'version ' + str(version) if version else '(latest)'}"
                          " is not in the catalog")
    playbook, problems = load_playbook(entry.content, ports.caps)
    if playbook is None:
        errors = _errors(problems)
        raise Rejected(f"invalid playbook {entry.path} version {entry.version}: {len(errors)} error(s)", errors)
    now = ports.clock()
    execution_id = req.execution_id or ports.new_id()
    answer = {"execution_id": execution_id, "id": execution_id,
              "catalog_id": f"{entry.path}:{entry.version}", "path": entry.path, "playbook_id": entry.path,
              "playbook_name": playbook.name, "version": str(entry.version), "type": "playbook",
              "execution_type": "playbook", "status": "running", "timestamp": _iso(now), "start_time": None,
              "end_time": None, "progress": 0, "result": None, "error": None}
    if scope is not None:
        assert ports.idempotency is not None and ports.known is not None
        if req.execution_id is not None and await ports.known(execution_id):
            raise Conflict(f"execution_id {execution_id!r} already names another execution")
        prior = await ports.idempotency.claim(Claim(scope=scope, request_hash=digest, execution_id=execution_id,
                                                    request=request, answer=answer, created_at=now))
        if prior is not None:   # a concurrent request of the same scope recorded first
            return await _again(ports, prior, digest)
    await ports.submit(_start_message(ports, execution_id, now, entry, req.parameters or {}, principal))
    return answer


def _start_message(ports: IngestPorts, execution_id: str, now: float, entry: Any,
                   payload: dict[str, Any], principal: str | None = None) -> StartExecution:
    # principal: the caller, set by the API from its credential (docs/security.md), never from the body
    return StartExecution(execution_id=execution_id, time=now, playbook=entry.document, path=entry.path,
                          version=entry.version, payload=payload, lease_seconds=ports.lease_seconds,
                          lease_retries=ports.lease_retries, lease_retry_delay=ports.lease_retry_delay,
                          principal=principal, fact_key=new_fact_key())


async def _again(ports: IngestPorts, prior: Claim, digest: str) -> dict[str, Any]:
    """A request of a recorded scope: the same answer; the start sent again (same id) unless the execution
    is known, since the first request may have recorded it and then failed to submit it.

    The re-send is stamped now, not with the first request's `time`: the broker dead-letters a start whose
    record comes more than half its eviction grace after its `time` (a late duplicate), so a retry long
    after a failed submit would be answered 200 and never run. An unknown execution was never folded, or
    was folded so recently that the broker still holds it (eviction comes an hour after it *ends*, and the
    read model keeps every execution), so the fold drops this start as a duplicate then."""
    if prior.request_hash != digest:
        what = "Idempotency-Key" if prior.scope.startswith("key:") else "execution_id"
        raise Conflict(f"this {what} was used for another request (execution {prior.execution_id}); "
                       "a retry must send the same request")
    assert ports.known is not None
    if not await ports.known(prior.execution_id):
        path, version = prior.answer["path"], int(prior.answer["version"])
        entry = await ports.catalog.get(path, version)
        if entry is None:   # catalog versions are immutable; only a wiped catalog gets here
            raise LookupError(f"playbook {path!r} version {version} is no longer in the catalog")
        await ports.submit(_start_message(ports, prior.execution_id, ports.clock(), entry,
                                          prior.request.get("parameters") or {}))
    return prior.answer


async def cancel(ports: IngestPorts, execution_id: str, req: CancelRequest,
                 principal: str | None = None) -> dict[str, Any]:
    """Ask the fold to cancel. Asynchronous like everything the fold does: an execution already finished
    (or unknown) is left as it is; GET /api/executions/{id} shows the outcome."""
    await ports.submit(CancelExecution(execution_id=execution_id, time=ports.clock(), reason=req.reason,
                                       principal=principal))
    return {"execution_id": execution_id, "status": "cancel_requested", "reason": req.reason}


async def post_event(ports: IngestPorts, body: Any, principal: str | None = None,
                     role: str | None = None) -> dict[str, Any]:
    """An inbound message posted from outside: validated with the codec exactly as the fold decodes it.
    A fact counts only with its attempt's `token` (the fold drops it otherwise; docs/security.md "Forged
    facts"). A posted cancel needs the caller's role to hold `operator` (the route itself takes `worker`,
    which may post facts and nothing else), and records the caller as its principal (never the body's)."""
    if not isinstance(body, dict):
        raise DecodeError("the body must be a JSON object (an inbound message with `kind` and `execution_id`)")
    kind = body.get("kind")
    if kind in ("start", "timer_fired"):
        raise ValueError(f"kind {kind!r} cannot be posted here"
                         + (": use POST /api/executions/run" if kind == "start" else " (timers are internal)"))
    if kind == "cancel":
        if not allows(role, OPERATOR):
            raise PermissionError("a cancel needs the operator role (the worker role posts facts only)")
        body = {**body, "principal": principal}
    message = decode_inbound(json.dumps({**body, "time": body.get("time", ports.clock())}, default=str).encode(),
                             strict=True)
    await ports.submit(message)
    return {"status": "accepted", "kind": message.kind, "execution_id": message.execution_id}


# ----------------------------------------------------------------------------------------------- credentials
def _public(cred: Credential) -> dict[str, Any]:
    """A credential as the API shows it: never its data."""
    return {"id": cred.name, "name": cred.name, "type": cred.type, "description": cred.description,
            "meta": None, "tags": [], "created_at": _iso(cred.created_at), "updated_at": _iso(cred.updated_at)}


async def put_credential(ports: IngestPorts, req: CredentialRequest) -> dict[str, Any]:
    return _public(await ports.credentials.put(req.name, req.type, req.data, req.description))


MAX_PAGE = 1000      # the largest page any list route answers (docs/security.md, Limits)


async def list_credentials(ports: IngestPorts, type: str | None = None, q: str | None = None,
                           limit: int = 100, offset: int = 0) -> dict[str, Any]:
    """One page of the matching credentials (no secret data); `total` counts every match."""
    if not 1 <= limit <= MAX_PAGE or offset < 0:
        raise ValueError(f"limit must be 1..{MAX_PAGE} and offset at least 0")
    items = [c for c in await ports.credentials.list()
             if (type is None or c.type == type)
             and (not q or q.lower() in c.name.lower() or q.lower() in (c.description or "").lower())]
    return {"items": [_public(c) for c in items[offset:offset + limit]], "filter": {"type": type, "q": q},
            "total": len(items), "limit": limit, "offset": offset}


async def get_credential(ports: IngestPorts, name: str, include_data: bool = False) -> dict[str, Any]:
    if include_data:
        raise PermissionError("secret data is never returned over HTTP; only the worker that runs an action "
                              "resolves it (architecture invariant 7)")
    # from the list, which never decrypts anything
    cred = next((c for c in await ports.credentials.list() if c.name == name), None)
    if cred is None:
        raise LookupError(f"no credential named {name!r}")
    return _public(cred)


async def delete_credential(ports: IngestPorts, name: str) -> dict[str, Any]:
    if not await ports.credentials.delete(name):
        raise LookupError(f"no credential named {name!r}")
    return {"status": "deleted", "name": name}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")

