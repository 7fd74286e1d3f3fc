"""GET /api/executions/{id}/logs against a real `noetl server` subprocess (embedded mode): every attempt's
captured output (python stdout/stderr, tracebacks) with its error, per iteration item, redacted and bounded
by the worker, filtered and paged; bad parameters are a 422 for that request and nothing else."""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Iterator

import httpx
import pytest

import step_logs
from test_http_api import Server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("logs") / "noetl.db").start()
    yield srv
    srv.kill(signal.SIGTERM)


@pytest.fixture(scope="module")
def ran(server: Server) -> tuple[str, str]:
    with httpx.Client(base_url=server.url, timeout=30, headers=server.auth) as api:
        return step_logs.run_both(api)


@pytest.fixture
def api(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30, headers=server.auth) as client:
        yield client


def test_every_attempt_with_output_or_an_error_is_listed(api: httpx.Client, ran: tuple[str, str]) -> None:
    ok, failed = ran
    step_logs.check_ok(step_logs.logs(api, ok), ok)
    step_logs.check_failed(step_logs.logs(api, failed), failed)


def test_the_secret_is_nowhere_the_api_or_the_store_holds_it(api: httpx.Client, ran: tuple[str, str],
                                                             server: Server) -> None:
    ok, _ = ran
    step_logs.no_secret_anywhere(api.get(f"/api/executions/{ok}/logs").text)
    step_logs.no_secret_anywhere(api.get(f"/api/executions/{ok}").text)
    step_logs.no_secret_anywhere(Path(server.store).read_bytes().decode("latin-1"))
    step_logs.no_secret_anywhere(server.logs())


def test_filters_by_step_attempt_and_item(api: httpx.Client, ran: tuple[str, str]) -> None:
    ok, failed = ran
    assert [i["index"] for i in step_logs.logs(api, ok, step="each")["items"]] == [0, 2]
    assert [i["output"] for i in step_logs.logs(api, ok, step="each", index=2)["items"]] == ["item 2\n"]
    second = step_logs.logs(api, failed, step="flaky", attempt=2)["items"]
    assert [(i["attempt"], i["status"]) for i in second] == [(2, "FAILED")]
    assert step_logs.logs(api, ok, step="quiet")["items"] == []        # ran, printed nothing: nothing to list
    assert step_logs.logs(api, ok, step="no such step")["items"] == []
    assert step_logs.logs(api, ok, attempt=7)["items"] == []


def test_pages_like_the_other_lists(api: httpx.Client, ran: tuple[str, str]) -> None:
    ok, _ = ran
    every = step_logs.logs(api, ok)["items"]
    pages = []
    for offset in range(0, 8, 4):
        response = api.get(f"/api/executions/{ok}/logs", params={"limit": 4, "offset": offset})
        assert response.status_code == 200 and response.headers["X-Total-Count"] == str(len(every))
        pages += response.json()["items"]
    assert pages == every
    assert api.get(f"/api/executions/{ok}/logs", params={"offset": 100}).json()["items"] == []


@pytest.mark.parametrize("params", [
    {"limit": 0}, {"limit": 201}, {"limit": -1}, {"offset": -1}, {"offset": 2**70}, {"attempt": 0},
    {"attempt": "abc"}, {"attempt": 2**40}, {"index": -1}, {"index": 2**40}, {"step": "a\x00b"},
    {"step": "s" * 1001}, {"limit": "1e9"},
])
def test_bad_parameters_are_a_422(api: httpx.Client, ran: tuple[str, str], params: dict) -> None:
    ok, _ = ran
    response = api.get(f"/api/executions/{ok}/logs", params=params)
    assert response.status_code == 422, (params, response.text)


def test_unknown_execution_is_a_404_and_hostile_ids_too(api: httpx.Client, ran: tuple[str, str]) -> None:
    for execution_id in ("nope", "x" * 5000, "' OR 1=1 --", "%00", "é\u202e"):
        response = api.get(f"/api/executions/{execution_id}/logs")
        assert response.status_code == 404, (execution_id, response.text)
    assert api.get("/api/executions/nope/logs", headers={"Authorization": ""}).status_code == 401
