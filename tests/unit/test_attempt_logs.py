"""Captured step output (issue 10, scope 3), the pure part: which events carry an attempt's output and what
the logs API makes of them; the fold puts the output on the event that ends each attempt (steps, retries,
iteration items); the worker bounds, redacts and cleans it before it leaves."""
from __future__ import annotations

import base64

import pytest

from noetl_common import attempt_logs
from noetl_common.attempt_logs import CUT_MARKER, is_attempt_log, log_item, truncated
from noetl_common.messages import Event
from noetl_common.simulate import Outcome, Simulation
from noetl_worker import _python_child
from noetl_worker.execute import bounded, execute
from noetl_worker.ports import WorkerPorts
from noetl_worker.python_pool import PythonPool
from step_logs import RETRIED_AND_ITERATED

from test_worker_support import Emitted, command


def event(event_type: str, seq: int = 1, **fields) -> Event:
    base = dict(event_id=f"e:{seq}", execution_id="e", seq=seq, event_type=event_type, node_name="s",
                node_type="task", status="X", timestamp=f"2026-01-01T00:00:{seq:02d}.000Z", time=float(seq))
    return Event(**{**base, **fields})


def test_the_core_names_the_marker_the_worker_writes():
    assert CUT_MARKER == _python_child.CUT_MARKER


def test_which_events_are_listed():
    assert is_attempt_log(event("action_error", error="boom"))                          # failed, no output
    assert is_attempt_log(event("action_completed", meta={"log": "hi\n"}))
    assert is_attempt_log(event("iteration_completed", meta={"log": "hi\n"}, attempt=1, current_index=3))
    assert not is_attempt_log(event("action_completed"))                                # nothing printed
    assert not is_attempt_log(event("action_completed", meta={"log": ""}))
    assert not is_attempt_log(event("action_completed", meta={"log": 5}))              # not text: not output
    assert not is_attempt_log(event("step_completed", meta={"log": "x"}))
    assert not is_attempt_log(event("iteration_failed", error="x"))     # an item's end; its attempts are listed


def test_an_item_says_step_attempt_index_status_error_and_truncation():
    failed = log_item(event("action_error", attempt=2, current_index=4, command_id="e:s:1:2:4", error="KeyError: 'k'",
                            meta={"log": "a\x00b\n", "status_code": 500}))
    assert failed == {"step": "s", "attempt": 2, "index": 4, "command_id": "e:s:1:2:4", "time": 1.0,
                      "status": "FAILED", "output": "a\ufffdb\n", "error": "KeyError: 'k'", "truncated": False}
    done = log_item(event("action_completed", attempt=1, command_id="e:s:1:1", error=None,
                          meta={"log": "start" + CUT_MARKER.format(123) + "end"}))
    assert done["status"] == "COMPLETED" and done["error"] is None and done["index"] is None and done["truncated"]
    assert not truncated("a line that mentions output cut here: 12 bytes dropped")   # not the marker itself


def test_filters_and_order_by_time_then_seq():
    events = [event("action_error", seq=5, attempt=1, error="x", node_name="b"),
              event("action_completed", seq=2, attempt=2, meta={"log": "2"}, node_name="a"),
              event("action_completed", seq=9, attempt=1, meta={"log": "3"}, node_name="a",
                    timestamp="2026-01-01T00:00:01.000Z"),     # earlier time than seq 2 (another worker's clock)
              event("step_completed", seq=11, node_name="a")]
    assert [i["output"] for i in attempt_logs.attempt_logs(events)] == ["3", "2", ""]
    assert [i["step"] for i in attempt_logs.attempt_logs(events, step="b")] == ["b"]
    assert [i["output"] for i in attempt_logs.attempt_logs(events, step="a", attempt=2)] == ["2"]
    assert attempt_logs.attempt_logs(events, index=0) == []


# --- the fold: every attempt's end carries its output ------------------------------------------------


