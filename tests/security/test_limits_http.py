"""Issue 9 scope 5 over HTTP, against a real `noetl server`: every oversized body gets 413 (whether it
declares its length or streams without one), the alias bomb is a 400 within a second, and /health keeps
answering meanwhile. Finding: a 100 MB body froze the server for minutes; a 552-byte alias bomb took it to
3 GB and a 500."""
from __future__ import annotations

import socket
import threading
import time


from limits_support import BODY_LIMIT, health_latency
from test_limits_yaml import laughs

ROUTES = ["/api/catalog/register", "/api/executions/run", "/api/context/render", "/api/credentials",
          "/api/events"]


def raw_post(port: int, path: str, head: str, chunks) -> bytes:
    """Send a request by hand (httpx would stop at the first refused write) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{head}\r\n".encode())
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass                                  # the server answered and closed: read what it said
        answer = b""
        try:
            while data := sock.recv(65536):
                answer += data
                if b"\r\n\r\n" in answer:
                    break
        except ConnectionResetError:
            pass
        return answer


def test_a_declared_length_over_the_limit_is_413_before_any_byte_is_read(limits_server):
    for route in ROUTES:
        started = time.monotonic()
        answer = raw_post(limits_server.port, route, f"Content-Length: {100 * 1024 * 1024}\r\n", [b"{"])
        assert answer.startswith(b"HTTP/1.1 413"), (route, answer[:200])
        assert time.monotonic() - started < 1.0


def test_a_chunked_body_over_the_limit_is_cut_off_with_413(limits_server):
    chunk = b"x" * 65536
    body = [b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(BODY_LIMIT // len(chunk) + 4)] + [b"0\r\n\r\n"]
    for route in ROUTES:
        # with the admin token: an anonymous one is refused 401 before any byte of its body is read
        auth = limits_server.headers["Authorization"]
        answer = raw_post(limits_server.port, route, f"Authorization: {auth}\r\nTransfer-Encoding: chunked\r\n", body)
        assert answer.startswith(b"HTTP/1.1 413"), (route, answer[:200])


def test_a_100_mb_body_is_refused_while_health_keeps_answering(limits_server):
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            latencies.append(health_latency(limits_server.url))
            time.sleep(0.02)

    big = b'{"content": "' + b"a" * (100 * 1024 * 1024) + b'"}'   # built before probing: it holds the GIL
    slack = max(health_latency(limits_server.url) for _ in range(3))  # what /health costs on this loaded machine
    prober = threading.Thread(target=probe)
    prober.start()
    try:
        # (how long the client takes to push 100 MB is its own business: the server answers at the limit)
        response = limits_server.post("/api/catalog/register", content=big,
                              headers={"Content-Type": "application/json"}, timeout=30)
        assert response.status_code == 413 and "NOETL_MAX_BODY_BYTES" in response.json()["detail"]
    finally:
        stop.set()
        prober.join()
    assert len(latencies) >= 1 and max(latencies) < 1.0 + slack, (latencies, slack)


def test_a_body_under_the_limit_is_taken(limits_server):
    text = "apiVersion: noetl.io/v1\nkind: Playbook\nmetadata: {name: ok, path: limits/ok}\n" \
           "workflow:\n  - step: start\n    next: [{step: end}]\n  - step: end\n"
    response = limits_server.post("/api/catalog/register", json={"content": text}, timeout=30)
    assert response.status_code == 200, response.text


def test_the_alias_bomb_is_a_400_within_a_second_and_health_answers(limits_server):
    text = "apiVersion: noetl.io/v1\nkind: Playbook\nmetadata: {name: bomb, path: limits/bomb}\n" + laughs() + \
        "workflow:\n  - step: start\n    next: [{step: end}]\n  - step: end\n"
    started = time.monotonic()
    response = limits_server.post("/api/catalog/register", json={"content": text}, timeout=30)
    assert time.monotonic() - started < 1.0
    assert response.status_code == 400, response.text
    assert "nodes" in response.text
    assert health_latency(limits_server.url) < 1.0
