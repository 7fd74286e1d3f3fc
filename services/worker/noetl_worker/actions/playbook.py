"""`type: playbook` (DSL §2.5): start the child execution; the parent's fold then waits for it.

The worker only starts the child: it emits StartExecution (routed to the child's own key) and
ChildStarted (to the parent's), and reports no ActionCompleted, because the step's result is the child's
(ChildFinished, emitted by the child's fold). The child id is derived from the parent's command id, so a
redelivered command starts the same child again and the child's fold drops the duplicate start.
"""
from __future__ import annotations

import time
import uuid

from noetl_common.messages import ChildStarted, StartExecution
from noetl_runtime.fact_keys import new_fact_key

from noetl_worker.actions.base import ActionError, Invocation

# Fixed namespace: child ids must be the same on every worker, in every process, forever.
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "noetl:child-execution")


def child_execution_id(command_id: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, command_id))


async def start_child(inv: Invocation) -> str:
    """Emit the child's start; return its execution id."""
    cmd, config = inv.cmd, inv.config
    path = config.get("path")
    if not path or not isinstance(path, str):
        raise ActionError("a playbook step needs `path` (the child playbook's catalog path)")
    version = _version(config.get("version"))
    catalog = inv.ports.catalog
    if catalog is None:
        raise ActionError("this worker has no catalog, so it cannot start child playbooks")
    entry = await catalog.get(path, version)
    if entry is None:
        at = f" version {version}" if version is not None else ""
        raise ActionError(f"playbook {path!r}{at} not found in the catalog")
    child_id = child_execution_id(cmd.command_id)
    now = time.time()
    # Secret values rendered into `data` would land in the child's events: the child reads its
    # secrets itself, where it runs.
    payload = inv.secrets.redact(dict(inv.data))
    await inv.ports.emit(StartExecution(
        execution_id=child_id, time=now, playbook=entry.document, path=entry.path, version=entry.version,
        payload=payload, parent_execution_id=cmd.execution_id, parent_command_id=cmd.command_id,
        parent_step=cmd.step, return_step=config.get("return_step") or None,
        lease_seconds=cmd.lease_seconds, fact_key=new_fact_key(), parent_token=cmd.token))
    await inv.ports.emit(ChildStarted(execution_id=cmd.execution_id, command_id=cmd.command_id,
                                      child_execution_id=child_id, time=now, token=cmd.token))
    return child_id


def _version(value: object) -> int | None:
    if value in (None, "", "latest"):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise ActionError(f"playbook version must be a catalog version number (1, 2, ...) or 'latest', "
                      f"got {value!r}")
