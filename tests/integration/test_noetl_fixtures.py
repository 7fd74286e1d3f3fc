"""NoETL's own v1 fixtures (noetl@963d10a8, in ../shared/noetl-fixtures) run as that folder's README says a
correct run goes (issue 11): upstream playbooks nobody here wrote, run unchanged through the installed
`noetl run`, embedded, against a real Postgres (a database of its own, made for this module).

"NET" fixtures need the internet. The tests make "offline" deterministic whatever the machine can reach:
every non-local request goes through a proxy address where nothing listens, so it fails at once with a
connection error, which is what failing cleanly means. Hosts that a fixture takes from its workload are
pointed at a local stand-in (`--payload`), as the README says.

Two fixtures are defective in themselves (save_simple_test, save_delegation_test): they are run to show they
fail as the README says, and their adapted copies (../shared/noetl-fixtures/adapted@963d10a8) are run too.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from support import free_port, pg_execute, pg_rows, postgres_credentials, scratch_database

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT.parent / "shared" / "noetl-fixtures"        # read through ../shared, never copied
UPSTREAM = FIXTURES / "noetl@963d10a8" / "tests" / "fixtures" / "playbooks"
ADAPTED = FIXTURES / "adapted@963d10a8" / "tests" / "fixtures" / "playbooks"

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not UPSTREAM.is_dir(), reason=f"the upstream fixtures are not at {UPSTREAM}"),
]


# ---------------------------------------------------------------- Postgres: one database for this module

@pytest.fixture(scope="module")
def pg(pg_dsn: str) -> Iterator["Database"]:
    with scratch_database(pg_dsn, "noetl_fixtures") as dsn:
        yield Database(dsn)


class Database:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def rows(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return pg_rows(self.dsn, sql, *args)

    def execute(self, sql: str) -> None:
        pg_execute(self.dsn, sql)

    def credentials(self) -> dict[str, Any]:
        """The three credential names the fixtures use, all for this database."""
        return postgres_credentials(self.dsn, ("pg_local", "pg_k8s", "test_postgres"))


# ---------------------------------------------------------------- running a fixture

class Run:
    def __init__(self, code: int, report: dict[str, Any], stderr: str, store: Path) -> None:
        self.code, self.report, self.stderr, self.store = code, report, stderr, store
        self.status, self.error, self.result = report["status"], report.get("error") or "", report.get("result")
        self.steps, self.events = report.get("steps", {}), report.get("events", [])

    def step(self, name: str) -> dict[str, Any]:
        assert name in self.steps, f"step {name} did not run: {self.status} {self.error}"
        return self.steps[name]

    def events_of(self, event_type: str, step: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event_type"] == event_type and (step is None or e["node_name"] == step)]

    def kinds(self, step: str) -> list[str]:
        return [e["event_type"] for e in self.events if e["node_name"] == step]

    def child_executions(self) -> list[Any]:
        from noetl_runtime.sqlite_store import SqliteStore

        async def go() -> list[Any]:
            async with SqliteStore(self.store) as db:
                return [e for e in await db.executions() if e.parent_execution_id == self.report["execution_id"]]
        return asyncio.run(go())


@pytest.fixture
def run(tmp_path: Path, pg: Database):
    creds = tmp_path / "credentials.json"
    creds.write_text(json.dumps(pg.credentials()))
    dead = free_port()   # nothing listens there: a request to the internet fails at once, cleanly

    def go(file: Path, payload: dict[str, Any] | None = None, timeout: float = 180) -> Run:
        store = tmp_path / f"store-{uuid.uuid4().hex[:6]}.db"
        env = {k: v for k, v in os.environ.items() if k != "NOETL_STORE" and not k.lower().endswith("_proxy")}
        env.update(HTTP_PROXY=f"http://127.0.0.1:{dead}", HTTPS_PROXY=f"http://127.0.0.1:{dead}",
                   NO_PROXY="127.0.0.1,localhost")
        cmd = [*_noetl(), "run", str(file), "--json", "--catalog", str(UPSTREAM), "--credentials", str(creds),
               "--store", str(store)]
        if payload:
            cmd += ["--payload", json.dumps(payload)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, env=env)
        try:
            report = json.loads(proc.stdout)
        except ValueError:
            pytest.fail(f"no JSON report (exit {proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
        return Run(proc.returncode, report, proc.stderr, store)
    return go


def _noetl() -> list[str]:
    beside = Path(sys.executable).with_name("noetl")
    found = str(beside) if beside.exists() else shutil.which("noetl")
    if found is None:
        pytest.fail("the `noetl` command is not installed (pip install -e .)")
    return [found]


def _completed(r: Run) -> None:
    assert (r.status, r.code) == ("COMPLETED", 0), r.error or r.report.get("errors")


def _failed_offline(r: Run, step: str, host: str) -> None:
    """NET offline: FAILED at `step`, naming the host and the connection failure; quick, not a hang."""
    assert (r.status, r.code) == ("FAILED", 1), r.report
    assert r.error.startswith(f"step '{step}' failed") and host in r.error, r.error
    assert "ConnectError" in r.error or "connect" in r.error.lower(), r.error
    assert r.report["duration_ms"] < 60_000


# ---------------------------------------------------------------- a local stand-in for the HTTP hosts

class StandIn:
    """Answers like the hosts the NET fixtures call: httpbin's /status/<code>, /get, /post; open-meteo's
    /v1/forecast (echoing the coordinates it was asked for). Records every request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._answer()

            def do_POST(self) -> None:
                self._answer()

            def _answer(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(url.query))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                stand_in.requests.append({"method": self.command, "path": url.path, "query": query, "body": body})
                status, payload = 200, {"url": self.path, "args": query}
                if url.path.startswith("/status/"):
                    status, payload = int(url.path.rsplit("/", 1)[1]), {"status": "as asked"}
                elif url.path == "/v1/forecast":
                    payload = {"latitude": float(query.get("latitude", 0)),
                               "longitude": float(query.get("longitude", 0)),
                               "hourly": {"time": ["2025-01-01T00:00"], "temperature_2m": [4.5]}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stand_in() -> Iterator[StandIn]:
    server = StandIn()
    try:
        yield server
    finally:
        server.close()


def _retry_gaps(r: Run, step: str) -> list[tuple[float, float]]:
    """(delay the policy chose, seconds from that failed attempt to the next attempt's start) per retry."""
    retries = r.events_of("action_retry", step)
    starts = r.events_of("action_started", step)[1:]
    errors = r.events_of("action_error", step)
    return [(rt["result"]["delay"], st["time"] - err["time"]) for rt, st, err in zip(retries, starts, errors)]


# ---------------------------------------------------------------- fixtures that need nothing

def test_hello_world(run):
    r = run(UPSTREAM / "hello_world/hello_world.yaml")
    _completed(r)
    assert r.step("test_step")["result"] == {"message": "Hello World"}
    assert "HELLO_WORLD: Hello World" in r.events_of("action_completed", "test_step")[0]["meta"]["log"]
    # the control step `end` runs its event_log save on a worker, logged as its one attempt, data included
    assert r.kinds("end") == ["step_started", "action_started", "action_completed", "step_completed"]
    assert r.events_of("action_completed", "end")[0]["meta"]["saved"] == {"status": "success",
                                                                          "message": "Hello World"}


def test_control_flow_workbook_hot_and_cold(run):
    hot = run(UPSTREAM / "control_flow_workbook/control_flow_workbook.yaml")
    _completed(hot)
    assert hot.step("eval_flag")["result"] == {"is_hot": True, "message": "hot"}
    assert hot.step("hot_task_a")["result"] == {"who": "A"} and hot.step("hot_task_b")["result"] == {"who": "B"}
    assert "cold_path" not in hot.steps and hot.step("end")["visits"] == 1
    end_start = hot.events_of("step_started", "end")[0]["seq"]
    assert all(hot.events_of("step_completed", s)[0]["seq"] < end_start for s in ("hot_task_a", "hot_task_b"))
    cold = run(UPSTREAM / "control_flow_workbook/control_flow_workbook.yaml", {"temperature_c": 10})
    _completed(cold)
    assert cold.step("cold_task")["result"] == {"who": "C"}
    assert not {"hot_path", "hot_task_a", "hot_task_b"} & set(cold.steps)


def test_start_with_action(run):
    r = run(UPSTREAM / "test_start_with_action.yaml")
    _completed(r)
    assert [e["node_name"] for e in r.events_of("action_started")][0] == "start"
    assert r.step("process")["result"]["from_start"] is True


def test_end_with_action(run):
    r = run(UPSTREAM / "test_end_with_action.yaml")
    _completed(r)
    assert r.result == {"cleaned_up": True, "table": "temp_session_12345"}


def test_user_profile_scorer_alone_fails_naming_its_input_and_runs_with_one(run):
    scorer = UPSTREAM / "playbook_composition/user_profile_scorer.yaml"
    alone = run(scorer)
    assert (alone.status, alone.code) == ("FAILED", 1) and "user_data" in alone.error, alone.error
    user = {"name": "Alice", "age": 28, "department": "Engineering", "years_experience": 5,
            "performance_rating": 4.2}
    given = run(scorer, {"user_data": user, "execution_context": "by hand"})   # what a parent passes
    _completed(given)
    assert given.step("finalize_result")["result"]["profile_score"] == 16.2


def test_duckdb_query_key(run):
    r = run(UPSTREAM / "retry_test/duckdb_retry_query.yaml")
    _completed(r)
    assert r.step("start")["result"]["command_0"]["rows"] == [{"answer": 42, "status": "success"}]
    assert r.step("start")["attempts"] == 1


def test_python_retry_exception_follows_its_policy(run):
    r = run(UPSTREAM / "retry_test/python_retry_exception.yaml")   # fails about 70 % of attempts, at random
    attempts = r.step("start")["attempts"]
    assert 1 <= attempts <= 5
    if r.status == "COMPLETED":
        assert r.step("end")["status"] == "COMPLETED"        # a success after retries continues the run
    else:
        assert attempts == 5 and "Random failure" in r.error, r.error
    expected = [0.2, 0.3, 0.45, 0.675][:attempts - 1]
    gaps = _retry_gaps(r, "start")
    assert [round(delay, 3) for delay, _ in gaps] == expected
    assert all(waited >= delay - 0.01 for delay, waited in gaps), gaps


# ---------------------------------------------------------------- Postgres

def test_iterator_save(run, pg):
    r = run(UPSTREAM / "iterator_save_test.yaml")
    _completed(r)
    eid = r.report["execution_id"]
    rows = pg.rows("SELECT id, item_name, item_value FROM public.iterator_save_test WHERE execution_id = $1 "
                   "ORDER BY id", eid)
    assert rows == [{"id": f"{eid}:item{i}", "item_name": f"item{i}", "item_value": 100 * i} for i in (1, 2, 3)]


def test_playbook_composition(run, pg):
    r = run(UPSTREAM / "playbook_composition/playbook_composition.yaml")
    _completed(r)
    rows = pg.rows("SELECT user_name, profile_score, score_category FROM public.user_profile_results "
                   "WHERE execution_id = $1 ORDER BY user_name", r.report["execution_id"])
    assert [(x["user_name"], x["profile_score"], x["score_category"]) for x in rows] == [
        ("Alice", 16.2, "Junior"), ("Bob", 16.7, "Junior"), ("Charlie", 15.6, "Junior"), ("Diana", 21.2, "Junior")]
    assert r.step("validate_results")["result"]["all_valid"] is True
    assert r.result["pipeline_status"] == "completed"
    children = r.child_executions()
    assert len(children) == 4 and {c.status for c in children} == {"COMPLETED"}


def test_postgres_auth_mapping_and_query_key(run):
    r = run(UPSTREAM / "retry_test/postgres_retry_connection.yaml")
    _completed(r)
    assert r.step("start")["result"]["command_0"]["rows"] == [{"test_value": 1}]


@pytest.fixture(scope="module")
def storage_tables(pg: Database, tmp_path_factory) -> dict[str, Any]:
    """create_tables.yaml, run once: the save_storage fixtures need its tables."""
    tmp = tmp_path_factory.mktemp("create_tables")
    creds = tmp / "credentials.json"
    creds.write_text(json.dumps(pg.credentials()))
    proc = subprocess.run([*_noetl(), "run", str(UPSTREAM / "save_storage_test/create_tables.yaml"), "--json",
                           "--credentials", str(creds), "--store", str(tmp / "s.db")],
                          capture_output=True, text=True, timeout=120, cwd=tmp)
    return json.loads(proc.stdout)


def test_create_tables(storage_tables, pg):
    assert storage_tables["status"] == "COMPLETED", storage_tables.get("error")
    tables = {x["table_name"] for x in pg.rows("SELECT table_name FROM information_schema.tables "
                                               "WHERE table_schema = 'public'")}
    assert {"simple_test_flat", "simple_test_nested", "test_summary"} <= tables


def test_save_simple_test_is_defective_and_its_adapted_copy_saves(run, pg, storage_tables):
    broken = run(UPSTREAM / "save_storage_test/save_simple_test.yaml")
    assert broken.status == "FAILED" and "postgres_nested_test" in broken.error, broken.error
    assert "column" in broken.error and "does not exist" in broken.error, broken.error
    pg.execute("DELETE FROM simple_test_flat WHERE test_id IN ('100', '200');"
               "DELETE FROM simple_test_nested WHERE test_id IN ('100', '200')")
    fixed = run(ADAPTED / "save_storage_test/save_simple_test.adapted.yaml")
    _completed(fixed)
    assert len(pg.rows("SELECT 1 FROM simple_test_flat WHERE test_id = '100'")) == 1
    assert len(pg.rows("SELECT 1 FROM simple_test_nested WHERE test_id = '200'")) == 1


def test_save_delegation_test_is_invalid_and_its_adapted_copy_saves_until_the_http_save(run):
    invalid = run(UPSTREAM / "save_storage_test/save_delegation_test.yaml")
    assert (invalid.status, invalid.code) == ("INVALID", 2)
    assert "no step named 'start'" in json.dumps(invalid.report["errors"])
    adapted = run(ADAPTED / "save_storage_test/save_delegation_test.adapted.yaml")
    for step in ("start", "postgres_test", "duckdb_test"):
        assert adapted.step(step)["status"] == "COMPLETED", step
    _failed_offline(adapted, "http_test", "httpbin.org")


def _check_save_all_storage_types(run, file: Path, pg: Database) -> None:
    """Every save before the http one succeeds with its rows; the http save needs NET."""
    summaries = "SELECT count(*) AS n FROM test_summary WHERE summary_type = 'department_stats'"
    before = pg.rows(summaries)[0]["n"]
    r = run(file)
    eid = r.report["execution_id"]
    for step in ("initialize_test_data", "test_flat_postgres_save", "test_nested_postgres_save",
                 "test_postgres_statement_save", "test_python_save", "test_duckdb_save"):
        assert r.step(step)["status"] == "COMPLETED", (step, r.error)
    assert r.events_of("action_completed", "initialize_test_data")[0]["meta"]["saved"]["execution_id"] == eid
    assert pg.rows("SELECT test_name, test_value FROM simple_test_flat WHERE test_execution = $1", eid) == [
        {"test_name": "Test Employee Flat", "test_value": 55000}]
    nested = pg.rows("SELECT test_id, test_data FROM simple_test_nested WHERE test_execution = $1", eid)
    assert [x["test_id"] for x in nested] == [f"{eid}_nested"]
    assert json.loads(nested[0]["test_data"])["value"] == 58000
    assert pg.rows(summaries)[0]["n"] == before + 1      # the `statement` save (its rows name no execution)
    _failed_offline(r, "test_http_save", "httpbin.org")


def test_save_all_storage_types(run, pg, storage_tables):
    """As is: `data: "{{ x.data }}"` (one template as the whole data) loads and renders to the mapping, and
    `initialize_test_data` reads NoETL's read-only `context` global (`context.get("execution_id")`)."""
    _check_save_all_storage_types(run, UPSTREAM / "save_storage_test/save_all_storage_types.yaml", pg)


def test_save_all_storage_types_adapted(run, pg, storage_tables):
    _check_save_all_storage_types(run, ADAPTED / "save_storage_test/save_all_storage_types.adapted.yaml", pg)


def test_save_edge_cases_store_values_exactly(run, pg):
    # A fixture defect: no fixture creates these two tables (columns as the fixture's data).
    pg.execute("CREATE TABLE IF NOT EXISTS test_mixed_types (string_field TEXT, integer_field INTEGER, "
               "float_field DOUBLE PRECISION, boolean_field BOOLEAN, null_field TEXT, datetime_field TEXT, "
               "list_field JSONB, dict_field JSONB, decimal_field DOUBLE PRECISION);"
               "CREATE TABLE IF NOT EXISTS test_special_chars (quotes TEXT, unicode TEXT, sql_injection TEXT, "
               "newlines TEXT, backslashes TEXT, json_string TEXT);"
               "TRUNCATE test_mixed_types; TRUNCATE test_special_chars")
    r = run(UPSTREAM / "save_storage_test/save_edge_cases.yaml")
    for step in ("start", "test_special_characters", "test_empty_data", "test_large_payload"):
        assert r.step(step)["status"] == "COMPLETED", (step, r.error)
    mixed = pg.rows("SELECT * FROM test_mixed_types")
    assert len(mixed) == 1
    row = mixed[0]
    assert (row["string_field"], row["integer_field"], row["float_field"], row["boolean_field"],
            row["null_field"], row["decimal_field"]) == ("test_string", 12345, 3.14159, True, None, 99.99)
    assert json.loads(row["list_field"]) == [1, 2, 3, "mixed", True]
    assert json.loads(row["dict_field"]) == {"nested": "value", "count": 42}
    assert pg.rows("SELECT * FROM test_special_chars") == [{
        "quotes": "This has 'single' and \"double\" quotes", "unicode": "Unicode: αβγδε, 中文, 🚀🌟",
        "sql_injection": "'; DROP TABLE test; --", "newlines": "Line 1\nLine 2\r\nLine 3",
        "backslashes": "C:\\path\\to\\file", "json_string": '{"embedded": "json", "value": 123}'}]
    _failed_offline(r, "test_error_recovery", "httpbin.org")


# ---------------------------------------------------------------- NET: offline, then against a stand-in

def test_http_retry_status_code(run, stand_in):
    offline = run(UPSTREAM / "retry_test/http_retry_status_code.yaml")
    _failed_offline(offline, "start", "httpbin.org")
    r = run(UPSTREAM / "retry_test/http_retry_status_code.yaml", {"test_url": f"{stand_in.url}/status/503"})
    assert r.status == "FAILED" and "HTTP 503" in r.error, r.error
    assert r.step("start")["attempts"] == 3 and len(stand_in.requests) == 3
    gaps = _retry_gaps(r, "start")
    assert [delay for delay, _ in gaps] == [0.5, 1.0] and all(w >= d - 0.01 for d, w in gaps), gaps


def test_http_retry_with_stop(run, stand_in):
    _failed_offline(run(UPSTREAM / "retry_test/http_retry_with_stop.yaml"), "start", "httpbin.org")
    r = run(UPSTREAM / "retry_test/http_retry_with_stop.yaml", {"test_url": f"{stand_in.url}/get"})
    _completed(r)
    assert r.step("start")["attempts"] == 1 and len(stand_in.requests) == 1


def test_retry_simple_config(run, stand_in):
    _failed_offline(run(UPSTREAM / "retry_test/retry_simple_config.yaml"), "boolean_retry", "httpbin.org")
    r = run(UPSTREAM / "retry_test/retry_simple_config.yaml", {"test_url": f"{stand_in.url}/get"})
    _completed(r)
    assert [q["path"] for q in stand_in.requests] == ["/get"] * 3


def test_http_duckdb_postgres(run, pg, stand_in):
    original = UPSTREAM / "http_duckdb_postgres/http_duckdb_postgres.yaml"
    offline = run(original)
    assert offline.status == "FAILED" and "api.open-meteo.com" in offline.error, offline.error
    assert offline.report["duration_ms"] < 60_000
    # against the stand-in the original stops at its own defect: the iteration's assert.returns
    defective = run(original, {"base_url": f"{stand_in.url}/v1"})
    assert defective.status == "FAILED" and "assert.returns" in defective.error, defective.error
    stand_in.requests.clear()
    r = run(ADAPTED / "http_duckdb_postgres/http_duckdb_postgres.adapted.yaml", {"base_url": f"{stand_in.url}/v1"})
    cities = {(51.51, -0.13), (48.85, 2.35), (52.52, 13.41)}
    assert [q["path"] for q in stand_in.requests] == ["/v1/forecast"] * 3
    assert {(float(q["query"]["latitude"]), float(q["query"]["longitude"])) for q in stand_in.requests} == cities
    assert all(q["query"]["hourly"] == "temperature_2m" and q["query"]["forecast_days"] == "1"
               for q in stand_in.requests)
    rows = pg.rows("SELECT city FROM public.weather_http_raw WHERE execution_id = $1 ORDER BY city",
                   r.report["execution_id"])
    assert [x["city"] for x in rows] == ["Berlin", "London", "Paris"]
    # `assert.expects: [auth.pg_db, auth.gcs_secret, data.require_cloud_output]` holds: the DuckDB step is
    # dispatched (an unmet expects fails it before any attempt); it then needs the internet and cloud storage.
    assert r.status == "FAILED" and r.error.startswith("step 'aggregate_with_duckdb' failed"), r.error
    assert "assert.expects" not in r.error
    assert r.events_of("action_started", "aggregate_with_duckdb")
