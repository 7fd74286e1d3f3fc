"""The broker's eviction schedule (noetl_broker.eviction.Evictions), on a plain dict as the table: pure, no
Kafka. The end-to-end behaviour (tombstones, restart, a late re-send refused) is in
tests/integration/test_broker.py."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("faust")   # noetl_broker's package imports faust

from noetl_broker.eviction import Evictions  # noqa: E402
from noetl_common.state_access import StateCache  # noqa: E402


def snapshot(status: str, finished: float | None = None, started: float = 1.0) -> bytes:
    return json.dumps({"status": status, "finished": finished, "started": started, "timers": {}}).encode()


def test_only_finished_states_whose_grace_is_over_leave_the_table_as_tombstones() -> None:
    ev = Evictions(after=10)
    table = {b"done-early": snapshot("COMPLETED", 100), b"done-late": snapshot("FAILED", 105),
             b"running": snapshot("RUNNING")}
    ev.finished("done-early", 100)
    ev.finished("done-late", 105)
    assert ev.next_due() == 110 and len(ev) == 2
    assert ev.take(table, StateCache(), now=109.9, limit=100) == {}            # not yet
    assert ev.take(table, StateCache(), now=110, limit=100) == {"done-early": None}
    assert set(table) == {b"done-late", b"running"} and ev.next_due() == 115
    assert ev.take(table, StateCache(), now=1000, limit=100) == {"done-late": None}
    assert set(table) == {b"running"} and ev.next_due() is None


def test_a_state_scheduled_twice_or_running_again_is_not_evicted_twice_or_at_all() -> None:
    ev = Evictions(after=10)
    table = {b"a": snapshot("COMPLETED", 100), b"b": snapshot("RUNNING")}
    ev.finished("a", 100)
    ev.finished("a", 100)                # e.g. folded again after a rebalance
    ev.finished("b", 100)                # scheduled, but its snapshot says it runs: left alone
    assert ev.take(table, StateCache(), now=200, limit=100) == {"a": None}
    assert set(table) == {b"b"} and len(ev) == 0


def test_at_most_limit_per_call_the_rest_stays_due() -> None:
    ev = Evictions(after=1)
    table = {f"e{i}".encode(): snapshot("COMPLETED", float(i)) for i in range(5)}
    for i in range(5):
        ev.finished(f"e{i}", float(i))
    assert list(ev.take(table, StateCache(), now=100, limit=2)) == ["e0", "e1"]   # oldest first
    assert len(table) == 3 and ev.next_due() == 3.0
    assert list(ev.take(table, StateCache(), now=100, limit=10)) == ["e2", "e3", "e4"] and not table


def test_rebuild_replaces_the_schedule_and_revoke_clears_it() -> None:
    ev = Evictions(after=5)
    ev.finished("old", 1)
    ev.rebuild([("x", 20), ("y", 10)])
    assert ev.next_due() == 15 and len(ev) == 2
    ev.revoke()
    assert ev.next_due() is None and len(ev) == 0


def test_zero_turns_eviction_off() -> None:
    ev = Evictions(after=0)
    ev.finished("a", 1)
    ev.rebuild([("b", 1)])
    table = {b"a": snapshot("COMPLETED", 1)}
    assert not ev.enabled and ev.next_due() is None
    assert ev.take(table, StateCache(), now=1e9, limit=10) == {} and b"a" in table
