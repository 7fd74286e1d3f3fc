"""GET /api/executions/{id}/logs against `noetl server --kafka` on real Kafka (Tansu) and Postgres: the output
crosses the bus in the worker's facts and the fold's events, is projected by the query service into Postgres
and read back from there; the answer equals the embedded `noetl server`'s for the same playbooks."""
from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest

import step_logs
from test_server_kafka import Server, schema, server, server_env  # noqa: F401 - fixtures
from unit.test_http_api import Server as EmbeddedServer

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]


def test_logs_on_noetl_server_kafka_equal_the_embedded_answer(server: Server, tmp_path: Path) -> None:  # noqa: F811
    server.start()
    with httpx.Client(base_url=server.url, timeout=30, headers=server.auth) as api:
        ok, failed = step_logs.run_both(api, timeout=180)

        def projected(execution_id: str, count: int) -> dict | None:   # the API answers from the projection
            body = step_logs.logs(api, execution_id)
            return body if len(body["items"]) == count else None

        kafka_ok = step_logs.until(lambda: projected(ok, 6), 30, "the projection of logs_ok")
        kafka_failed = step_logs.until(lambda: projected(failed, 2), 30, "the projection of logs_fail")
        step_logs.check_ok(kafka_ok, ok)
        step_logs.check_failed(kafka_failed, failed)
        step_logs.no_secret_anywhere(api.get(f"/api/executions/{ok}").text)
        # filters and pages go through the Postgres SQL (migration 0006's index)
        assert [i["index"] for i in step_logs.logs(api, ok, step="each")["items"]] == [0, 2]
        assert [i["attempt"] for i in step_logs.logs(api, failed, attempt=2)["items"]] == [2]
        page = api.get(f"/api/executions/{ok}/logs", params={"limit": 2, "offset": 3})
        assert page.headers["X-Total-Count"] == "6" and page.json()["items"] == kafka_ok["items"][3:5]
        # hostile parameters are that request's 422/404, never a database error
        for params in ({"attempt": 2**40}, {"step": "a\x00b"}, {"limit": 500}):
            assert api.get(f"/api/executions/{ok}/logs", params=params).status_code == 422, params
        for execution_id in ("nope", "%00", "x" * 5000):
            assert api.get(f"/api/executions/{execution_id}/logs").status_code == 404, execution_id
        assert api.get(f"/api/executions/{ok}/logs").status_code == 200      # and the server is fine

    embedded = EmbeddedServer(tmp_path / "embedded" / "noetl.db")
    embedded.store.parent.mkdir()
    embedded.start()
    try:
        with httpx.Client(base_url=embedded.url, timeout=30, headers=embedded.auth) as api:
            e_ok, e_failed = step_logs.run_both(api)
            assert step_logs.comparable(step_logs.logs(api, e_ok), e_ok) == step_logs.comparable(kafka_ok, ok)
            assert step_logs.comparable(step_logs.logs(api, e_failed), e_failed) == \
                step_logs.comparable(kafka_failed, failed)
    finally:
        embedded.kill(signal.SIGTERM)
