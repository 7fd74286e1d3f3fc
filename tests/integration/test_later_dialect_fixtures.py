"""The later-dialect playbooks of ../shared/noetl-fixtures (corpusB-selection.txt: NoETL DSL "v2" and "v10",
written upstream) each either run correctly under ../shared/docs/playbook-dsl-v10.md or are rejected with
one error that names what this engine does not run; none reports success without running (issue 11).

Each fixture is RUN through the installed `noetl run --json`, embedded, read where it lies (never copied),
with outbound traffic blocked the way test_noetl_fixtures.py does it (a proxy where nothing listens).

- Eight e2e fixtures have a byte-identical twin in ../shared/conformance/cases-v10 whose case.yaml states the
  contract's outcome: the fixture itself is run and checked against that case's `expect` by the kit's own
  checker (run.py's check_case, imported from ../shared, not duplicated). A twin the kit lists in
  docs/dialect-v10-failing.txt (a known gap) must instead be rejected with one error naming the construct.
- The other fixtures' outcomes are stated here, each with the rule it follows.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import yaml

from support import free_port, pg_execute, postgres_credentials, scratch_database

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "noetl-fixtures"
CASES = SHARED / "conformance" / "cases-v10"
KNOWN_FAILING = ROOT / "docs" / "dialect-v10-failing.txt"

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not (FIXTURES / "corpusB-selection.txt").exists() or not CASES.is_dir(),
                       reason=f"the later-dialect fixtures or cases-v10 are not under {SHARED}"),
]


def _selection() -> list[tuple[str, str]]:
    listing = FIXTURES / "corpusB-selection.txt"
    if not listing.exists():
        return []
    return [tuple(line.split()[:2]) for line in listing.read_text().splitlines() if line.strip()]  # type: ignore


def _twins() -> dict[str, Path]:
    """fixture file (folder/path) -> its cases-v10 case folder, from each case's `Source:` line."""
    out: dict[str, Path] = {}
    if not CASES.is_dir():
        return out
    selected = {f"{a}/{b}" for a, b in _selection()}
    for case in sorted(CASES.iterdir()):
        text = (case / "case.yaml").read_text() if (case / "case.yaml").exists() else ""
        found = re.search(r"Source: noetl/e2e@1e41859c?:(\S+\.yaml)", text)
        if found and f"e2e@1e41859/{found.group(1)}" in selected:
            out[f"e2e@1e41859/{found.group(1)}"] = case
    return out


def _known_failing() -> set[str]:
    lines = KNOWN_FAILING.read_text().splitlines() if KNOWN_FAILING.exists() else []
    return {line.split()[0] for line in lines if line.strip() and not line.startswith("#")}


def _noetl() -> str:
    beside = Path(sys.executable).with_name("noetl")
    found = str(beside) if beside.exists() else shutil.which("noetl")
    if found is None:
        pytest.fail("the `noetl` command is not installed (pip install -e .)")
    return found


