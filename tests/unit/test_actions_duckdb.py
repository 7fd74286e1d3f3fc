"""`type: duckdb` steps and duckdb saves, in-process (DSL §2.3, §2.7)."""
import time

import duckdb

from noetl_common.messages import ActionCompleted, ActionFailed
from noetl_runtime.settings import StepSettings
from noetl_worker.execute import execute
from noetl_worker.ports import WorkerPorts

from test_worker_support import Emitted, MemoryCredentials, command, save_spec


async def run(cmd, creds=None, directories=""):
    """`directories`: what NOETL_STEP_DUCKDB_DIRECTORIES would declare (files elsewhere are refused)."""
    emitted = Emitted()
    await execute(cmd, WorkerPorts(emit=emitted, credentials=MemoryCredentials(creds or {}), env={},
                                   step_settings=StepSettings(duckdb_directories=directories)))
    return emitted.last()


async def test_statements_return_rows_per_statement():
    sql = ("CREATE OR REPLACE TABLE nums AS SELECT range AS x FROM range(5);\n"
           "SELECT sum(x)::INTEGER AS total, count(*)::INTEGER AS n FROM nums;")
    done = await run(command("duckdb", config={"commands": sql}))
    assert isinstance(done, ActionCompleted), done
    assert done.result["command_1"] == {"status": "success", "rows": [{"total": 10, "n": 5}], "row_count": 1,
                                        "columns": ["total", "n"]}


async def test_values_become_json():
    sql = ("SELECT 1.5::DECIMAL(4,2) AS d, [1, 2] AS l, {'a': 1} AS s, DATE '2020-01-01' AS day, "
           "'x'::BLOB AS b, NULL AS nothing, 'nan'::DOUBLE AS nan")
    done = await run(command("duckdb", config={"query": sql}))
    assert done.result["command_0"]["rows"] == [{"d": 1.5, "l": [1, 2], "s": {"a": 1}, "day": "2020-01-01",
                                                 "b": "\\x78", "nothing": None, "nan": "NaN"}]


async def test_database_file_is_shared_between_steps(tmp_path):
    db = str(tmp_path / "shared.duckdb")
    await run(command("duckdb", config={"command": "CREATE TABLE t (v INT); INSERT INTO t VALUES (1), (2)",
                                        "database": db}), directories=str(tmp_path))
    done = await run(command("duckdb", config={"sql": "SELECT sum(v) AS s FROM t", "database": db}),
                     directories=str(tmp_path))
    assert done.result["command_0"]["rows"] == [{"s": 3}]


async def test_failing_statement_names_its_index():
    failed = await run(command("duckdb", config={"command": "SELECT 1; SELECT * FROM no_such_table_q"}))
    assert isinstance(failed, ActionFailed)
    assert failed.error.startswith("command_1: Catalog Error") and "no_such_table_q" in failed.error
    assert failed.result["command_0"]["rows"] == [{"1": 1}]


async def test_timeout_interrupts_a_long_query():
    sql = "SELECT count(*) FROM range(100000000000) a"
    start = time.monotonic()
    failed = await run(command("duckdb", config={"query": sql}, timeout=0.5))
    assert isinstance(failed, ActionFailed) and failed.error == "timed out after 0.5s"
    assert time.monotonic() - start < 5


async def test_auth_alias_map_becomes_secrets_best_effort_and_values_stay_hidden():
    creds = {"pg_creds": ("postgres", {"host": "db.internal", "port": 5432, "user": "u",
                                       "password": "pw-never-shown-77", "database": "d"}),
             "gcs_hmac": ("hmac", {"key_id": "GOOGKEY", "secret_key": "hmac-secret-value-99"})}
    auth = {"pg_db": {"source": "credential", "key": "pg_creds"},
            "gcs_secret": {"source": "credential", "key": "gcs_hmac", "scope": "gs://bucket"}}
    done = await run(command("duckdb", auth=auth, config={"command": "SELECT 42 AS answer"}), creds)
    assert isinstance(done, ActionCompleted), done
    assert done.result["command_0"]["rows"] == [{"answer": 42}]
    # Either created or noted (no extension download here); never the values.
    text = repr(done)
    assert "pw-never-shown-77" not in text and "hmac-secret-value-99" not in text
    if done.log:
        assert "duckdb secret" in done.log


def test_secret_sql_quotes_values():
    from noetl_worker.actions.duckdb import secret_sql
    from noetl_worker.auth import ResolvedAuth
    sql = secret_sql("my alias", ResolvedAuth("postgres", {"host": "h", "port": 5432, "password": "it's"}))
    assert sql == ("CREATE OR REPLACE SECRET \"my alias\" (TYPE postgres, HOST 'h', PORT 5432, "
                   "PASSWORD 'it''s')")
    sql = secret_sql("g", ResolvedAuth("hmac", {"key_id": "k", "secret": "s"}, scope="gs://b"))
    assert sql == "CREATE OR REPLACE SECRET \"g\" (TYPE gcs, KEY_ID 'k', SECRET 's', SCOPE 'gs://b')"


async def test_duckdb_save_creates_the_table_and_upserts(tmp_path):
    db = str(tmp_path / "save.duckdb")
    for name, score in (("first", 1.5), ("second", 2.5)):
        save = save_spec(storage="duckdb", database=db, table="results", mode="upsert", key=["id"],
                         data={"id": "{{ result.id }}", "name": name, "score": score, "tags": ["a"], "none": None})
        done = await run(command("save", phase="save", result={"id": 7}, save=save), directories=str(tmp_path))
        assert isinstance(done, ActionCompleted), done
    with duckdb.connect(db) as con:
        assert con.execute("SELECT id, name, score, tags::VARCHAR, \"none\" FROM results").fetchall() == [
            (7, "second", 2.5, '["a"]', None)]


async def test_duckdb_save_explicit_command(tmp_path):
    db = str(tmp_path / "cmd.duckdb")
    save = save_spec(storage="duckdb", database=db,
                     command="CREATE TABLE IF NOT EXISTS log (v INT); INSERT INTO log VALUES ({{ result.v }})")
    done = await run(command("save", phase="save", result={"v": 5}, save=save), directories=str(tmp_path))
    assert isinstance(done, ActionCompleted), done
    with duckdb.connect(db) as con:
        assert con.execute("SELECT v FROM log").fetchall() == [(5,)]


async def test_no_sql_is_an_error():
    failed = await run(command("duckdb", config={"command": "-- nothing but a comment"}))
    assert isinstance(failed, ActionFailed) and "no statements" in failed.error
