"""Every message that crosses a boundary: inbound messages to the fold, commands to workers, events out.

The one place where these shapes are defined (architecture §1). All are versioned pydantic models; the
codec (`noetl_common.codec`) turns them into bytes and back. Time travels on the messages as epoch
seconds (`time`), so the fold never reads a clock.
"""
from __future__ import annotations

from base64 import b64decode
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from noetl_common.attempt_tokens import MAX_TOKEN

SCHEMA_VERSION = 1
DEFAULT_LEASE_RETRIES = 3           # infrastructure retries of an attempt whose lease expired (NOETL_LEASE_RETRIES)
DEFAULT_LEASE_RETRY_DELAY = 1.0     # seconds before the first of them, doubling (NOETL_LEASE_RETRY_DELAY)
MAX_LEASE_RETRIES = 100
MAX_LEASE_RETRY_DELAY = 3600.0

# An instant, epoch seconds, on a message from outside the fold: finite and within what a timestamp can show
# (year 9999). A `time` of NaN or 1e300 would otherwise reach the fold, which stamps events with it.
Epoch = Annotated[float, Field(ge=0, le=253_402_300_799)]
# A duration: finite and not negative (a NaN deadline would break every timer heap's order).
Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]

EventType = Literal[
    "execution_start", "step_started", "action_started", "action_completed", "action_error", "action_retry",
    "iteration_started", "iteration_completed", "iteration_failed", "iterator_completed", "step_completed",
    "step_failed", "step_skipped", "execution_complete", "execution_failed", "execution_cancelled",
]
TERMINAL_EVENTS = ("execution_complete", "execution_failed", "execution_cancelled")


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    v: int = SCHEMA_VERSION


# ---------------------------------------------------------------------------------------------------------
# Events (noetl.events): the canonical log of DSL §6, written only by the fold.
# ---------------------------------------------------------------------------------------------------------
class Event(_Msg):
    event_id: str                       # deterministic: derived from the cause
    execution_id: str
    parent_execution_id: str | None = None
    seq: int                            # position in the execution's log (total order, 0-based)
    event_type: EventType
    node_name: str                      # the step, or the playbook name for execution_* events
    node_type: str                      # playbook | step | task | iterator | iteration
    status: str                         # STARTED | RUNNING | COMPLETED | FAILED | RETRYING | CANCELLED
    timestamp: str                      # ISO-8601 UTC, from the message that caused it
    time: float                         # the same instant as epoch seconds
    result: Any = None
    error: str | None = None
    attempt: int | None = None
    current_index: int | None = None
    current_item: Any = None
    duration: float | None = None       # seconds
    command_id: str | None = None
    worker_id: str | None = None        # action_started/completed/error: the worker that ran the attempt
    meta: dict[str, Any] | None = None  # execution_start: path, version, workload, parent_step; logs; saves


# ---------------------------------------------------------------------------------------------------------
# Commands (noetl.commands.<pool>): one attempt of one step (or of one iteration), for a worker.
# ---------------------------------------------------------------------------------------------------------
class ActionSpec(_Msg):
    """What the worker runs. Everything the fold could render is rendered; the rest is listed in `deferred`."""
    type: str                            # python | http | postgres | duckdb | playbook | save | secrets
    data: dict[str, Any] = Field(default_factory=dict)     # rendered inputs
    config: dict[str, Any] = Field(default_factory=dict)   # rendered action keys (code is never rendered)
    auth: Any = None                     # rendered credential reference(s), never resolved secrets
    timeout: float | None = None
    assert_returns: list[str] = Field(default_factory=list)
    save: dict[str, Any] | None = None   # SaveSpec dump, templates unrendered (needs result/this)
    # Templates that need action-side names (`secret`, `uuid`): paths into {data, config, auth} whose
    # string values are still raw templates, each a list of keys (`noetl_common.paths`: a str is a mapping
    # key, dots and all; an int a list index). The worker renders them with `context` + secrets. A str is the
    # dotted text of commands and snapshots written before paths were structured (`paths.from_dotted`).
    deferred: list[list[str | int] | str] = Field(default_factory=list)
    context: dict[str, Any] = Field(default_factory=dict)  # the names deferred templates and `save` use
    # (a v10 pipeline: the names its tasks use, with the `ctx` map once: `workload` and `vars`, which are that
    # same map, are left out and bound again by the worker; engine/v10.ship_context, unship_context)


