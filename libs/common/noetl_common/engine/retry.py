"""Retry decisions (DSL §4): pure, with deterministic jitter so a replay decides the same way."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from noetl_common.dsl.models import RetryPolicy
from noetl_common.render import TemplateError, evaluate, this_view, truthy


@dataclass
class Decision:
    retry: bool
    delay: float = 0.0
    note: str | None = None            # why a policy expression could not decide


def decide(policy: RetryPolicy | None, attempt: int, command_id: str, error: str, status_code: int | None,
           result: Any, context: dict[str, Any]) -> Decision:
    if policy is None or attempt >= policy.max_attempts:
        return Decision(False)
    scope = {**context, "attempt": attempt, "max_attempts": policy.max_attempts, "error": error,
             "status_code": status_code, "success": False, "result": result, "data": result,
             "this": this_view(result, "FAILED", error)}
    for name, expr, retry_if in (("stop_when", policy.stop_when, False), ("retry_when", policy.retry_when, True)):
        if expr is None:
            continue
        try:
            if truthy(evaluate(expr, scope)) != retry_if:
                return Decision(False)
        except TemplateError as exc:
            return Decision(False, note=f"{name} '{expr}' failed: {exc}")
    delay = policy.delay_before(attempt + 1)
    if policy.jitter:
        delay *= 0.5 + _unit(command_id)
    return Decision(True, delay)


def _unit(seed: str) -> float:
    """A uniform-looking number in [0, 1) derived from the seed (no random module: replays must agree)."""
    return int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big") / 2**64
