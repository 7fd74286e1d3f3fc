"""The web console in a real browser (issue 10, scope 6): Chromium from the distribution, driven by
Playwright, against a real `noetl server` process (SQLite) and a real `noetl server --kafka` (Tansu +
Postgres). Each test logs in through the login form with an API token, like a user.

What "live" means here: the page is opened before the execution finishes and is never reloaded (a marker
set on `window` survives), yet the graph turns green: the server pushed the new HTML over server-sent
events (`document.body.dataset.liveUpdates` counts the pushes the page applied).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from console_support import HOSTILE_NAME, HOSTILE_STEP, ServerProcess, browser, logged_in_page
from support import free_port, pg_token

LIVE_TIMEOUT = 60_000   # ms the browser waits for a pushed change


@pytest.fixture(scope="module", params=["embedded", "kafka"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp(f"console-{request.param}")
    workdir.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOETL_", "KAFKA_"))}
    env.update(PYTHONUNBUFFERED="1", NOETL_STORE=str(workdir / "noetl.db"), NOETL_WORKER_PYTHON_PROCESSES="2")
    kafka = None
    schema = None
    if request.param == "kafka":
        endpoint = request.getfixturevalue("kafka_endpoint")
        dsn = request.getfixturevalue("pg_dsn")
        schema = f"console_{uuid.uuid4().hex[:12]}"
        kafka = endpoint.bootstrap
        env.update(NOETL_DATABASE_URL=dsn, NOETL_DATABASE_SCHEMA=schema, NOETL_TOPIC_PARTITIONS="2",
                   NOETL_TOPIC_PREFIX=f"t.console.{uuid.uuid4().hex[:8]}.", NOETL_LEASE_SECONDS="120",
                   NOETL_API_TOKEN=_off_loop(pg_token, dsn, schema, "admin"))
        if endpoint.kind == "tansu":
            env["NOETL_KAFKA_SESSION_TIMEOUT_MS"] = "3000"
    s = ServerProcess(workdir, free_port(), env, kafka=kafka)
    try:
        s.start()
        s.register_all()
        yield s
    finally:
        s.stop()
        if schema is not None:
            _off_loop(_drop_schema, request.getfixturevalue("pg_dsn"), schema)


def _off_loop(call: Any, *args: Any) -> Any:
    """Run `call` in a thread: Playwright's sync API keeps an event loop running in this one, and the helpers
    below use asyncio.run."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(call, *args).result()


def _drop_schema(dsn: str, schema: str) -> None:
    import asyncpg

    async def drop() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
    asyncio.run(drop())


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    with browser() as b:
        yield b


@pytest.fixture
def page(chromium: Any, server: ServerProcess) -> Iterator[Any]:
    p = logged_in_page(chromium, server)
    yield p
    assert p.errors == [], f"JavaScript errors on the page: {p.errors}"
    p.context.close()


def node(page: Any, step: str) -> Any:
    return page.locator(f"g.node[data-step={json.dumps(step)}]")   # a CSS string: quotes escaped


def test_start_a_playbook_from_the_catalog_and_watch_the_graph_turn_green_live(page: Any, server: ServerProcess) -> None:
    page.goto(f"{server.url}/catalog")
    page.click("text=console/slow_ok")
    assert "{{ workload.pause > 0 }}" in page.locator("svg.graph text.when").first.text_content()   # `when` on the edge
    page.fill("#workload", '{"pause": 2.5}')
    page.click("#run")
    page.wait_for_url(re.compile(r"/executions/[0-9a-f-]{36}$"))
    execution_id = page.url.rsplit("/", 1)[1]
    page.evaluate("window.__notReloaded = true")
    # the page was rendered while `first` sleeps: it turns green only through pushed updates
    page.wait_for_selector('g.node.completed[data-step="second"]', timeout=LIVE_TIMEOUT)
    page.wait_for_selector("#status:text('completed')", timeout=LIVE_TIMEOUT)
    assert page.evaluate("window.__notReloaded") is True
    assert int(page.evaluate("document.body.dataset.liveUpdates || '0'")) >= 1
    assert "completed" in node(page, "first").get_attribute("class")
    assert server.api("GET", f"/api/executions/{execution_id}?events=false")["status"] == "COMPLETED"
    # the step's rendered inputs, with the password masked
    node(page, "first").click()
    page.wait_for_selector("#step-inputs")
    inputs = page.inner_text("#step-inputs")
    assert "2.5" in inputs and "***" in inputs and "hunter2" not in inputs
    assert '"slept": 2.5' in page.inner_text("#step-result")


def test_a_failed_step_shows_its_error_and_a_step_its_output(page: Any, server: ServerProcess) -> None:
    execution_id = server.run("console/fails")
    server.wait_status(execution_id, ("FAILED",))
    page.goto(f"{server.url}/executions/{execution_id}")
    assert "failed" in node(page, "explode").get_attribute("class")
    node(page, "explode").click()
    page.wait_for_selector("#step-error")
    assert "boom-xyz" in page.inner_text("#step-error")
    node(page, "talk").click()
    page.wait_for_selector("#step-name:text('talk')")
    assert "hello-from-talk" in page.inner_text("#step-panel")
    # the list shows it as failed, and the status filter finds it
    page.goto(f"{server.url}/?status=FAILED")
    assert page.locator(f'tr[data-execution="{execution_id}"] .badge').inner_text() == "failed"