class Command(_Msg):
    command_id: str                      # f"{execution_id}:{step}:{visit}:{attempt}" (+ f":{index}" per item)
    execution_id: str
    parent_execution_id: str | None = None
    step: str
    visit: int
    attempt: int
    index: int | None = None             # iteration index for iterator tasks
    phase: Literal["action", "save"] = "action"   # "save": skip the action, save `result`
    result: Any = None                   # phase "save": the result to save
    pool: str = "default"
    action: ActionSpec
    time: float                          # when it was dispatched
    lease_seconds: float                 # the worker heartbeats well within this
    # The attempt's token (noetl_common.attempt_tokens): the worker sends it back with every fact about this
    # attempt; the fold drops facts without it. A credential: it never appears in an event.
    token: str | None = None


# ---------------------------------------------------------------------------------------------------------
# Inbound (noetl.requests + noetl.results): everything the fold consumes, keyed by execution_id. Times
# are checked here, at the boundary (Epoch, Seconds): a message with an impossible one is a dead letter.
# ---------------------------------------------------------------------------------------------------------
class StartExecution(_Msg):
    kind: Literal["start"] = "start"
    execution_id: str
    time: Epoch
    playbook: dict[str, Any]             # the playbook document as parsed YAML (the fold normalises it)
    path: str
    version: int | None = None
    payload: dict[str, Any] = Field(default_factory=dict)   # deep-merged over the playbook's workload
    parent_execution_id: str | None = None
    parent_command_id: str | None = None   # the parent's command that started this child
    parent_step: str | None = None
    return_step: str | None = None
    lease_seconds: Seconds = 30.0
    principal: str | None = None           # who started it (set by the API from the caller, never the body)
    # The secret the fold derives attempt tokens from (noetl_common.attempt_tokens): random, minted by the
    # adapter that makes the start, never shown (not in events, not in the read API). None: an execution
    # started by a version before tokens, whose facts are accepted without one.
    fact_key: str | None = Field(None, min_length=16, max_length=MAX_TOKEN)
    # A child's start: the token of the parent's command that started it, sent back on ChildFinished.
    parent_token: str | None = Field(None, max_length=MAX_TOKEN)
    # A lease lost to an infrastructure fault (the worker went silent) re-sends the same attempt this many
    # times, after lease_retry_delay × 2^(n-1) s, before the step's own `retry` policy counts it as a failure.
    lease_retries: int = Field(DEFAULT_LEASE_RETRIES, ge=0, le=MAX_LEASE_RETRIES)
    lease_retry_delay: float = Field(DEFAULT_LEASE_RETRY_DELAY, ge=0, le=MAX_LEASE_RETRY_DELAY, allow_inf_nan=False)


class CancelExecution(_Msg):
    kind: Literal["cancel"] = "cancel"
    execution_id: str
    time: Epoch
    reason: str = "cancelled"
    principal: str | None = None           # who cancelled it (set by the API from the caller)


class ActionStarted(_Msg):
    kind: Literal["action_started"] = "action_started"
    execution_id: str
    command_id: str
    time: Epoch
    worker_id: str | None = None
    token: str | None = Field(None, max_length=MAX_TOKEN)   # the command's token (attempt_tokens)


class ActionHeartbeat(_Msg):
    kind: Literal["heartbeat"] = "heartbeat"
    execution_id: str
    command_id: str
    time: Epoch
    token: str | None = Field(None, max_length=MAX_TOKEN)   # the command's token (attempt_tokens)


