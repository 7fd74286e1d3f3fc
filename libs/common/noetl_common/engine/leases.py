"""Lease rules both runtimes share: a lease measures a worker, never the runtime that keeps it.

- A lease that expires means the worker went silent (it died, or lost the bus): an infrastructure fault.
  The fold re-sends the same attempt (same command id) up to `lease_retries` times, after
  `infra_retry_delay`, before the step's own `retry` policy sees a failure (fold._lease_lost).
- A runtime that was away (a broker restart or rebalance, an embedded server restart) could not hear the
  workers meanwhile: it fires a recovered lease no sooner than one lease after it is back
  (`recovered_fire_time`), so the heartbeats and results that waited for it are folded first.
"""
from __future__ import annotations

LEASE_GRACE = 5.0          # seconds a worker gets beyond a step timeout before the fold declares the attempt lost
MAX_INFRA_RETRY_DELAY = 60.0   # the doubling of the infrastructure retry delay stops here
LEASE = "lease:"           # timer key prefixes (the rest is the command id)
RESEND = "resend:"


def infra_retry_delay(base: float, retry: int) -> float:
    """Seconds before infrastructure retry `retry` (1, 2, ...): base, 2 × base, 4 × base, ... capped."""
    return min(base * 2.0 ** (retry - 1), max(base, MAX_INFRA_RETRY_DELAY))


def recovered_fire_time(key: str, due: float, lease_seconds: float, now: float) -> float:
    """When a runtime that just recovered a deadline from a snapshot should fire it.

    A lease deadline is held back to one lease after the recovery: the workers' heartbeats and results
    produced while the runtime was away are still waiting to be folded (on noetl.results), and they move
    or clear the deadline, so a healthy worker is never failed for the runtime's own absence. The deadline
    in the state is untouched (the fold still compares the TimerFired with it). Other deadlines (retry
    delays, infrastructure re-sends) measure no worker and fire when due.
    """
    if key.startswith(LEASE):
        return max(due, now + lease_seconds)
    return due
