"""Execution state: everything the fold knows about one execution, serialisable to bytes.

The fold mutates the state it is given (it owns it for the duration of `advance`): copying a state with
thousands of iteration results on every message would make big iterators quadratic.
"""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field, PrivateAttr, ValidationError

from noetl_common.messages import DEFAULT_LEASE_RETRIES, DEFAULT_LEASE_RETRY_DELAY, ActionSpec

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

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

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
