"""The broker's counters, served as Prometheus text on /metrics (and read by the benchmark)."""
from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Any


@dataclass
class Metrics:
    batches: int = 0
    inbound: int = 0            # records taken from requests + results
    folded: int = 0             # of those, messages that reached advance()
    stale: int = 0              # of those, duplicates / out of date (changed nothing)
    forged_facts: int = 0       # of the stale: facts without their attempt's token (docs/security.md)
    dead_letters: int = 0
    fold_errors: int = 0        # executions failed (or quarantined) because folding one of their messages raised
    quarantined: int = 0        # of those, the ones that could not even be failed normally
    events: int = 0
    commands: int = 0
    requests: int = 0           # messages the fold addressed to other executions (child finished, cancel)
    timers_fired: int = 0
    states_written: int = 0
    executions_finished: int = 0
    evicted: int = 0            # finished states removed from the table after NOETL_BROKER_EVICT_AFTER
    batch_seconds: float = 0.0  # time the agent spent on batches (fold, encode, queue the effects)
    fold_seconds: float = 0.0   # of which: apply_batch (decode, advance, serialise states)
    effects_seconds: float = 0.0  # committer: waiting for the effects' acks
    states_seconds: float = 0.0   # committer: producing the snapshots to the changelog, acks included
    batches_durable: int = 0    # batches whose effects and snapshots Kafka acknowledged (records then acked)
    durable_latency_seconds: float = 0.0   # summed: fold start -> batch durable
    first_batch_at: float = 0.0  # wall clock, epoch seconds
    last_batch_at: float = 0.0
    last_durable_at: float = 0.0
    last_batch_size: int = 0
    last_batch_wait: float = 0.0   # seconds the oldest record of the last batch waited (fold start - its timestamp)
    last_effects_ack: float = 0.0  # seconds from the last batch's fold start to its effects' acks

    _HELP = {
        "batches": "inbound batches processed", "inbound": "inbound records taken",
        "folded": "inbound messages folded", "stale": "folded messages that were duplicates or out of date",
        "forged_facts": "facts dropped because they did not carry their attempt's token",
        "dead_letters": "records sent to the dead-letter topic", "events": "events produced",
        "fold_errors": "executions failed because folding one of their messages raised",
        "quarantined": "executions quarantined: not even failing them normally was possible",
        "commands": "commands produced", "requests": "requests produced for other executions",
        "timers_fired": "timer_fired requests produced", "states_written": "execution snapshots written",
        "executions_finished": "executions that reached a terminal status",
        "evicted": "finished execution states evicted from the table",
        "batch_seconds": "seconds spent processing batches",
        "fold_seconds": "seconds spent folding (decode, advance, serialise)",
        "effects_seconds": "seconds the committer waited for the effects' acks",
        "states_seconds": "seconds spent producing snapshots to the changelog, acks included",
        "batches_durable": "batches whose effects and snapshots were acknowledged",
        "durable_latency_seconds": "seconds from a batch's fold to its durability, summed",
        "first_batch_at": "epoch seconds of the first batch", "last_batch_at": "epoch seconds of the last batch",
        "last_durable_at": "epoch seconds when the last batch became durable",
        "last_batch_size": "records in the last batch",
        "last_batch_wait": "seconds the oldest record of the last batch waited before its fold began",
        "last_effects_ack": "seconds from the last batch's fold start to its effects' acknowledgement",
    }

    def folded_batch(self, out: Any, size: int, started: float, t0: float, t1: float) -> None:
        """Count a folded batch (`out`: its batch.BatchOutput; t0, t1: perf_counter around the fold)."""
        self.folded += out.folded
        self.stale += out.stale
        self.forged_facts += out.forged
        self.dead_letters += len(out.dead_letters)
        self.fold_errors += len(out.failures)
        self.quarantined += sum(1 for f in out.failures if f.quarantined)
        self.events += len(out.events)
        self.commands += len(out.commands)
        self.requests += len(out.requests)
        self.states_written += len(out.states)
        self.executions_finished += len(out.terminal)
        self.fold_seconds += t1 - t0
        self.batch(size, started, time.perf_counter() - t0)

    def batch(self, size: int, started: float, spent: float) -> None:
        self.batches += 1
        self.inbound += size
        self.batch_seconds += spent
        self.last_batch_size = size
        if not self.first_batch_at:
            self.first_batch_at = started
        self.last_batch_at = time.time()

    def prometheus(self, gauges: dict[str, tuple[str, float]] | None = None) -> str:
        lines: list[str] = []
        for f in fields(self):
            if f.name.startswith("_"):
                continue
            counter = f.name in ("batches", "inbound", "folded", "stale", "forged_facts", "dead_letters", "fold_errors",
                                 "quarantined", "events", "commands",
                                 "requests", "timers_fired", "states_written", "executions_finished", "evicted",
                                 "batch_seconds", "fold_seconds", "effects_seconds", "states_seconds",
                                 "batches_durable", "durable_latency_seconds")
            name = f"noetl_broker_{f.name}" + ("_total" if counter else "")
            lines += [f"# HELP {name} {self._HELP[f.name]}", f"# TYPE {name} {'counter' if counter else 'gauge'}",
                      f"{name} {getattr(self, f.name)}"]
        for name, (doc, value) in (gauges or {}).items():
            lines += [f"# HELP {name} {doc}", f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n"
