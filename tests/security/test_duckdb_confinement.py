"""Issue 9, finding: a duckdb step (no python at all) read `secret.key` with read_text and wrote files with
COPY ... TO. DuckDB runs inside the engine's process, so its own guard is what keeps step SQL away from the
engine's files: external access is limited to NOETL_STEP_DUCKDB_DIRECTORIES and locked."""
from __future__ import annotations

import json

from engine_run import engine_env, run_playbook


def _duckdb(sql: str, database: str = ":memory:") -> str:
    return f"""
apiVersion: noetl.io/v1
kind: Playbook
metadata: {{name: duck, path: security/duck}}
workflow:
  - step: start
    next: [{{step: q}}]
  - step: q
    type: duckdb
    database: {json.dumps(database)}
    command: {json.dumps(sql)}
    next: [{{step: end}}]
  - step: end
"""


def _without_env_key(home):
    return {k: v for k, v in engine_env(home).items() if k != "NOETL_SECRET_KEY"}


def test_a_duckdb_step_cannot_read_the_key_file(home):
    key_file = home / "store" / "secret.key"
    run = run_playbook(home, _duckdb(f"SELECT content FROM read_text('{key_file}')"), env=_without_env_key(home))
    assert key_file.exists()
    step = run.step("q")
    assert step["status"] == "FAILED" and "disabled by configuration" in step["error"], step
    assert key_file.read_text().strip() not in run.everything


def test_a_duckdb_step_cannot_write_files_outside_the_declared_directories(home):
    target = home / "written.csv"
    run = run_playbook(home, _duckdb(f"COPY (SELECT 42 AS x) TO '{target}'"))
    assert run.step("q")["status"] == "FAILED" and not target.exists()


def test_sql_cannot_undo_the_confinement(home):
    for sql in ("SET enable_external_access = true", "RESET enable_external_access",
                "SET allowed_directories = ['/']", "SET lock_configuration = false"):
        run = run_playbook(home, _duckdb(sql))
        assert run.step("q")["status"] == "FAILED" and "locked" in run.step("q")["error"], (sql, run.step("q"))


def test_extensions_need_the_operators_consent(home):
    run = run_playbook(home, _duckdb("INSTALL httpfs; LOAD httpfs; SELECT 1"))
    assert run.step("q")["status"] == "FAILED"
    assert "NOETL_STEP_DUCKDB_EXTENSIONS" in run.step("q")["error"], run.step("q")


def test_declared_directories_work_and_nothing_else_does(home):
    allowed = home / "data"
    allowed.mkdir()
    env = engine_env(home, NOETL_STEP_DUCKDB_DIRECTORIES=str(allowed))
    sql = (f"COPY (SELECT 42 AS x) TO '{allowed}/out.csv'; "
           f"SELECT x FROM read_csv('{allowed}/out.csv')")
    run = run_playbook(home, _duckdb(sql, database=str(allowed / "db.duckdb")), env=env)
    assert run.step("q")["status"] == "COMPLETED", run.step("q")
    assert run.step("q")["result"]["command_1"]["rows"] == [{"x": 42}]
    # a sibling folder whose name starts the same is not inside it
    sibling = home / "data-other"
    sibling.mkdir()
    run = run_playbook(home, _duckdb(f"COPY (SELECT 1) TO '{sibling}/x.csv'"), env=env)
    assert run.step("q")["status"] == "FAILED" and not (sibling / "x.csv").exists()
    # nor is a database file elsewhere, the store's included
    run = run_playbook(home, _duckdb("SELECT 1", database=str(home / "store" / "noetl.db")), env=env)
    assert run.step("q")["status"] == "FAILED" and "NOETL_STEP_DUCKDB_DIRECTORIES" in run.step("q")["error"]
