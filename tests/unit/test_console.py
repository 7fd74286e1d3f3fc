"""The console's pure parts (graph layout and drawing, views over events) and its routes in process: the
login cookie and its limits, the CSRF rules of its actions, escaping of hostile text. The browser tests
(tests/integration/test_console_browser.py) drive the same pages in Chromium."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi")

from noetl_common.dsl import load_playbook  # noqa: E402
from noetl_common.messages import Event  # noqa: E402
from noetl_frontend.console import graph, views  # noqa: E402

LOOP = """
apiVersion: noetl.io/v1
kind: Playbook
metadata: {name: loop, path: t/loop}
workflow:
  - step: start
    next: [{step: work}]
  - step: work
    type: python
    code: "def main():\\n    return {}"
    next:
      - when: "{{ work.n < 3 }}"
        then: [{step: work}]
        else: [{step: "<b>done</b>"}]
  - step: "<b>done</b>"
    next: [{step: end}]
  - step: end
"""


def _playbook(text: str) -> Any:
    playbook, problems = load_playbook(text)
    assert playbook is not None, problems
    return playbook


def test_layout_ranks_steps_and_marks_the_loop() -> None:
    lay = graph.layout(_playbook(LOOP))
    assert [lay.nodes[n].rank for n in ("start", "work", "<b>done</b>", "end")] == [0, 1, 2, 3]
    assert ("work", "work") in {(s, t) for s, t, _ in lay.edges}
    labels = {(s, t): w for s, t, w in lay.edges}
    assert labels[("work", "work")] == "{{ work.n < 3 }}"
    assert labels[("work", "<b>done</b>")] == "not ({{ work.n < 3 }})"


def test_a_long_chain_lays_out_without_recursion() -> None:
    steps = "\n".join(f"  - step: s{i}\n    next: [{{step: s{i + 1}}}]" for i in range(1500))
    text = ("apiVersion: noetl.io/v1\nkind: Playbook\nmetadata: {name: long, path: t/long}\nworkflow:\n"
            "  - step: start\n    next: [{step: s0}]\n" + steps + "\n  - step: s1500\n    next: [{step: end}]\n"
            "  - step: end\n")
    lay = graph.layout(_playbook(text))
    assert lay.nodes["end"].rank == 1502 and not lay.back


def test_the_svg_escapes_names_and_labels_and_draws_iterator_counts() -> None:
    lay = graph.layout(_playbook(LOOP))
    svg = str(graph.svg(lay, {"work": {"status": "RUNNING", "iter": {"done": 4999, "running": 1, "failed": 0}},
                              "<b>done</b>": {"status": "COMPLETED", "children": ['"><script>x</script>']}}))
    assert "<b>" not in svg and "<script>" not in svg
    assert "&lt;b&gt;done&lt;/b&gt;" in svg and "&#34;&gt;&lt;script&gt;" in svg
    assert "4999 done · 1 run · 0 failed" in svg
    assert svg.count('class="node') == 4          # one box per step, whatever the iterator's size
    assert 'class="edge loop"' in svg


def _event(seq: int, kind: str, node: str, **fields: Any) -> Event:
    status = {"action_error": "FAILED", "iteration_failed": "FAILED"}.get(kind, "COMPLETED")
    return Event(event_id=f"e{seq}", execution_id="x", seq=seq, event_type=kind, node_name=node, node_type="step",
                 status=status, timestamp="2026-01-01T00:00:00.000Z", time=1000.0 + seq, **fields)


def test_views_count_iterations_and_time_attempts_and_waits() -> None:
    events = [_event(0, "execution_start", "p", meta={"workload": {"password": "s3cret", "n": 1}}),
              _event(1, "step_started", "each"), _event(2, "step_started", "flaky")]
    seq = 3
    for i in range(5000):
        events.append(_event(seq, "iteration_started", "each", current_index=i))
        seq += 1
        if i % 1000 == 0:
            events.append(_event(seq, "iteration_failed", "each", current_index=i))
            seq += 1
        elif i < 4990:
            events.append(_event(seq, "iteration_completed", "each", current_index=i))
            seq += 1
    events += [_event(seq, "action_started", "flaky", attempt=1, worker_id="w1"),
               _event(seq + 1, "action_error", "flaky", attempt=1, error="boom"),
               _event(seq + 2, "action_retry", "flaky", attempt=1)]
    steps = views.live_steps(events)
    assert steps["each"]["iter"] == {"done": 4985, "running": 10, "failed": 5, "total": 5000}
    line = views.timeline(events, now=events[-1].time + 5)
    kinds = [(r["label"], r["bars"][0]["kind"]) for r in line["rows"]]
    assert ("flaky #1", "failed") in kinds and ("flaky wait", "wait") in kinds and ("each (items)", "failed") in kinds
    assert len(line["rows"]) == 3
    detail = views.step_detail(events, "flaky")
    assert detail["attempts"][0]["error"] == "boom" and detail["attempts"][0]["worker"] == "w1"
    assert views.masked({"password": "s3cret", "nested": [{"api_key": "k"}], "n": 1}) == {
        "password": "***", "nested": [{"api_key": "***"}], "n": 1}


# ---------------------------------------------------------------------------------------------- routes
@pytest.fixture
def app_and_tokens(tmp_path: Path) -> Any:
    import asyncio

    from noetl_cli.server import build_app
    from noetl_embedded.runtime import EmbeddedRuntime
    from noetl_runtime.auth import Authenticator
    from noetl_runtime.sqlite_store import SqliteStore
    from noetl_runtime.tokens import SqliteTokens

    store = SqliteStore(tmp_path / "noetl.db")
    tokens = SqliteTokens(store)
    made = {role: asyncio.run(tokens.create(f"t-{role}", role, None))[0] for role in ("viewer", "operator", "admin")}
    yield build_app(store, EmbeddedRuntime(store), auth=Authenticator(tokens)), made
    store.close()


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8080")


async def test_login_sets_an_httponly_strict_cookie_that_only_console_routes_accept(app_and_tokens: Any) -> None:
    app, tokens = app_and_tokens
    async with _client(app) as c:
        assert (await c.get("/")).status_code == 303
        bad = await c.post("/login", content="token=noetl_wrong", headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert bad.status_code == 401 and "set-cookie" not in bad.headers
        ok = await c.post("/login", content=f"token={tokens['viewer']}",
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert ok.status_code == 303
        cookie = ok.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
        assert (await c.get("/")).status_code == 200                     # the cookie is kept by the client
        assert (await c.get("/api/executions")).status_code == 401        # not a credential for the JSON API
        assert (await c.get("/credentials")).status_code == 403           # viewer: no admin page
        cross = await c.post("/login", content=f"token={tokens['viewer']}",
                             headers={"Content-Type": "application/x-www-form-urlencoded",
                                      "Origin": "https://evil.example"})
        assert cross.status_code == 403


async def test_console_actions_need_the_role_the_header_json_and_this_origin(app_and_tokens: Any) -> None:
    app, tokens = app_and_tokens
    async with _client(app) as c:
        c.cookies.set("noetl_token", tokens["operator"])
        url = "/executions/abc/cancel"
        assert (await c.post(url, json={})).status_code == 403                                  # no X-NoETL-Console
        header = {"X-NoETL-Console": "1"}
        assert (await c.post(url, content="reason=x", headers={**header, "Content-Type":
                                                              "application/x-www-form-urlencoded"})).status_code == 415
        assert (await c.post(url, json={}, headers={**header, "Origin": "https://evil.example"})).status_code == 403
        passed = await c.post(url, json={}, headers=header)   # through every check to the handler: the runtime
        assert passed.status_code == 503 and "runtime is not running" in passed.text   # is not started here
        c.cookies.set("noetl_token", tokens["viewer"])
        assert (await c.post(url, json={}, headers=header)).status_code == 403
        c.cookies.set("noetl_token", tokens["operator"])
        bad = await c.post("/catalog/run", json={"path": "x", "workload": "{not json"}, headers={**header})
        assert bad.status_code == 400 and "not JSON" in bad.json()["detail"]
        assert (await c.post("/catalog/run", json={"path": "nope/none"}, headers=header)).status_code == 404


@pytest.mark.parametrize("path", ["/executions/<img src=x onerror=alert(1)>", "/?q=<script>alert(1)</script>",
                                  "/?path=<img src=x onerror=alert(1)>", "/?status=<b>bogus</b>",
                                  "/catalog/playbook?path=<script>alert(1)</script>", "/?since=<x>&page_no=-5",
                                  "/executions/" + "a" * 5000, "/?size=100000"])
async def test_hostile_query_values_come_back_escaped(app_and_tokens: Any, path: str) -> None:
    app, tokens = app_and_tokens
    async with _client(app) as c:
        c.cookies.set("noetl_token", tokens["viewer"])
        answer = await c.get(path)
        assert answer.status_code in (200, 400, 404), answer.status_code
        assert not re.search(r"<script>alert|<img src=x|<b>bogus|<x>", answer.text)
        assert answer.headers["content-security-policy"].startswith("default-src 'self'")
