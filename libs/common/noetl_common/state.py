"""Execution state: everything the fold knows about one execution, serialisable to bytes.

The fold mutates the state it is given (it owns it for the duration of `advance`): copying a state with
thousands of iteration results on every message would make big iterators quadratic.
"""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, ValidationError

from noetl_common.caps import DEFAULT_MAX_ITERATOR_ITEMS, DEFAULT_MAX_VISITS, Caps
from noetl_common.messages import DEFAULT_LEASE_RETRIES, DEFAULT_LEASE_RETRY_DELAY, ActionSpec
from noetl_common.pipeline_result import is_compact

_PLAYBOOK = frozenset({"playbook"})
StepStatus = Literal["running", "retry_wait", "completed", "failed", "cancelled"]
ExecutionStatus = Literal["RUNNING", "COMPLETED", "FAILED", "CANCELLED"]


class Work(BaseModel):
    """One attempt in flight: a command sent to a worker (or a child execution it started)."""
    command_id: str
    step: str
    visit: int
    attempt: int
    index: int | None = None           # iteration index
    phase: Literal["action", "save"] = "action"
    dispatched: float
    started: float | None = None       # ActionStarted seen
    worker_id: str | None = None       # who started it (ActionStarted), for the explainer
    heartbeat: float | None = None     # the last ActionHeartbeat's time, for the explainer
    child_execution_id: str | None = None
    infra_retries: int = 0             # times this attempt was re-sent because its lease expired
    result: Any = None                 # phase "save": the result being saved (kept for redelivery)
    # A v10 pipeline split at `playbook` tasks (engine/composition.py): `part` numbers the commands of one
    # attempt (0: the first segment; odd: a child playbook; even > 0: a continuation), `resume` holds the
    # pipeline state they carry (folded state, so it survives snapshots and restarts).
    part: int = 0
    resume: dict[str, Any] | None = None


class IteratorRun(BaseModel):
    items: list[Any]                   # after where → order_by → limit → chunk
    next_index: int = 0                # next item to dispatch
    results: dict[int, Any] = Field(default_factory=dict)
    attempts: dict[int, int] = Field(default_factory=dict)   # current attempt per in-flight/waiting item
    actions: dict[int, ActionSpec] = Field(default_factory=dict)  # rendered task per unfinished item (retries reuse it)
    failed: dict[int, str] = Field(default_factory=dict)
    retry_wait: list[int] = Field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.items)


class StepRun(BaseModel):
    """The latest visit of a step."""
    status: StepStatus
    visit: int
    attempt: int = 1
    started: float
    data: dict[str, Any] = Field(default_factory=dict)   # rendered inputs of this visit
    action: ActionSpec | None = None   # rendered action of this visit (retries reuse it)
    iteration: IteratorRun | None = None
    result: Any = None
    error: str | None = None


class Pending(BaseModel):
    """A step targeted by at least one fired edge and not yet dispatched (a join waits here)."""
    arrivals: list[dict[str, Any]] = Field(default_factory=list)   # rendered edge data, arrival order