class ActionCompleted(_Msg):
    kind: Literal["action_completed"] = "action_completed"
    execution_id: str
    command_id: str
    time: Epoch
    result: Any = None                   # the unwrapped result (after assert.returns and save)
    started: Epoch | None = None         # set when no ActionStarted was sent (a quick attempt)
    worker_id: str | None = None         # who ran it (events carry it; a quick attempt sent no ActionStarted)
    saved: Any = None                    # rendered data of an `event` save
    variables: dict[str, Any] = Field(default_factory=dict)  # `save: {name: X}` variables
    log: str | None = None               # captured stdout/stderr (python)
    tasks: list[dict[str, Any]] | None = None   # v10 pipeline: one entry per task attempt (engine/v10.trail)
    # v10 pipeline stopped before a `playbook` task: {task, child: {path, version, return_step, input,
    # timeout}, state: what the rest of the pipeline resumes with} (engine/composition.py). `result` is unset.
    suspended: dict[str, Any] | None = None
    token: str | None = Field(None, max_length=MAX_TOKEN)   # the command's token (attempt_tokens)


class ActionFailed(_Msg):
    kind: Literal["action_failed"] = "action_failed"
    execution_id: str
    command_id: str
    time: Epoch
    error: str
    status_code: int | None = None       # http: visible to retry_when
    result: Any = None                   # what the failed attempt produced, if anything
    log: str | None = None
    started: Epoch | None = None         # set when no ActionStarted was sent (a quick attempt)
    worker_id: str | None = None         # who ran it; None when the fold itself failed the attempt (lease)
    tasks: list[dict[str, Any]] | None = None   # v10 pipeline: one entry per task attempt (engine/v10.trail)
    token: str | None = Field(None, max_length=MAX_TOKEN)   # the command's token (attempt_tokens)


class ChildStarted(_Msg):
    """A worker started the child execution of a `type: playbook` command; the parent now waits for it."""
    kind: Literal["child_started"] = "child_started"
    execution_id: str
    command_id: str
    child_execution_id: str
    time: Epoch
    token: str | None = Field(None, max_length=MAX_TOKEN)   # the command's token (attempt_tokens)


class ChildFinished(_Msg):
    """Emitted by the child's fold when it ends, addressed to the parent's key."""
    kind: Literal["child_finished"] = "child_finished"
    execution_id: str                    # the parent
    command_id: str                      # the parent's command that started the child
    child_execution_id: str
    status: Literal["COMPLETED", "FAILED", "CANCELLED"]
    result: Any = None                   # return_step's result, else the child's execution result
    error: str | None = None
    time: Epoch
    token: str | None = Field(None, max_length=MAX_TOKEN)   # the command's token (attempt_tokens)


class TimerFired(_Msg):
    kind: Literal["timer_fired"] = "timer_fired"
    execution_id: str
    timer: str                           # the key of the deadline in the state
    time: Epoch


Inbound = Annotated[
    Union[StartExecution, CancelExecution, ActionStarted, ActionHeartbeat, ActionCompleted, ActionFailed,
          ChildStarted, ChildFinished, TimerFired],
    Field(discriminator="kind"),
]


class DeadLetter(_Msg):
    """A record that could not be decoded or validated (noetl.dlq), kept byte for byte with the reason."""
    kind: Literal["dead_letter"] = "dead_letter"
    source_topic: str
    source_partition: int | None = None
    source_offset: int | None = None
    key: str | None = None              # the original key, base64 (keys are bytes too)
    value: str                          # the original value, base64: never re-encoded, so nothing is lost
    reason: str
    time: float                         # when it was dead-lettered, epoch seconds
    timestamp: str                      # the same instant, ISO-8601 UTC

    def original_value(self) -> bytes:
        return b64decode(self.value)

    def original_key(self) -> bytes | None:
        return None if self.key is None else b64decode(self.key)