def test_the_fold_puts_each_attempts_output_on_the_event_that_ends_it():
    def worker(cmd):
        if cmd.step == "flaky":
            if cmd.attempt < 2:
                return Outcome(ok=False, error="ValueError: first", log=f"try {cmd.attempt}\nTraceback ...\n")
            return Outcome(result=1, log="ok at last\n")
        n = cmd.action.data["n"]
        if n == 1 and cmd.attempt == 1:
            return Outcome(ok=False, error="boom", log="item 1 failing\n")
        return Outcome(result=n, log=f"item {n} attempt {cmd.attempt}\n" if n != 2 else None)

    sim = Simulation(worker)
    sim.start(RETRIED_AND_ITERATED)
    sim.run()
    assert sim.state().status == "COMPLETED"
    items = attempt_logs.attempt_logs(sim.events)
    got = [(i["step"], i["attempt"], i["index"], i["status"], i["output"], i["error"], i["command_id"]) for i in items]
    assert got == [
        ("flaky", 1, None, "FAILED", "try 1\nTraceback ...\n", "ValueError: first", "e1:flaky:1:1"),
        ("flaky", 2, None, "COMPLETED", "ok at last\n", None, "e1:flaky:1:2"),
        ("each", 1, 0, "COMPLETED", "item 0 attempt 1\n", None, "e1:each:1:1:0"),
        ("each", 1, 1, "FAILED", "item 1 failing\n", "boom", "e1:each:1:1:1"),
        ("each", 2, 1, "COMPLETED", "item 1 attempt 2\n", None, "e1:each:1:2:1"),
        # item 2 printed nothing and did not fail: nothing to list
    ]
    # the event sequence itself is unchanged (DSL §6): no event type was added for the output
    assert {e.event_type for e in sim.events} <= set(Event.model_fields["event_type"].annotation.__args__)


# --- the worker: bounded, redacted, cleaned before the text leaves --------------------------------------
@pytest.fixture(scope="module")
def small_pool():
    from noetl_runtime.settings import StepSettings
    settings = StepSettings(log_max_bytes=4096)
    with PythonPool(1, settings=settings) as pool:
        yield pool, settings


async def _log_of(code: str, small_pool, **kw) -> tuple[str, str]:
    pool, settings = small_pool
    emitted = Emitted()
    await execute(command("python", config={"code": code}, **kw),
                  WorkerPorts(emit=emitted, python_pool=pool, step_settings=settings,
                              env={"NOETL_SECRET_TOKEN": SECRET}))
    last = emitted.last()
    return last.kind, last.log


SECRET = "s3cr3t-Value-for-logs"


async def test_binary_nul_and_invalid_utf8_output_becomes_text(small_pool):
    code = ("import sys\ndef main():\n    sys.stdout.flush()\n"
            "    sys.stdout.buffer.write(b'ok\\x00nul \\xff\\xfe bad \\xe2\\x82 cut\\n')\n    sys.stdout.flush()\n")
    kind, log = await _log_of(code, small_pool)
    assert kind == "action_completed"
    assert log == "ok\ufffdnul \ufffd\ufffd bad \ufffd cut\n"     # NUL and every invalid byte as U+FFFD
    assert "\x00" not in log


async def test_huge_output_100k_lines_keeps_start_and_end_within_the_bound(small_pool):
    code = "def main():\n    for i in range(100000):\n        print('line', i)\n    return 1\n"
    kind, log = await _log_of(code, small_pool)
    assert kind == "action_completed" and truncated(log)
    assert log.startswith("line 0\nline 1\n") and log.endswith("line 99999\n")
    assert len(log.encode()) <= 4096 + len(CUT_MARKER) + 20


async def test_a_secret_printed_in_base64_or_hex_is_redacted_and_a_failure_keeps_its_traceback(small_pool):
    code = ("import base64\ndef main(t):\n    print('b64', base64.b64encode(t.encode()).decode())\n"
            "    print('hex', t.encode().hex())\n    print('plain', t)\n    raise RuntimeError('bad ' + t)\n")
    kind, log = await _log_of(code, small_pool, data={"t": "{{ secret.TOKEN }}"}, deferred=["data.t"])
    assert kind == "action_failed"
    for form in (SECRET, base64.b64encode(SECRET.encode()).decode(), SECRET.encode().hex()):
        assert form not in log
    assert "b64 ***" in log and "hex ***" in log and "plain ***" in log
    assert "Traceback" in log and "RuntimeError: bad ***" in log


def test_bounded_cuts_on_bytes_never_inside_a_character():
    text = "é" * 10_000                       # 2 bytes each
    cut = bounded(text, 1024)
    assert truncated(cut) and "\ufffd" not in cut
    assert cut.startswith("é" * 256) and cut.endswith("é" * 256)
    assert bounded("short", 1024) == "short"


async def test_a_failure_whose_output_the_transport_refuses_still_reaches_the_fold(small_pool):
    pool, settings = small_pool
    sent = []

    async def emit(message):
        if getattr(message, "log", None) and "boom" in message.log:
            raise ValueError("message too large")
        sent.append(message)

    await execute(command("python", config={"code": "def main():\n    print('boom')\n    raise KeyError(1)\n"}),
                  WorkerPorts(emit=emit, python_pool=pool, step_settings=settings))
    failed = [m for m in sent if m.kind == "action_failed"]
    assert len(failed) == 1 and failed[0].error == "KeyError: 1"
    assert failed[0].log == "(the attempt's output could not be reported: ValueError: message too large)"