class ExecutionState(BaseModel):
    execution_id: str
    path: str
    version: int | None = None
    playbook: dict[str, Any]           # the document as submitted; normalised lazily (see `compiled`)
    workload: dict[str, Any]
    parent_execution_id: str | None = None
    parent_command_id: str | None = None
    parent_step: str | None = None
    return_step: str | None = None
    # The secret attempt tokens derive from (noetl_common.attempt_tokens; None: started before tokens) and,
    # for a child, the token of the parent's command, which ChildFinished carries back. Never in an event.
    fact_key: str | None = None
    parent_token: str | None = None
    lease_seconds: float = 30.0
    lease_retries: int = DEFAULT_LEASE_RETRIES          # infrastructure retries per attempt (see fold._lease_lost)
    lease_retry_delay: float = DEFAULT_LEASE_RETRY_DELAY
    # The operator's caps this execution started under (noetl_common.caps: recorded by the fold at the start,
    # so a restart or a replay with other settings decides the same way). Older snapshots: the old constants.
    max_visits_cap: int = DEFAULT_MAX_VISITS
    max_iterator_items: int = DEFAULT_MAX_ITERATOR_ITEMS
    status: ExecutionStatus = "RUNNING"
    started: float
    finished: float | None = None
    seq: int = 0                       # next event position
    results: dict[str, Any] = Field(default_factory=dict)     # latest completed visit's result per step
    variables: dict[str, Any] = Field(default_factory=dict)   # save: {name: X}
    steps: dict[str, StepRun] = Field(default_factory=dict)
    active: set[str] = Field(default_factory=set)   # steps running or waiting to retry (kept by set_status)
    pending: dict[str, Pending] = Field(default_factory=dict)  # insertion order = arrival order
    work: dict[str, Work] = Field(default_factory=dict)        # by command_id
    timers: dict[str, float] = Field(default_factory=dict)     # durable deadlines: key -> due (epoch s)
    result: Any = None                 # the execution result (rendered at `end`)
    error: str | None = None
    # v10 executor.spec.final_step (V10-1.8): a step failed, so no new step starts; the steps in flight finish,
    # then the final step runs and the execution ends FAILED with `error`.
    winding_down: bool = False

    _compiled: Any = PrivateAttr(default=None)
    # (the playbook dict, its JSON): the document never changes after start (nothing assigns into it), yet
    # re-encoding it was half of every snapshot's cost (a snapshot per fold batch, about one per step). Keyed by the dict's
    # identity, so a state given another playbook re-encodes; a state read back from bytes starts empty.
    _playbook_json: Any = PrivateAttr(default=None)
    # (the results dict, the names of its compact values: pipeline_result): a v10 render context views those,
    # and finding them by a pass over every result on every message made a long chain quadratic. Kept by
    # `set_result`; rebuilt when `results` is another dict (a state read back from bytes starts empty).
    _compact: Any = PrivateAttr(default=None)

    @property
    def caps(self) -> Caps:
        """The caps this execution was started under, as the loader takes them (no step maximums: the fold
        runs no step; the workers judge those)."""
        return Caps(self.max_visits_cap, self.max_iterator_items)

    @property
    def terminal(self) -> bool:
        return self.status != "RUNNING"

    def active_steps(self) -> set[str]:
        """Steps dispatched, running or waiting to retry (pending ones are tracked in `pending`)."""
        return self.active

    def set_status(self, name: str, status: StepStatus) -> None:
        self.steps[name].status = status
        if status in ("running", "retry_wait"):
            self.active.add(name)
        else:
            self.active.discard(name)

    def set_result(self, name: str, result: Any) -> None:
        """A step's latest result (the fold writes results only through here, so `compact_results` holds)."""
        self.results[name] = result
        memo = self._compact
        if memo is not None and memo[0] is self.results:
            if is_compact(result):
                memo[1].add(name)
            else:
                memo[1].discard(name)

    def compact_results(self) -> set[str]:
        """The names of the results stored in a pipeline's compact form."""
        memo = self._compact
        if memo is None or memo[0] is not self.results:
            memo = self._compact = (self.results, {k for k, v in self.results.items() if is_compact(v)})
        return memo[1]

    def to_bytes(self) -> bytes:
        """The same bytes as `model_dump_json()`, with the playbook's encoding reused (see _playbook_json)."""
        return self.join_snapshot(*self.snapshot_parts())

    def snapshot_parts(self) -> tuple[bytes, bytes]:
        """The snapshot in two parts: everything but the playbook, and the `"playbook":{...}` member. The second
        is the same bytes object for every snapshot of this state (the document never changes after start), so
        a store may keep it once per execution instead of in every snapshot (noetl_runtime.sqlite_store)."""
        cached = self._playbook_json
        if cached is None or cached[0] is not self.playbook:
            whole = self.model_dump_json(include=_PLAYBOOK)          # {"playbook":...}
            cached = self._playbook_json = (self.playbook, whole[1:-1].encode())
        return self.model_dump_json(exclude=_PLAYBOOK).encode(), cached[1]

    @staticmethod
    def join_snapshot(rest: bytes, playbook: bytes) -> bytes:
        """The whole snapshot from its `snapshot_parts`."""
        # "playbook" sits between "version" and "workload" (field order); `,"workload":` cannot occur
        # earlier: execution_id, path and version are strings or a number, where a quote is escaped.
        at = rest.index(b',"workload":')
        return b"".join((rest[:at], b",", playbook, rest[at:]))

    @classmethod
    def from_bytes(cls, raw: bytes) -> ExecutionState:
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            # pydantic's JSON reader stops at 200 levels, its writer at 255: a snapshot holding a value nested
            # 195+ deep (a worker's result) is written but not read back. Python's reader goes deeper.
            if "recursion limit" not in str(exc):
                raise
            return cls.model_validate(json.loads(raw))