def _kit() -> Any:
    """../shared/conformance/run.py as a module: its checker, fixture server and credential builder."""
    spec = importlib.util.spec_from_file_location("conformance_kit", SHARED / "conformance" / "run.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kit() -> Iterator[tuple[Any, str]]:
    module = _kit()
    server, base_url = module.start_fixture_server()
    try:
        yield module, base_url
    finally:
        server.shutdown()


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every non-local request goes to a proxy where nothing listens: it fails at once, cleanly."""
    dead = free_port()
    for key in list(os.environ):
        if key.lower().endswith("_proxy"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{dead}")
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{dead}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("NOETL_STORE", raising=False)


# ---------------------------------------------------------------- Postgres: one database for this module

@pytest.fixture(scope="module")
def database(pg_dsn: str) -> Iterator[str]:
    with scratch_database(pg_dsn, "noetl_later") as dsn:
        yield dsn


def run(file: Path, tmp: Path, credentials: dict[str, Any] | None = None, payload: dict | None = None
        ) -> tuple[int, dict[str, Any]]:
    creds = tmp / f"creds-{uuid.uuid4().hex[:6]}.json"
    creds.write_text(json.dumps(credentials or {}))
    cmd = [_noetl(), "run", str(file), "--json", "--catalog", str(file.parent), "--credentials", str(creds),
           "--store", str(tmp / f"store-{uuid.uuid4().hex[:6]}.db")]
    if payload:
        cmd += ["--payload", json.dumps(payload)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp)
    try:
        return proc.returncode, json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"no JSON report (exit {proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}")


def one_error_naming(report: dict[str, Any], code: int, *words: str) -> None:
    """Rejected before running, with exactly one error, which names the unsupported construct."""
    assert (report["status"], code) == ("INVALID", 2), report
    assert len(report["errors"]) == 1, report["errors"]
    message = report["errors"][0]["message"]
    for word in words:
        assert word in message, message
    assert "not supported" in message or "must be" in message, message
    assert not report.get("steps") and not [e for e in report.get("events", []) if e["event_type"] == "step_started"]


def ran_for_real(report: dict[str, Any]) -> None:
    """Nothing reports success without running: every step reported COMPLETED has its step_completed."""
    completed = {e["node_name"] for e in report["events"] if e["event_type"] == "step_completed"}
    for name, step in report["steps"].items():
        if step["status"] == "COMPLETED":
            assert name in completed, name


# ---------------------------------------------------------------- the fixtures with a cases-v10 twin

TWINS = _twins()


@pytest.mark.parametrize("fixture", sorted(TWINS), ids=lambda f: f.split("/", 1)[1])
def test_a_fixture_with_a_twin_case_runs_as_its_case_says(fixture, kit, offline, database, tmp_path):
    module, base_url = kit
    case_dir = TWINS[fixture]
    file = FIXTURES / fixture
    assert file.read_bytes() == (case_dir / "playbook.yaml").read_bytes(), "the twin is not byte-identical"
    if case_dir.name in _known_failing():   # a known gap (docs/dialect-v10-failing.txt): one clear error
        code, report = run(file, tmp_path)
        reason = next(line for line in KNOWN_FAILING.read_text().splitlines() if line.startswith(case_dir.name))
        kind = re.search(r"kind: (\w+)", reason)   # the construct the list names, e.g. "kind: playbook inside..."
        one_error_naming(report, code, *([f"'{kind.group(1)}'"] if kind else []))
        return
    case = yaml.safe_load((case_dir / "case.yaml").read_text())
    case["playbook"] = str(file)   # the fixture itself, where it lies (case_dir / an absolute path = the path)
    args = SimpleNamespace(cmd=f"{_noetl()} run", pg_dsn=database, pg_ok=True, timeout=180, verbose=0)
    problems = module.check_case(case_dir, case, args, base_url)
    assert not problems, problems


def test_every_e2e_fixture_but_two_has_a_twin():
    e2e = {f"{a}/{b}" for a, b in _selection() if a.startswith("e2e@")}
    assert e2e - set(TWINS) == {"e2e@1e41859/fixtures/playbooks/retry_test/python_retry_exception.yaml",
                                "e2e@1e41859/fixtures/playbooks/postgres_test.yaml"}


# ---------------------------------------------------------------- the others, outcome stated here

def fixture(name: str) -> Path:
    folder, path = name.split(" ", 1)
    return FIXTURES / folder / path


V2_CASE = ["noetl@67171bf1 tests/fixtures/playbooks/hello_world/hello_world.yaml",
           "noetl@67171bf1 tests/fixtures/playbooks/control_flow_workbook/control_flow_workbook.yaml",
           "noetl@67171bf1 tests/fixtures/playbooks/vars_test/test_vars_simple.yaml",
           "noetl@67171bf1 tests/fixtures/playbooks/iterator_save_test.yaml"]


@pytest.mark.parametrize("name", V2_CASE)
def test_v2_case_rules_are_rejected_with_one_error(name, offline, tmp_path):
    """v2 `case:` event rules (V10-5.11) are not implemented (docs/dialect-v10.md, Not done)."""
    code, report = run(fixture(name), tmp_path)
    one_error_naming(report, code, "`case`", "NoETL DSL v2")


def test_v2_save_on_an_end_step_is_rejected_with_one_error(offline, tmp_path):
    """0b0a1b8f hello_world: `tool: end` is a control step (V10-2.14), its `save` a v2 sink (V10-10.1),
    which is not implemented: never silently dropped."""
    code, report = run(fixture("noetl@0b0a1b8f tests/fixtures/playbooks/hello_world/hello_world.yaml"), tmp_path)
    one_error_naming(report, code, "`save`", "'end'")


def test_v2_iterator_kind_is_rejected_with_one_error(offline, tmp_path):
    """0b0a1b8f iterator_save_test: v2 `tool: iterator` (V10-2.14: v1 `type: iterator`) is not implemented
    (docs/dialect-v10.md, Not done)."""
    code, report = run(fixture("noetl@0b0a1b8f tests/fixtures/playbooks/iterator_save_test.yaml"), tmp_path)
    one_error_naming(report, code, "'iterator'")


def test_a_parallel_next_mode_is_rejected_with_one_error(offline, tmp_path):
    """efacd51f control_flow_workbook: `next.spec.mode: parallel` is no mode of the contract (V10-5.2:
    exclusive | inclusive)."""
    name = "noetl@efacd51f tests/fixtures/playbooks/control_flow_workbook/control_flow_workbook.yaml"
    code, report = run(fixture(name), tmp_path)
    one_error_naming(report, code, "'parallel'", "exclusive or inclusive")


@pytest.mark.parametrize("temperature, path", [(None, ["hot_path", "hot_task_a", "hot_task_b"]),
                                               (10, ["cold_path", "cold_task"])])
def test_v2_control_flow_workbook_routes_hot_and_cold(temperature, path, offline, tmp_path):
    """0b0a1b8f control_flow_workbook: a v2 workbook entry `tool: python` (V10-2.6), `tool: router` as noop,
    a v2 list `next` (V10-5.10: every truthy `when`, two unconditional entries fan out), `end` after both."""
    name = "noetl@0b0a1b8f tests/fixtures/playbooks/control_flow_workbook/control_flow_workbook.yaml"
    code, report = run(fixture(name), tmp_path, payload={"temperature_c": temperature} if temperature else None)
    assert (report["status"], code) == ("COMPLETED", 0), report.get("error") or report.get("errors")
    ran_for_real(report)
    steps = report["steps"]
    assert sorted(steps) == sorted(["start", "eval_flag", "end", *path])
    hot = temperature is None
    assert steps["eval_flag"]["result"] == {"is_hot": hot, "message": "hot" if hot else "cold"}
    expected = {"hot_task_a": {"who": "A"}, "hot_task_b": {"who": "B"}, "cold_task": {"who": "C"}}
    for step in path[1:]:
        assert steps[step]["result"] == expected[step]
    order = [e["node_name"] for e in report["events"] if e["event_type"] == "step_completed"]
    assert order[-1] == "end" and all(order.index(s) < order.index("end") for s in path)


RETRIES = {   # fixture -> (policy delays between attempts, the step's attempts limit, the retry kind)
    "noetl@0b0a1b8f tests/fixtures/playbooks/retry_test/python_retry_exception.yaml":
        ([0.2, 0.3, 0.45, 0.675], 5),    # v2 step retry = v1 retry (V10-9.5): 0.2 x 1.5^(n-1)
    "e2e@1e41859 fixtures/playbooks/retry_test/python_retry_exception.yaml":
        ([0.2, 0.4, 0.8, 1.6], 5),       # v10 policy: retry, attempts 5, exponential from 0.2 (V10-9.3)
}


@pytest.mark.parametrize("name", sorted(RETRIES))
def test_random_failures_are_retried_by_the_policy(name, offline, tmp_path):
    """Fails about 70 % of the time on purpose: either COMPLETED after at most 5 attempts (then `end` runs),
    or FAILED after exactly 5, naming the random failure; the delays follow the policy."""
    delays, limit = RETRIES[name]
    code, report = run(fixture(name), tmp_path)
    start = report["steps"]["start"]
    retries = [e for e in report["events"] if e["event_type"] == "action_retry" and e["node_name"] == "start"]
    assert [round(e["result"]["delay"], 3) for e in retries] == delays[:len(retries)]
    assert start["attempts"] == len(retries) + 1
    if report["status"] == "COMPLETED":
        assert code == 0 and start["attempts"] <= limit and "end" in report["steps"]
        assert start["result"]["success"] is True
        ran_for_real(report)
    else:
        assert (report["status"], code) == ("FAILED", 1), report
        assert start["attempts"] == limit and "Random failure" in report["error"]
        assert "end" not in report["steps"]
    assert report["duration_ms"] >= 1000 * sum(delays[:len(retries)]) - 50


def test_e2e_postgres_test_reads_the_catalog_then_fails_where_its_python_expects_a_list(offline, database,
                                                                                       tmp_path):
    """e2e postgres_test queries upstream's `noetl.catalog` with credential `pg_noetl_k8s` (V10-1.9: resolved
    from the store). `start` is a pipeline, so `{{ start }}` is a mapping (V10-2.10), never the list `process`
    looks for: it returns `{status: error}` (V10-2.9) and the run fails there, as the duckdb_test twin says
    of the same pattern."""
    pg_execute(database, "CREATE SCHEMA IF NOT EXISTS noetl; CREATE TABLE IF NOT EXISTS noetl.catalog (kind text);"
                   "TRUNCATE noetl.catalog; INSERT INTO noetl.catalog VALUES ('Playbook'), ('Playbook'), ('Credential')")
    file = fixture("e2e@1e41859 fixtures/playbooks/postgres_test.yaml")
    code, report = run(file, tmp_path, credentials=postgres_credentials(database, ("pg_noetl_k8s",)))
    assert (report["status"], code) == ("FAILED", 1), report
    start = report["steps"]["start"]
    assert start["status"] == "COMPLETED"
    rows = json.dumps(start["result"])
    assert '"kind": "Playbook", "count": 2' in rows and '"kind": "Credential", "count": 1' in rows
    assert report["steps"]["process"]["status"] == "FAILED"
    assert "Invalid query result format" in report["error"] and "process" in report["error"]
    assert "verify" not in report["steps"] and "end" not in report["steps"]


def test_without_its_credential_postgres_test_fails_naming_it(offline, tmp_path):
    code, report = run(fixture("e2e@1e41859 fixtures/playbooks/postgres_test.yaml"), tmp_path)
    assert (report["status"], code) == ("FAILED", 1) and "pg_noetl_k8s" in report["error"], report


def test_every_fixture_of_the_selection_is_covered_here():
    covered = {f"{a}/{b}" for a, b in (n.split(" ", 1) for n in [*V2_CASE, *RETRIES])} | set(TWINS) | {
        "noetl@0b0a1b8f/tests/fixtures/playbooks/hello_world/hello_world.yaml",
        "noetl@0b0a1b8f/tests/fixtures/playbooks/iterator_save_test.yaml",
        "noetl@0b0a1b8f/tests/fixtures/playbooks/control_flow_workbook/control_flow_workbook.yaml",
        "noetl@efacd51f/tests/fixtures/playbooks/control_flow_workbook/control_flow_workbook.yaml",
        "e2e@1e41859/fixtures/playbooks/postgres_test.yaml"}
    assert {f"{a}/{b}" for a, b in _selection()} == covered
