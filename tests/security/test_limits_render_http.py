"""Issue 9 scope 5, the render route against a real `noetl server`: render bombs are refused within a second
(the sandbox's bounds) or stopped at the render deadline (a loop in a loop), non-JSON values and deeply
nested templates are 400s not 5xx, and /health keeps answering under a second throughout.
Findings: `{{ 7**(10**7) }}` blocked /health for 6-10 s; `'a'*10**9` took the server to 1 GB; a non-JSON
value and 400-deep template lists gave 5xx."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from limits_support import LimitsServer, health_latency

PLAYBOOK = ("apiVersion: noetl.io/v1\nkind: Playbook\nmetadata: {name: r, path: limits/render}\n"
            "workload: {n: 3}\nworkflow:\n  - step: start\n    next: [{step: end}]\n  - step: end\n")


@pytest.fixture(scope="module")
def execution_id(limits_server) -> str:
    server = limits_server
    assert server.post("/api/catalog/register", json={"content": PLAYBOOK}, timeout=30).status_code == 200
    response = server.post("/api/executions/run", json={"path": "limits/render"}, timeout=30)
    assert response.status_code == 200, response.text
    eid = response.json()["execution_id"]
    deadline = time.monotonic() + 30
    while server.get(f"/api/executions/{eid}", timeout=10).json()["status"] != "COMPLETED":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return eid


def baseline(server: LimitsServer, execution_id: str) -> float:
    """What an ordinary render and a /health cost on this machine now (it is shared and often loaded): the
    time bounds below are a second on top of that."""
    started = time.monotonic()
    assert server.post("/api/context/render", json={"execution_id": execution_id, "template": "{{ 1 }}"},
                      timeout=30).status_code == 200
    return time.monotonic() - started + health_latency(server.url)


def render_while_probing(server: LimitsServer, body: dict) -> tuple[httpx.Response, float, list[float]]:
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            latencies.append(health_latency(server.url))
            time.sleep(0.02)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        while not latencies:             # the prober is up before the bomb goes off
            time.sleep(0.01)
        started = time.monotonic()
        response = server.post("/api/context/render", json=body, timeout=60)
        took = time.monotonic() - started
        time.sleep(0.1)                  # and /health still answers right after
    finally:
        stop.set()
        prober.join()
    return response, took, latencies


@pytest.mark.parametrize("template", [
    "{{ 7**(10**7) }}", "{{ 'a'*10**9 }}", "{{ [0]*10**9 }}", "{{ '%0999999999d' % 1 }}",
])
def test_a_render_bomb_is_refused_within_a_second(limits_server, execution_id, template):
    slack = baseline(limits_server, execution_id)
    response, took, latencies = render_while_probing(
        limits_server, {"execution_id": execution_id, "template": template})
    detail = response.json()["detail"]
    assert response.status_code == 400 and any(s in detail for s in ("too large", "more than", "longer than")), detail
    assert took < 1.0 + slack, (took, slack)
    assert max(latencies) < 1.0 + slack, (latencies, slack)


def test_a_loop_in_a_loop_is_stopped_at_the_deadline_and_health_answers(limits_server, execution_id):
    template = "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}"
    slack = baseline(limits_server, execution_id)
    response, took, latencies = render_while_probing(
        limits_server, {"execution_id": execution_id, "template": template})
    assert response.status_code == 400 and "longer than" in response.json()["detail"], response.text
    assert took < 3.0 + slack, (took, slack)            # the 2 s deadline
    assert max(latencies) < 1.0 + slack, (latencies, slack)


@pytest.mark.parametrize("template", ["{{ 'a'.upper }}", "{{ 1e308 * 10 }}", "{{ workload.keys() | list | first }}x"])
def test_a_value_that_is_not_json_is_a_400_or_rendered_not_a_5xx(limits_server, execution_id, template):
    response = limits_server.post("/api/context/render",
                          json={"execution_id": execution_id, "template": template}, timeout=30)
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        assert "not a value" in response.json()["detail"] or "not a JSON" in response.json()["detail"]


@pytest.mark.parametrize("depth", [400, 5000])
def test_deeply_nested_templates_are_not_a_5xx(limits_server, execution_id, depth):
    body = f'{{"execution_id": "{execution_id}", "template": {"[" * depth}"{{{{ workload.n }}}}"{"]" * depth}}}'
    response = limits_server.post("/api/context/render", content=body,   # json.dumps would recurse
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code < 500, response.text[:300]
    assert health_latency(limits_server.url) < 1.0


def test_an_ordinary_render_still_works(limits_server, execution_id):
    response = limits_server.post("/api/context/render",
                          json={"execution_id": execution_id, "template": {"n": "{{ workload.n * 2 }}"}}, timeout=30)
    assert response.status_code == 200 and response.json()["rendered"] == {"n": 6}
