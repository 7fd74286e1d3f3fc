"""`type: python` (DSL §2.1): `main(...)` of the step's `code`, run in the worker's process pool.

The pool does the binding, the capture of stdout/stderr and the JSON check inside the child process; this
module only maps its outcome onto the action contract.
"""
from __future__ import annotations

from noetl_worker.actions.base import ActionError, ActionOutput, Invocation


async def run(inv: Invocation) -> ActionOutput:
    code = inv.config.get("code")
    if not isinstance(code, str) or not code.strip():
        raise ActionError("python step has no `code`")
    return await run_code(inv, code, inv.data)


async def run_code(inv: Invocation, code: str, data: dict) -> ActionOutput:
    """Shared with the python save (`main(data)`)."""
    pool = inv.ports.python_pool
    if pool is None:
        raise ActionError("this worker has no python pool, so it cannot run python code")
    outcome = await pool.run(code, data, inv.timeout)
    if not outcome.ok:
        raise ActionError(outcome.error or "python code failed", log=outcome.log or None)
    return ActionOutput(outcome.result, outcome.log or None)
