"""Issue 9, findings: httpx logged the full URL at INFO, so `?api_key={{ secret.X }}` appeared in clear in the
server's log; redaction was exact-match only, so base64, upper-case or split forms passed. These run the
worker's real `execute` (real httpx against a local server, the real python pool) and read every log
record the process wrote and every fact the worker emitted."""
from __future__ import annotations

import base64
import json
import logging
import re
import urllib.parse

import pytest

from noetl_worker.execute import execute
from noetl_worker.ports import WorkerPorts
from noetl_worker.python_pool import PythonPool

from unit.test_worker_support import Emitted, HttpFixture, command

SECRET = "Api+Key/Wq73:zx=="          # characters that URL-encoding and base64 change
PEM = "-----BEGIN KEY-----\nMIIBVwIBADANBgkqhkiG9w0BAQEF\nAASCAT8wggE7AgEAAkEAvGqYn1bz\n-----END KEY-----"
ENV = {"NOETL_SECRET_API": SECRET, "NOETL_SECRET_PEM": PEM}


@pytest.fixture(scope="module")
def server():
    s = HttpFixture()
    yield s
    s.close()


@pytest.fixture(scope="module")
def pool():
    p = PythonPool(1)
    yield p
    p.close()


def _forms(value: str) -> list[str]:
    raw = value.encode()
    return [value, value.upper(), value.lower(), urllib.parse.quote(value, safe=""), urllib.parse.quote_plus(value),
            urllib.parse.quote(value),
            raw.hex(), raw.hex().upper(), base64.b64encode(raw).decode().rstrip("="), json.dumps(value)[1:-1]]


def _assert_hidden(text: str) -> None:
    for secret in (SECRET, PEM):
        for form in _forms(secret):
            assert form not in text, f"{form!r} leaked"
    for line in PEM.splitlines()[1:-1]:
        assert line not in text, f"PEM line {line!r} leaked"


async def test_a_secret_in_a_url_never_reaches_any_log_record(server, caplog):
    caplog.set_level(logging.DEBUG)           # every library's records, httpx's INFO "HTTP Request: GET <url>"
    emitted = Emitted()
    cmd = command("http", config={"endpoint": server.url + "/status/500?api_key={{ secret.API | urlencode }}",
                                  "method": "GET"},
                  deferred=["config.endpoint"])
    await execute(cmd, WorkerPorts(emit=emitted, env=ENV))
    assert server.calls[-1]["query"]["api_key"] == SECRET            # the request itself carried it
    records = [r for r in caplog.records if r.name.startswith("httpx")]
    assert records, "httpx logged nothing: the test would prove nothing"
    everything = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert "api_key=***" in everything
    _assert_hidden(everything + json.dumps([m.model_dump(mode="json") for m in emitted]))


async def test_a_logged_traceback_is_redacted_for_every_formatter(caplog):
    from noetl_runtime.http_ops import JsonFormatter
    from noetl_worker.credentials import Secrets
    secrets = Secrets(None, ENV)
    await secrets.secret("API")
    caplog.set_level(logging.INFO)
    try:
        raise RuntimeError(f"request to https://x.test/?k={urllib.parse.quote(SECRET, safe='')} failed")
    except RuntimeError:
        logging.getLogger("some.library").exception("call failed for %s", SECRET.upper())
    record = caplog.records[-1]
    lines = [JsonFormatter().format(record), logging.Formatter().format(record)]
    assert all("***" in line for line in lines)
    _assert_hidden("\n".join(lines))


PRINTS = """
import base64, json, urllib.parse
def main(token, pem):
    print(token.upper(), token.lower())
    print(base64.b64encode(token.encode()).decode(), base64.urlsafe_b64encode(token.encode()).decode())
    print(base64.b64encode(("user:" + token).encode()).decode())      # Basic auth: the secret mid-text
    print(urllib.parse.quote(token, safe=""), urllib.parse.quote_plus(token), token.encode().hex().upper())
    print(json.dumps({"token": token, "pem": pem}))
    for line in pem.splitlines():                                     # a key printed line by line
        print(line)
    raise RuntimeError(f"bad token {base64.b64encode(token.encode()).decode()}")
"""


async def test_step_output_and_errors_hide_every_common_form(pool):
    emitted = Emitted()
    cmd = command("python", config={"code": PRINTS}, data={"token": "{{ secret.API }}", "pem": "{{ secret.PEM }}"},
                  deferred=["data.token", "data.pem"])
    await execute(cmd, WorkerPorts(emit=emitted, python_pool=pool, env=ENV))
    failed = emitted.last()
    assert failed.kind == "action_failed" and "Traceback" in failed.log and failed.log.count("***") >= 10
    _assert_hidden(json.dumps(failed.model_dump(mode="json")))


async def test_a_secret_cut_in_two_by_the_output_bound_leaves_no_piece():
    """The captured output keeps its start and its end: the cut can fall inside a secret, whose two halves
    would each pass an exact match. Output limit 1 KiB, the secret placed across the cut."""
    from noetl_runtime.settings import StepSettings
    settings = StepSettings(log_max_bytes=1024)
    secret = "Zb7Yq2Xw9Vu4Ts1Rp6On3Ml8Kj5Ih0G"
    code = "def main(s):\n    print('.' * 500 + s + '.' * 3000, end='')\n"
    for shift in range(-20, 21, 4):        # the cut at different places inside the secret
        code = f"def main(s):\n    print('.' * {500 + shift} + s + '.' * 3000, end='')\n"
        with PythonPool(1, settings=settings) as pool:
            emitted = Emitted()
            await execute(command("python", config={"code": code}, data={"s": "{{ secret.CUT }}"},
                                  deferred=["data.s"]),
                          WorkerPorts(emit=emitted, python_pool=pool, env={"NOETL_SECRET_CUT": secret},
                                      step_settings=settings))
            log = emitted.last().log
            assert "output cut here" in log and len(log.encode()) < 1024 + 200
            rest = re.sub(r"\n… \[output cut here: \d+ bytes dropped\] …\n", "", log).replace("***", "")
            assert re.search(r"[A-Za-z0-9]{3,}", rest) is None, (shift, log)
