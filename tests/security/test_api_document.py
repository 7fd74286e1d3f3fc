"""Issue 9, "Done when": schemathesis (scripts/schemathesis.sh, run by CI against `noetl server` and
`noetl server --kafka`) finds no server error and no answer that contradicts the OpenAPI document. Each of
its findings is pinned here against a real `noetl server` over HTTP: the request, the answer, and that the
document declares that answer (status and body) and agrees with the server on whether the request is valid.
"""
from __future__ import annotations

import httpx
import pytest

from limits_support import LimitsServer
from support import body_valid, declared


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory):
    server = LimitsServer(tmp_path_factory.mktemp("document") / "noetl.db")
    document = server.get("/openapi.json").json()
    yield server, document
    server.stop()


def test_huge_sequence_numbers_and_offsets_are_refused_not_a_server_error(api):
    server, document = api
    # was 500: SQLite cannot bind an integer over 64 bits
    for after_seq in ("43230146801125933056", str(2**31)):   # seq is a Postgres integer
        response = server.get("/api/executions/x/events", params={"after_seq": after_seq})
        assert response.status_code == 422
        declared(document, "GET", "/api/executions/{execution_id}/events", response)
    for path in ("/api/executions", "/api/catalog/list", "/api/credentials"):
        response = server.get(path, params={"offset": str(2**64)})
        assert response.status_code == 422, path
        declared(document, "GET", path, response)
        assert server.get(path, params={"offset": str(2**63 - 1)}).status_code == 200, path


def test_time_filters_at_the_ends_of_the_calendar_and_numbers(api):
    server, document = api
    # were 500: the UTC form of these moments is outside years 1..9999 (OverflowError)
    for params in ({"since": "0001-01-01T00:00:00+01:00"}, {"until": "9999-12-31T23:59:59-05:00"}):
        response = server.get("/api/executions", params=params)
        assert response.status_code == 200 and response.json() == [], params
        declared(document, "GET", "/api/executions", response)
    # was 200: read as epoch seconds although the document says a date-time
    for number in ("0.5", "-62135596801", "1e300"):
        response = server.get("/api/executions", params={"since": number})
        assert response.status_code == 422, number
        declared(document, "GET", "/api/executions", response)
    assert server.get("/api/executions", params={"status": "Running"}).status_code == 200
    assert server.get("/api/executions", params={"status": "bogus"}).status_code == 422


def test_every_not_found_is_declared(api):
    server, document = api
    for template in ("/api/executions/{execution_id}", "/api/executions/{execution_id}/events",
                     "/api/executions/{execution_id}/explain", "/api/execution/data/{execution_id}",
                     "/api/events/summary/{execution_id}", "/api/events/by-execution/{execution_id}"):
        response = server.get(template.replace("{execution_id}", "no-such-execution"))
        assert response.status_code == 404, template
        declared(document, "GET", template, response)
    response = server.get("/api/credentials/no_such_credential")
    assert response.status_code == 404
    declared(document, "GET", "/api/credentials/{name}", response)
    response = httpx.delete(server.url + "/api/credentials/no_such_credential", headers=server.headers)
    assert response.status_code == 404
    declared(document, "DELETE", "/api/credentials/{name}", response)
    for version in (None, "3", str(2**64)):   # a version over 2^31-1 names no entry (was a 500 past 2^63)
        response = server.get("/api/catalog/playbook", params={"playbook_id": "no/such", "version": version})
        assert response.status_code == 404, version
        declared(document, "GET", "/api/catalog/playbook", response)
    response = server.post("/api/context/render", json={"execution_id": "no-such", "template": "{{ 1 }}"})
    assert response.status_code == 404
    declared(document, "POST", "/api/context/render", response)


def test_a_credentials_page_out_of_range_is_a_declared_422(api):
    server, document = api
    for params in ({"limit": 0}, {"limit": 1001}, {"offset": -1}):
        response = server.get("/api/credentials", params=params)
        assert response.status_code == 422, params        # was an undeclared 400
        declared(document, "GET", "/api/credentials", response)


def test_posted_facts_are_validated_strictly_and_the_document_says_what_is_postable(api):
    server, document = api
    heartbeat = {"kind": "heartbeat", "execution_id": "e", "command_id": "c"}
    for bad in ({**heartbeat, "time": False}, {**heartbeat, "time": "12"}, {**heartbeat, "v": "1"}, {}):
        response = server.post("/api/events", json=bad)
        assert response.status_code == 422, bad            # `time: false` was accepted as 0.0
        declared(document, "POST", "/api/events", response)   # a 422 whose detail is one reason string
        assert not body_valid(document, "/api/events", bad), bad
    for good in (heartbeat, {**heartbeat, "time": 12}, {"kind": "cancel", "execution_id": "e", "principal": {}}):
        assert body_valid(document, "/api/events", good), good
        response = server.post("/api/events", json=good)
        assert response.status_code == 202, (good, response.text)
        declared(document, "POST", "/api/events", response)
    start = {"kind": "start", "execution_id": "e"}
    assert not body_valid(document, "/api/events", start)
    assert server.post("/api/events", json=start).status_code == 400


@pytest.mark.parametrize("body, valid, status", [
    ({"path": None, "playbook_id": "x/y"}, False, 422),   # `path` wins over its alias, even as null
    ({"playbook_id": "no/such"}, True, 404),
    ({"catalog_id": "no/such:2"}, True, 404),
    ({"path": "no/such", "version": "3"}, True, 404),
    ({"path": "no/such", "version": 2**63}, True, 404),   # no such version (was a 500 in Kafka mode)
    ({"path": "no/such", "version": "abc"}, False, 422),
    ({"path": ""}, False, 422),
    ({}, False, 422),
])
def test_the_run_body_the_document_allows_is_the_one_the_server_takes(api, body, valid, status):
    server, document = api
    for template in ("/api/executions/run", "/api/execute"):
        assert body_valid(document, template, body) is valid
        response = server.post(template, json=body)
        assert response.status_code == status, response.text
        declared(document, "POST", template, response)


@pytest.mark.parametrize("body, valid, status", [
    ({}, False, 422),
    ({"content": "a", "content_base64": "YQ=="}, False, 422),
    ({"content": "not: a playbook"}, True, 400),     # well-formed, refused on meaning: a 400 with the errors
    ({"content_base64": "!!"}, True, 400),
    ({"content": "x", "resource_type": "Dataset"}, False, 422),
])
def test_the_register_body_the_document_allows_is_the_one_the_server_takes(api, body, valid, status):
    server, document = api
    assert body_valid(document, "/api/catalog/register", body) is valid
    response = server.post("/api/catalog/register", json=body)
    assert response.status_code == status, response.text
    declared(document, "POST", "/api/catalog/register", response)


def test_ops_answers_are_declared(api):
    server, document = api
    response = server.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    declared(document, "GET", "/metrics", response)    # was documented as application/json
    for path in ("/health", "/ready"):
        declared(document, "GET", path, httpx.get(server.url + path))
    response = server.post("/api/catalog/register", json={"content": "x" * 300_000})
    assert response.status_code == 413
    declared(document, "POST", "/api/catalog/register", response)
