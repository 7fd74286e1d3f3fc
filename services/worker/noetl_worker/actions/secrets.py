"""`type: secrets`: check that named secrets resolve, without ever putting their values in the result.

DSL §2.8 forbids secret values in results, events and logs, so this step cannot hand values to later
steps; later steps read them with `{{ secret.NAME }}` where they run. What the step is for: failing early
(and clearly) when a secret a playbook needs is missing. Its result is `{NAME: "***"}` for each name.
Names come from `name`, `names` or `secrets` (a string or a list), on the step or in its `data`.
"""
from __future__ import annotations

from typing import Any

from noetl_worker.actions.base import ActionError, ActionOutput, Invocation
from noetl_worker.credentials import REDACTED


def secret_names(config: dict[str, Any], data: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for source in (config, data):
        for key in ("name", "names", "secrets", "secret"):
            value = source.get(key)
            if isinstance(value, str):
                names.append(value)
            elif isinstance(value, list):
                names.extend(str(v) for v in value)
            elif isinstance(value, dict):       # {alias: NAME} reads well in YAML too
                names.extend(str(v) for v in value.values())
    return list(dict.fromkeys(n for n in names if n))


async def run(inv: Invocation) -> ActionOutput:
    names = secret_names(inv.config, inv.data)
    if not names:
        raise ActionError("a secrets step needs `name` or `names` (the secrets to check)")
    missing = await inv.secrets.check(names)
    if missing:
        hint = ", ".join(f"{n} (set NOETL_SECRET_{n.upper()} or store a credential named {n!r})" for n in missing)
        raise ActionError(f"secret not found: {hint}")
    return ActionOutput({n: REDACTED for n in names})
