"""`type: http` and the http save against a real local HTTP server (DSL §2.2, §2.7)."""
import pytest

from noetl_common.messages import ActionCompleted, ActionFailed
from noetl_worker.execute import execute
from noetl_worker.ports import WorkerPorts

from test_worker_support import BEARER, Emitted, HttpFixture, MemoryCredentials, command, save_spec


@pytest.fixture(scope="module")
def server():
    s = HttpFixture()
    yield s
    s.close()


@pytest.fixture
def emitted():
    return Emitted()


def ports(emitted, creds=None):
    return WorkerPorts(emit=emitted, credentials=MemoryCredentials(creds or {}), env={})


async def run(cmd, emitted, creds=None):
    await execute(cmd, ports(emitted, creds))
    return emitted.last()


async def test_get_sends_data_as_query_and_renders_result_shape(server, emitted):
    cmd = command("http", config={"method": "GET", "endpoint": f"{server.url}/echo",
                                  "headers": {"X-Caller": "conformance"}}, data={"a": 1, "b": "x", "t": True})
    done = await run(cmd, emitted)
    assert isinstance(done, ActionCompleted), done
    r = done.result
    assert r["status_code"] == 200 and r["url"].startswith(f"{server.url}/echo?")
    assert isinstance(r["elapsed"], float) and r["headers"]["content-type"] == "application/json"
    assert r["data"]["method"] == "GET" and r["data"]["query"] == {"a": "1", "b": "x", "t": "true"}
    assert r["data"]["headers"]["x-caller"] == "conformance"
    assert r["data"]["json"] is None


async def test_post_body_and_query_routing(server, emitted):
    body = {"items": [1, 2, 3], "nested": {"ok": True}}
    cmd = command("http", config={"method": "POST", "url": f"{server.url}/echo"},
                  data={"body": body, "query": {"page": 2}})
    done = await run(cmd, emitted)
    assert done.result["data"]["json"] == body
    assert done.result["data"]["query"] == {"page": "2"}
    assert done.result["data"]["headers"]["content-type"] == "application/json"


async def test_put_sends_whole_data_as_json_body(server, emitted):
    done = await run(command("http", config={"method": "PUT", "endpoint": f"{server.url}/echo"},
                             data={"n": 7, "tags": ["a", "b"]}), emitted)
    assert done.result["data"]["method"] == "PUT" and done.result["data"]["json"] == {"n": 7, "tags": ["a", "b"]}


async def test_delete_sends_data_as_query(server, emitted):
    done = await run(command("http", config={"method": "DELETE", "endpoint": f"{server.url}/echo"},
                             data={"id": 5}), emitted)
    assert done.result["data"]["query"] == {"id": "5"} and done.result["data"]["json"] is None


