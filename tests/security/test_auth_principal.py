"""The fold copies the principal of a start and of a cancel onto the events they cause (pure core)."""
from __future__ import annotations

from noetl_common.engine import advance
from noetl_common.messages import CancelExecution, StartExecution

PLAYBOOK = {"apiVersion": "noetl.io/v1", "kind": "Playbook", "metadata": {"name": "p", "path": "t/p"},
            "workflow": [{"step": "start", "next": [{"step": "work"}]},
                         {"step": "work", "type": "python", "code": "def main():\n    return {}\n",
                          "next": [{"step": "end"}]},
                         {"step": "end"}]}


def test_start_and_cancel_carry_their_principal() -> None:
    started = advance(None, StartExecution(execution_id="e1", time=1.0, playbook=PLAYBOOK, path="t/p",
                                           principal="token:ci"))
    start = next(e for e in started.events if e.event_type == "execution_start")
    assert start.meta["principal"] == "token:ci"
    cancelled = advance(started.state, CancelExecution(execution_id="e1", time=2.0, reason="stop",
                                                       principal="oidc:alice"))
    (event,) = [e for e in cancelled.events if e.event_type == "execution_cancelled"]
    assert event.meta == {"principal": "oidc:alice"} and event.error == "stop"


def test_without_a_principal_the_events_are_as_before() -> None:
    started = advance(None, StartExecution(execution_id="e2", time=1.0, playbook=PLAYBOOK, path="t/p"))
    assert "principal" not in next(e for e in started.events if e.event_type == "execution_start").meta
    cancelled = advance(started.state, CancelExecution(execution_id="e2", time=2.0))
    assert next(e for e in cancelled.events if e.event_type == "execution_cancelled").meta is None
