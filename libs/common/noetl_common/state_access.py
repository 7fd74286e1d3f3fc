"""How the batch fold (noetl_common.batch) reaches a runtime's execution states, and the broker's way: a table
of snapshots parsed through a cache, so that a busy execution is not parsed again on every batch. The
embedded runtime keeps parsed states in memory and implements `States` itself."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Protocol

from noetl_common.state import ExecutionState


class States(Protocol):
    """How the batch fold reaches a runtime's execution states."""

    def take(self, execution_id: str) -> ExecutionState | None:
        """The execution's current state, parsed (None: unknown). The batch owns it, and may mutate it,
        until it gives it back. Raises when the stored state cannot be read."""

    def snapshot(self, execution_id: str) -> bytes | None:
        """The execution's last durable snapshot: where a replay starts after a failure."""

    def give_back(self, execution_id: str, raw: bytes | None, state: ExecutionState | None) -> None:
        """The state after the batch, with its new snapshot (None: unchanged by the batch). `state` None: the
        batch has no usable state for it (forget any parsed copy; the durable snapshot stays as it was)."""


class StateCache:
    """Parsed states kept between batches, so a busy execution is not re-parsed on every batch.

    An entry is used only while the table still holds the very bytes it was parsed from (identity, then
    equality): after a rebalance, a recovery or a batch that failed before its states were written, the
    table's bytes differ and the state is parsed again. Entries are taken out while a batch folds them, so
    a state half-mutated by a failing advance() is never served again.
    """

    def __init__(self, size: int = 20_000) -> None:
        self.size = size
        self._entries: OrderedDict[str, tuple[bytes, ExecutionState]] = OrderedDict()

    def take(self, execution_id: str, raw: bytes | None) -> ExecutionState | None:
        if raw is None:
            self._entries.pop(execution_id, None)
            return None
        entry = self._entries.pop(execution_id, None)
        if entry is not None and (entry[0] is raw or entry[0] == raw):
            return entry[1]
        return ExecutionState.from_bytes(raw)

    def put(self, execution_id: str, raw: bytes, state: ExecutionState) -> None:
        self._entries[execution_id] = (raw, state)
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class TableStates:
    """`States` over a table of snapshots (execution id -> bytes: the broker's faust Table, a dict in tests),
    parsed through a StateCache."""

    def __init__(self, table: Any, cache: StateCache | None = None) -> None:
        self.table = table
        self.cache = cache if cache is not None else StateCache(0)

    def take(self, execution_id: str) -> ExecutionState | None:
        return self.cache.take(execution_id, self.table.get(execution_id))

    def snapshot(self, execution_id: str) -> bytes | None:
        return self.table.get(execution_id)

    def give_back(self, execution_id: str, raw: bytes | None, state: ExecutionState | None) -> None:
        raw = raw if raw is not None else self.table.get(execution_id)
        if raw is not None and state is not None:
            self.cache.put(execution_id, raw, state)