async def test_form_encoded_body_when_content_type_says_so(server, emitted):
    cmd = command("http", config={"method": "POST", "endpoint": f"{server.url}/echo",
                                  "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
                  data={"a": 1, "b": "two words"})
    done = await run(cmd, emitted)
    assert done.result["data"]["raw"] == "a=1&b=two+words"


async def test_multipart_body_when_content_type_says_so(server, emitted):
    cmd = command("http", config={"method": "POST", "endpoint": f"{server.url}/echo",
                                  "headers": {"Content-Type": "multipart/form-data"}},
                  data={"field": "v1", "upload": {"filename": "f.txt", "content": "file body"}})
    done = await run(cmd, emitted)
    sent = done.result["data"]
    assert sent["headers"]["content-type"].startswith("multipart/form-data; boundary=")
    assert 'name="field"' in sent["raw"] and "v1" in sent["raw"]
    assert 'filename="f.txt"' in sent["raw"] and "file body" in sent["raw"]


async def test_text_response_is_returned_as_text(server, emitted):
    done = await run(command("http", config={"endpoint": f"{server.url}/text"}), emitted)
    assert done.result["data"] == "plain words"


async def test_non_2xx_fails_with_status_code_and_result(server, emitted):
    failed = await run(command("http", config={"endpoint": f"{server.url}/status/503"}), emitted)
    assert isinstance(failed, ActionFailed)
    assert failed.error.startswith("HTTP 503 Service Unavailable from GET")
    assert failed.status_code == 503
    assert failed.result["status_code"] == 503 and failed.result["data"] == {"code": 503}


async def test_timeout_bounds_the_request(server, emitted):
    failed = await run(command("http", config={"endpoint": f"{server.url}/slow"}, data={"ms": 3000},
                               timeout=0.3), emitted)
    assert isinstance(failed, ActionFailed) and failed.error == "timed out after 0.3s"


async def test_connection_refused_names_the_url(emitted):
    failed = await run(command("http", config={"endpoint": "http://127.0.0.1:9/x"}, timeout=5), emitted)
    assert isinstance(failed, ActionFailed) and "http://127.0.0.1:9/x" in failed.error


async def test_bearer_credential_becomes_authorization_header_and_is_redacted(server, emitted):
    creds = {"api_token": ("bearer", {"token": BEARER})}
    done = await run(command("http", config={"endpoint": f"{server.url}/auth/bearer"}, auth="api_token"),
                     emitted, creds)
    assert isinstance(done, ActionCompleted) and done.result["data"] == {"ok": True}
    # The secret also travels in the query: it reached the server, but not the reported result.
    em = Emitted()
    await execute(command("http", config={"endpoint": f"{server.url}/echo"}, auth="api_token",
                          data={"token_in_query": BEARER}), ports(em, creds))
    assert server.calls[-1]["query"]["token_in_query"] == BEARER
    assert BEARER not in repr(list(em))
    assert em.last().result["url"].endswith("token_in_query=***")


async def test_basic_api_key_and_header_credentials(server, emitted):
    creds = {"b": ("basic", {"username": "ann", "password": "pw-123456"}),
             "k": ("api_key", {"header": "X-Api-Key", "value": "key-987654"}),
             "h": ("header", {"X-One": "1", "X-Two": "two-secret-val"})}
    done = await run(command("http", config={"endpoint": f"{server.url}/echo"}, auth="b"), emitted, creds)
    assert server.calls[-1]["headers"]["authorization"] == "Basic YW5uOnB3LTEyMzQ1Ng=="
    await run(command("http", config={"endpoint": f"{server.url}/echo"}, auth="k"), emitted, creds)
    assert server.calls[-1]["headers"]["x-api-key"] == "key-987654"
    done = await run(command("http", config={"endpoint": f"{server.url}/echo"}, auth="h"), emitted, creds)
    assert server.calls[-1]["headers"]["x-one"] == "1"
    assert done.result["data"]["headers"]["x-two"] == "***"   # the echo of a secret is redacted


async def test_missing_credential_is_named(server, emitted):
    failed = await run(command("http", config={"endpoint": f"{server.url}/echo"}, auth="nope"), emitted)
    assert isinstance(failed, ActionFailed) and failed.error == "credential 'nope' not found"


async def test_http_save_posts_rendered_data_as_json(server, emitted):
    cmd = command("python", config={"code": "def main():\n    return {'event': 'shipped', 'qty': 3}\n"},
                  save=save_spec(storage="http", url=f"{server.url}/echo/collect", data="{{ result }}"))
    from noetl_worker.python_pool import PythonPool
    with PythonPool(1) as pool:
        await execute(cmd, WorkerPorts(emit=emitted, python_pool=pool, env={}))
    done = emitted.last()
    assert isinstance(done, ActionCompleted), done
    assert done.result == {"event": "shipped", "qty": 3}
    call = server.calls[-1]
    assert call["method"] == "POST" and call["path"] == "/echo/collect" and call["json"] == {"event": "shipped", "qty": 3}


async def test_http_save_non_2xx_fails_the_attempt(server, emitted):
    cmd = command("save", phase="save", result={"x": 1},
                  save=save_spec(storage="http", url=f"{server.url}/status/500", method="PUT", data={"x": "{{ result.x }}"}))
    await execute(cmd, ports(emitted))
    failed = emitted.last()
    assert isinstance(failed, ActionFailed)
    assert failed.error.startswith(f"save to {server.url}/status/500 failed: HTTP 500")
    assert server.calls[-1]["method"] == "PUT" and server.calls[-1]["json"] == {"x": 1}
