"""The random secret of an execution from which the fold derives its attempt tokens
(noetl_common.attempt_tokens; docs/security.md "Forged facts"). Minted here, outside the pure core, by every
adapter that makes a StartExecution: the API (run), the embedded runtime (`noetl run`), a worker starting
a child playbook."""
from __future__ import annotations

import secrets


def new_fact_key() -> str:
    return secrets.token_urlsafe(32)   # 256 random bits