def test_follow_a_child_execution(page: Any, server: ServerProcess) -> None:
    execution_id = server.run("examples/child_playbook")
    server.wait_status(execution_id, ("COMPLETED",))
    page.goto(f"{server.url}/executions/{execution_id}")
    link = page.locator('g.node[data-step="with_child_result"] a.child')
    child_id = link.get_attribute("data-child")
    link.click()
    page.wait_for_url(f"{server.url}/executions/{child_id}")
    assert page.inner_text("#parent") == execution_id
    assert "completed" in node(page, "multiply").get_attribute("class")


def test_cancel_a_running_execution(page: Any, server: ServerProcess) -> None:
    execution_id = server.run("console/sleeper")
    page.goto(f"{server.url}/executions/{execution_id}")
    page.wait_for_selector('g.node.running[data-step="nap"]', timeout=LIVE_TIMEOUT)
    page.click("#cancel")
    page.wait_for_selector("#status:text('cancelled')", timeout=LIVE_TIMEOUT)
    assert server.api("GET", f"/api/executions/{execution_id}?events=false")["status"] == "CANCELLED"


def test_the_explainer_says_a_step_waits_for_its_retry_timer(page: Any, server: ServerProcess) -> None:
    execution_id = server.run("console/retrying")
    page.goto(f"{server.url}/executions/{execution_id}")
    page.wait_for_selector("#explain-text:text('retry of `flaky` due at')", timeout=LIVE_TIMEOUT)
    text = page.inner_text("#explain-text")
    assert "(attempt 2 of 3)" in text
    assert text == server.api("GET", f"/api/executions/{execution_id}/explain")["text"] or "retry" in text
    server.api("POST", f"/api/executions/{execution_id}/cancel", json={})


def test_run_again_starts_the_same_workload(page: Any, server: ServerProcess) -> None:
    first = server.run("console/slow_ok", pause=0.1)
    server.wait_status(first, ("COMPLETED",))
    page.goto(f"{server.url}/executions/{first}")
    page.click("#rerun")
    page.wait_for_url(lambda url: "/executions/" in url and first not in url)
    second = page.url.rsplit("/", 1)[1]
    assert second != first
    again = server.api("GET", f"/api/executions/{second}")
    assert again["path"] == "console/slow_ok"
    assert again["events"][0]["meta"]["workload"]["pause"] == 0.1


def test_markup_in_playbooks_and_results_is_shown_as_text(page: Any, server: ServerProcess) -> None:
    execution_id = server.run("console/hostile")
    server.wait_status(execution_id, ("COMPLETED",))
    for path in ("/", f"/executions/{execution_id}", "/catalog", "/catalog/playbook?path=console/hostile",
                 f"/?q={HOSTILE_NAME}", f"/executions/{HOSTILE_NAME}"):
        page.goto(f"{server.url}{path}")
        assert page.evaluate("window.__pwned") is None, path
    page.goto(f"{server.url}/executions/{execution_id}")
    assert HOSTILE_NAME in page.inner_text("#events")
    node(page, HOSTILE_STEP).click()
    page.wait_for_selector("#step-result")
    assert "<script>window.__pwned = 3</script>" in page.inner_text("#step-result")
    assert page.evaluate("window.__pwned") is None


def test_a_viewer_sees_no_actions_and_the_server_refuses_them(chromium: Any, server: ServerProcess,
                                                             tmp_path: Path) -> None:
    viewer = _token(server, "viewer")
    context = chromium.new_context()
    p = context.new_page()
    p.goto(f"{server.url}/login")
    p.fill("#token", viewer)
    p.click("#login")
    p.wait_for_url(f"{server.url}/")
    execution_id = server.run("console/slow_ok", pause=0.1)
    p.goto(f"{server.url}/executions/{execution_id}")
    assert p.locator("#cancel").count() == 0
    status = p.evaluate("""async (id) => (await fetch('/executions/' + id + '/cancel', {method: 'POST',
        headers: {'Content-Type': 'application/json', 'X-NoETL-Console': '1'}, body: '{}'})).status""", execution_id)
    assert status == 403
    assert p.goto(f"{server.url}/credentials").status == 403
    context.close()


def _token(server: ServerProcess, role: str) -> str:
    if server.kafka:
        return _off_loop(pg_token, server.env["NOETL_DATABASE_URL"], server.env["NOETL_DATABASE_SCHEMA"], role)
    import subprocess

    from console_support import NOETL
    done = subprocess.run([NOETL, "token", "create", "--store", str(server.workdir / "noetl.db"), "--role", role,
                           "--name", f"console-{role}-{uuid.uuid4().hex[:6]}"], capture_output=True, text=True,
                          env=server.env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]
