"""Run one command (one attempt of one step or iteration) and report what happened.

`execute` is the whole worker contract: ActionStarted, heartbeats while it runs, then exactly one of
ActionCompleted / ActionFailed, or, for `type: playbook`, StartExecution + ChildStarted (the parent's fold
then waits for the child). It never raises: whatever goes wrong becomes ActionFailed with a message naming
the cause, because an exception here would leave the fold waiting for a lease to expire instead of
telling the user what broke. Only cancellation (the worker shutting down) propagates, so the runtime
can stop; the fold's lease then retries the attempt elsewhere.

Secret values are resolved here and nowhere else, and every outgoing message is redacted (invariant 7).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from noetl_common import paths
from noetl_common.messages import (ActionCompleted, ActionFailed, ActionHeartbeat, ActionStarted,
                                   Command)
from noetl_common.render import TemplateError, missing_paths, unwrap
from pydantic import BaseModel

from noetl_worker._python_child import CUT_MARKER, first_unserialisable
from noetl_worker.actions import duckdb as duckdb_action
from noetl_worker.actions import http as http_action
from noetl_worker.actions import pipeline as pipeline_action
from noetl_worker.actions import postgres as postgres_action
from noetl_worker.actions import python as python_action
from noetl_worker.actions import secrets as secrets_action
from noetl_worker.actions.base import ActionError, ActionOutput, Invocation
from noetl_worker.actions.playbook import child_execution_id, start_child
from noetl_worker.actions.save import run_save, spec_from_step
from noetl_worker.credentials import Secrets
from noetl_worker.ports import WorkerPorts
from noetl_worker.python_pool import format_seconds

__all__ = ["execute", "child_execution_id", "WorkerPorts"]

log = logging.getLogger("noetl.worker")

ACTIONS: dict[str, Callable[[Invocation], Awaitable[ActionOutput]]] = {
    "python": python_action.run,
    "http": http_action.run,
    "postgres": postgres_action.run,
    "duckdb": duckdb_action.run,
    "secrets": secrets_action.run,
    "pipeline": pipeline_action.run,
}


@dataclass
class _Done:
    result: Any
    saved: Any = None
    variables: dict[str, Any] | None = None
    log: str | None = None
    tasks: list[dict[str, Any]] | None = None   # v10 pipeline: its task attempts
    suspended: dict[str, Any] | None = None     # v10 pipeline stopped before a playbook task


class _ChildStarted:
    """The attempt handed its step to a child execution: nothing more to report."""


async def execute(cmd: Command, ports: WorkerPorts) -> None:
    secrets = Secrets(ports.credentials, ports.env)
    started = time.time()
    # A quick attempt reports once: its ActionCompleted/ActionFailed carries `started`, which saves the fold
    # a whole round (a transaction) per step. A slower one announces itself after ports.announce_after so its
    # lease starts; a child playbook announces at once (the parent then waits on the child).
    announce = _Announce(cmd, ports, started)
    if cmd.action.type == "playbook" and cmd.phase == "action":
        await announce.now()
    else:
        announce.later(ports.announce_after)
    beating = _Heartbeat(cmd, ports) if cmd.lease_seconds > 0 else None
    try:
        message = await _run(cmd, ports, secrets)
    finally:
        announce.stop()
        if beating is not None:
            beating.stop()
    if message is not None:
        update: dict[str, Any] = {"worker_id": ports.worker_id}
        if not announce.sent:
            update["started"] = started
        await _deliver(ports, message.model_copy(update=update))


class _Announce:
    """Sends ActionStarted after `delay` unless the attempt has ended by then."""

    def __init__(self, cmd: Command, ports: WorkerPorts, started: float) -> None:
        self.message = ActionStarted(execution_id=cmd.execution_id, command_id=cmd.command_id, time=started,
                                     worker_id=ports.worker_id, token=cmd.token)
        self.ports = ports
        self.sent = False
        self.task: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None

    async def now(self) -> None:
        self.sent = True
        await _deliver(self.ports, self.message)

    def later(self, delay: float) -> None:
        self.timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self.sent = True
        self.task = asyncio.get_running_loop().create_task(_deliver(self.ports, self.message))

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()


def attempt_timeout(cmd: Command) -> float | None:
    """`timeout` bounds one attempt (DSL §4); http has its own default of 30 s (§2.2)."""
    if cmd.action.timeout is not None and cmd.action.timeout > 0:
        return cmd.action.timeout
    if cmd.action.type == "http" and cmd.phase == "action":
        return http_action.DEFAULT_TIMEOUT
    return None


async def _run(cmd: Command, ports: WorkerPorts, secrets: Secrets) -> ActionCompleted | ActionFailed | None:
    timeout = attempt_timeout(cmd)
    inv = Invocation(cmd=cmd, type=cmd.action.type, data=dict(cmd.action.data),
                     config=dict(cmd.action.config), auth=cmd.action.auth, timeout=timeout,
                     ports=ports, secrets=secrets)
    try:
        async with asyncio.timeout(timeout) as deadline:
            done = await _attempt(inv)
    except TimeoutError as exc:
        if deadline.expired():
            return _failed(inv, f"timed out after {format_seconds(timeout or 0)}s")
        return _failed(inv, f"{type(exc).__name__}: {exc}" if str(exc) else "TimeoutError")
    except ActionError as exc:
        failed = _failed(inv, str(exc), exc.status_code, exc.result, exc.log)
        tasks = getattr(exc, "tasks", None)   # a v10 pipeline's task attempts
        return failed.model_copy(update={"tasks": inv.secrets.redact(tasks)}) if tasks else failed
    except Exception as exc:
        log.debug("action %s of %s raised", cmd.action.type, cmd.command_id, exc_info=True)
        # Not an expected failure: its traceback goes into the attempt's log (redacted like the rest).
        return _failed(inv, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__,
                       log_text="".join(traceback.format_exception(exc)))
    if isinstance(done, _ChildStarted):
        return None
    return ActionCompleted(
        execution_id=cmd.execution_id, command_id=cmd.command_id, time=time.time(), token=cmd.token,
        result=secrets.redact(done.result), saved=secrets.redact(done.saved),
        variables=secrets.redact(done.variables or {}), log=_join_log(done.log, inv),
        tasks=secrets.redact(done.tasks) if done.tasks else None,
        suspended=secrets.redact(done.suspended) if done.suspended is not None else None)


async def _attempt(inv: Invocation) -> _Done | _ChildStarted:
    cmd = inv.cmd
    if cmd.action.deferred and cmd.phase == "action":   # a save phase does not run the action's inputs
        await _render_deferred(inv)
    if cmd.phase == "save" or inv.type == "save":
        output = ActionOutput(cmd.result)
    elif inv.type == "playbook":
        await start_child(inv)
        return _ChildStarted()
    else:
        action = ACTIONS.get(inv.type)
        if action is None:
            raise ActionError(f"unknown action type {inv.type!r} (python, http, postgres, duckdb, playbook, "
                              f"save, secrets)")
        output = await action(inv)

    if inv.type == "pipeline":   # NoETL DSL v10: results are stored as returned (V10-6.2), ctx patches
        return _Done(output.result, variables=getattr(output, "variables", None) or None, log=output.log,
                     tasks=getattr(output, "tasks", None) or None, suspended=getattr(output, "suspended", None))
    result = unwrap(output.result)
    try:
        json.dumps(result, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        why = first_unserialisable(result, "result") or str(exc)
        raise ActionError(f"result is not JSON-serialisable: {why}", log=output.log) from exc
    missing = missing_paths(result, cmd.action.assert_returns)
    if missing:
        raise ActionError(f"assert.returns failed: the result has no {', '.join(missing)}",
                          result=result, log=output.log)

    spec = cmd.action.save if cmd.action.save is not None else (
        spec_from_step(inv) if inv.type == "save" else None)
    if spec is None:
        return _Done(result, log=output.log)
    try:
        saved = await run_save(spec, result, inv)
    except ActionError as exc:
        raise ActionError(str(exc), status_code=exc.status_code, result=result,
                          log=_concat(output.log, exc.log)) from exc
    try:
        json.dumps([saved.saved, saved.variables], allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ActionError(f"saved data is not JSON-serialisable: {exc}", result=result) from exc
    if inv.type == "save" and cmd.phase == "action":
        result = saved.report      # a save step's own result says what it wrote where
    return _Done(result, saved.saved, saved.variables, output.log)


# --- deferred templates ----------------------------------------------------------------------------
async def _render_deferred(inv: Invocation) -> None:
    """Render the templates the fold could not (they read `secret`, `uuid`, ...), path by path, with the
    fold's own walker (noetl_common.paths: a path is a list of keys, so a key may hold dots).

    Containers along each path are copied, never mutated: the Command's own dicts must not end up
    holding secret values (the runtime may log or re-send it)."""
    root: dict[str, Any] = {"data": inv.data, "config": inv.config, "auth": inv.auth}
    context = inv.cmd.action.context
    for path in inv.cmd.action.deferred:
        try:
            if isinstance(path, str):   # a command of an older fold: dotted text
                path = paths.from_dotted(path, root)
            template = paths.lookup(root, path)
            root = paths.replace(root, path, await inv.secrets.render(template, context, inv.cmd.time))
        except paths.PathError as exc:
            raise ActionError(f"deferred template: {exc} in the action") from exc
        except TemplateError as exc:
            raise ActionError(f"cannot render {paths.text(path)}: {exc}") from exc
    inv.data, inv.config, inv.auth = root["data"], root["config"], root["auth"]


# --- reporting ---------------------------------------------------------------------------------------
def _failed(inv: Invocation, error: str, status_code: int | None = None, result: Any = None,
            log_text: str | None = None) -> ActionFailed:
    s = inv.secrets
    return ActionFailed(execution_id=inv.cmd.execution_id, command_id=inv.cmd.command_id, time=time.time(),
                        token=inv.cmd.token, error=s.redact(error), status_code=status_code, result=s.redact(result),
                        log=_join_log(log_text, inv))


def _concat(*parts: str | None) -> str | None:
    present = [p for p in parts if p]
    if len(present) <= 1:
        return present[0] if present else None    # a lone log is kept byte for byte
    return "\n".join(p.rstrip("\n") for p in present) + "\n"


_CUT = re.compile(re.escape(CUT_MARKER).replace(re.escape("{}"), r"\d+"))


def _join_log(action_log: str | None, inv: Invocation) -> str | None:
    """The attempt's log (the action's output, then worker notes): redacted first, then bounded to
    NOETL_STEP_LOG_MAX_BYTES (its start and its end), so a cut never splits a secret that then escapes
    redaction. Output the python pool already cut is redacted around the cut as well."""
    text = _concat(action_log, *inv.notes)
    if text is None:
        return None
    # NUL as U+FFFD: Postgres text cannot hold it (the projector would replace it), so both modes keep the same.
    text = text.replace("\x00", "\ufffd")
    cut = _CUT.search(text)
    text = inv.secrets.redact_cut(text, cut.group(0)) if cut else inv.secrets.redact(text)
    return bounded(text, inv.ports.step_settings.log_max_bytes)


def bounded(text: str, limit: int) -> str:
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit + 128:   # the pool's own cut (limit + its marker) is not cut again
        return text
    half = limit // 2
    dropped = len(raw) - 2 * half
    return (raw[:half].decode("utf-8", "ignore") + CUT_MARKER.format(dropped)
            + raw[-half:].decode("utf-8", "ignore"))


class _Heartbeat:
    """ActionHeartbeat every lease/3 while the attempt runs. A timer, not a task: most attempts end long
    before the first beat, and a timer costs far less to set up and cancel than a task."""

    def __init__(self, cmd: Command, ports: WorkerPorts) -> None:
        self.cmd, self.ports = cmd, ports
        self.interval = cmd.lease_seconds / 3
        self.loop = asyncio.get_running_loop()
        self.sending: asyncio.Task | None = None
        self.timer = self.loop.call_later(self.interval, self._beat)

    def _beat(self) -> None:
        if self.sending is None or self.sending.done():   # never pile up beats behind a slow emit
            self.sending = self.loop.create_task(self._send())
        self.timer = self.loop.call_later(self.interval, self._beat)

    async def _send(self) -> None:
        try:
            await self.ports.emit(ActionHeartbeat(execution_id=self.cmd.execution_id, command_id=self.cmd.command_id,
                                                  time=time.time(), token=self.cmd.token))
        except Exception:   # a missed beat is survivable: the lease has two more before it expires
            log.warning("heartbeat for %s could not be sent", self.cmd.command_id, exc_info=True)

    def stop(self) -> None:
        self.timer.cancel()
        if self.sending is not None and not self.sending.done():
            self.sending.cancel()


async def _deliver(ports: WorkerPorts, message: BaseModel) -> None:
    try:
        await ports.emit(message)
    except Exception as exc:
        log.error("could not emit %s", type(message).__name__, exc_info=True)
        if isinstance(message, ActionFailed) and message.log:
            # The captured output may be what the transport refused (a large log of control characters
            # grows when JSON-escaped): the failure itself still reaches the fold, with a note instead.
            with contextlib.suppress(Exception):
                await ports.emit(message.model_copy(update={
                    "log": f"(the attempt's output could not be reported: {type(exc).__name__}: {exc})"}))
        elif isinstance(message, ActionCompleted):
            # The result itself may be what the transport refused: still tell the fold the attempt ended.
            with contextlib.suppress(Exception):
                await ports.emit(ActionFailed(
                    execution_id=message.execution_id, command_id=message.command_id, time=time.time(),
                    error=f"the result could not be reported: {type(exc).__name__}: {exc}", started=message.started,
                    worker_id=message.worker_id, token=message.token))
