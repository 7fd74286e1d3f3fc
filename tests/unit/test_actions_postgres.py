"""`type: postgres` steps and postgres saves against a real Postgres (NOETL_TEST_PG_DSN)."""
import urllib.parse
import uuid

import asyncpg
import pytest

from noetl_common.messages import ActionCompleted, ActionFailed
from noetl_worker.execute import execute
from noetl_worker.ports import WorkerPorts
from noetl_worker.python_pool import PythonPool

from test_worker_support import Emitted, MemoryCredentials, command, save_spec


def pg_fields(dsn: str) -> dict:
    u = urllib.parse.urlsplit(dsn)
    return {"host": u.hostname or "127.0.0.1", "port": u.port or 5432,
            "user": urllib.parse.unquote(u.username or "postgres"),
            "password": urllib.parse.unquote(u.password or ""),
            "database": (u.path or "/postgres").lstrip("/") or "postgres"}


@pytest.fixture(scope="module")
def pool():
    p = PythonPool(1)
    yield p
    p.close()


@pytest.fixture
async def table(pg_dsn):
    """A unique table name (tests share one server), dropped afterwards."""
    name = f"t_worker_{uuid.uuid4().hex[:10]}"
    yield name
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f"DROP TABLE IF EXISTS public.{name}")
        await conn.execute(f"DROP FUNCTION IF EXISTS public.{name}_double(INT)")
    finally:
        await conn.close()


def make_ports(pg_dsn, emitted, pool=None, **extra_creds):
    creds = {"pg_local": ("postgres", {**pg_fields(pg_dsn), "dsn": pg_dsn}), **extra_creds}
    return WorkerPorts(emit=emitted, credentials=MemoryCredentials(creds), python_pool=pool, env={})


async def run(cmd, ports):
    await execute(cmd, ports)
    return ports.emit.last()


async def fetch(pg_dsn, sql):
    conn = await asyncpg.connect(pg_dsn)
    try:
        return [dict(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


async def test_statements_run_in_order_and_rows_are_dicts(pg_dsn, table):
    ports = make_ports(pg_dsn, Emitted())
    ddl = f"""
      -- a comment line; the next statement has a ; inside a string and a dollar-quoted body
      CREATE TABLE public.{table} (id INT PRIMARY KEY, label TEXT, note TEXT, amount NUMERIC(6,2),
                                   day DATE, doc JSONB);
      CREATE OR REPLACE FUNCTION public.{table}_double(x INT) RETURNS INT AS $fn$ SELECT x * 2; $fn$ LANGUAGE sql;
      INSERT INTO public.{table} VALUES (0, 'zero', 'a;b', 1.50, '2024-02-29', '{{"k": [1, 2]}}');
      /* block comment only */
    """
    done = await run(command("postgres", config={"command": ddl}, auth="pg_local"), ports)
    assert isinstance(done, ActionCompleted), done
    assert sorted(done.result) == ["command_0", "command_1", "command_2"]
    assert done.result["command_2"]["row_count"] == 1
    query = f"SELECT id, label, note, amount, day, doc, public.{table}_double(id + 1) AS twice FROM public.{table}"
    done = await run(command("postgres", config={"query": query}, auth="pg_local"), ports)
    c0 = done.result["command_0"]
    assert c0["status"] == "success" and c0["row_count"] == 1
    assert c0["columns"] == ["id", "label", "note", "amount", "day", "doc", "twice"]
    assert c0["rows"] == [{"id": 0, "label": "zero", "note": "a;b", "amount": 1.5, "day": "2024-02-29",
                           "doc": {"k": [1, 2]}, "twice": 2}]


async def test_sql_synonym_and_data_rendered_into_nothing_else(pg_dsn):
    ports = make_ports(pg_dsn, Emitted())
    done = await run(command("postgres", config={"sql": "SELECT g AS n FROM generate_series(1, 3) g"},
                             auth="pg_local"), ports)
    assert done.result["command_0"]["rows"] == [{"n": 1}, {"n": 2}, {"n": 3}]


async def test_failing_statement_names_its_index_and_the_database_message(pg_dsn):
    ports = make_ports(pg_dsn, Emitted())
    failed = await run(command("postgres", auth="pg_local",
                               config={"command": "SELECT 1; SELECT * FROM public.conf_table_that_does_not_exist_xyz;"}),
                       ports)
    assert isinstance(failed, ActionFailed)
    assert failed.error == 'command_1: relation "public.conf_table_that_does_not_exist_xyz" does not exist'
    assert failed.result == {"command_0": {"status": "success", "rows": [{"?column?": 1}], "row_count": 1,
                                           "columns": ["?column?"]}}


async def test_credential_field_aliases_and_dsn_only(pg_dsn):
    f = pg_fields(pg_dsn)
    aliased = {"db_host": f["host"], "db_port": str(f["port"]), "db_user": f["user"],
               "db_password": f["password"], "db_name": f["database"]}
    ports = make_ports(pg_dsn, Emitted(), aliased=("postgres", aliased), only_dsn=("postgres", {"dsn": pg_dsn}))
    for name in ("aliased", "only_dsn"):
        done = await run(command("postgres", config={"command": "SELECT 41 + 1 AS x"}, auth=name), ports)
        assert done.result["command_0"]["rows"] == [{"x": 42}], name


async def test_postgres_without_auth_or_with_unknown_credential_fails_clearly(pg_dsn):
    ports = make_ports(pg_dsn, Emitted())
    failed = await run(command("postgres", config={"command": "SELECT 1"}), ports)
    assert "needs `auth`" in failed.error
    failed = await run(command("postgres", config={"command": "SELECT 1"}, auth="nope"), ports)
    assert failed.error == "credential 'nope' not found"


async def test_save_binds_parameters_and_keeps_types(pg_dsn, table, pool):
    ports = make_ports(pg_dsn, Emitted(), pool)
    await run(command("postgres", auth="pg_local", config={"command": f"""
        CREATE TABLE public.{table} (id INT PRIMARY KEY, name TEXT, score DOUBLE PRECISION, tags JSONB,
                                     meta JSONB, missing TEXT, run TEXT, raw JSON, at TIMESTAMPTZ, n_text TEXT)"""}),
              ports)
    code = ("def main():\n    return {'id': 200, 'name': \"O'Brien; DROP TABLE x\", 'score': 1.5,"
            " 'tags': ['a', 'b'], 'meta': {'k': 'v'}, 'missing': None}\n")
    save = save_spec(storage="postgres", auth="pg_local", table=f"public.{table}", data={
        "id": "{{ result.id }}", "name": "{{ result.name }}", "score": "{{ result.score }}",
        "tags": "{{ result.tags }}", "meta": "{{ this.data.meta }}", "missing": "{{ result.missing }}",
        "run": "{{ execution_id }}", "raw": "{{ result.meta | tojson }}", "at": "2024-01-02T03:04:05Z",
        "n_text": 12})
    done = await run(command("python", config={"code": code}, save=save), ports)
    assert isinstance(done, ActionCompleted), done
    rows = await fetch(pg_dsn, f"SELECT id, name, score, tags::text, meta::text, missing, run, raw::text, "
                               f"to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') AS at, n_text "
                               f"FROM public.{table}")
    assert rows == [{"id": 200, "name": "O'Brien; DROP TABLE x", "score": 1.5, "tags": '["a", "b"]',
                     "meta": '{"k": "v"}', "missing": None, "run": "exec-1", "raw": '{"k": "v"}',
                     "at": "2024-01-02 03:04:05", "n_text": "12"}]


async def test_string_numbers_fill_numeric_columns(pg_dsn, table):
    ports = make_ports(pg_dsn, Emitted())
    await run(command("postgres", auth="pg_local", config={
        "command": f"CREATE TABLE public.{table} (id TEXT PRIMARY KEY, n INT, ok BOOLEAN, amount NUMERIC)"}), ports)
    save = save_spec(storage="postgres", auth="pg_local", table=f"public.{table}",
                     data={"id": "{{ execution_id }}:a", "n": "{{ result.n }}0", "ok": "true", "amount": "2.50"})
    done = await run(command("save", phase="save", result={"n": 4}, save=save), ports)
    assert isinstance(done, ActionCompleted), done
    assert done.result == {"n": 4}
    assert await fetch(pg_dsn, f"SELECT id, n, ok, amount::text FROM public.{table}") == [
        {"id": "exec-1:a", "n": 40, "ok": True, "amount": "2.50"}]


async def test_upsert_updates_the_other_columns(pg_dsn, table):
    ports = make_ports(pg_dsn, Emitted())
    await run(command("postgres", auth="pg_local", config={
        "command": f"CREATE TABLE public.{table} (id INT PRIMARY KEY, name TEXT, version INT)"}), ports)
    for name, version in (("first", 1), ("second", 2)):
        save = save_spec(storage="postgres", auth="pg_local", table=f"public.{table}", mode="upsert", key=["id"],
                         data={"id": "{{ result.id }}", "name": "{{ result.name }}", "version": version})
        done = await run(command("save", phase="save", result={"id": 7, "name": name}, save=save), ports)
        assert isinstance(done, ActionCompleted), done
    assert await fetch(pg_dsn, f"SELECT id, name, version FROM public.{table}") == [
        {"id": 7, "name": "second", "version": 2}]


async def test_save_of_a_list_writes_every_row(pg_dsn, table):
    ports = make_ports(pg_dsn, Emitted())
    await run(command("postgres", auth="pg_local", config={
        "command": f"CREATE TABLE public.{table} (id INT PRIMARY KEY, v TEXT)"}), ports)
    save = save_spec(storage="postgres", auth="pg_local", table=f"public.{table}", data="{{ result }}")
    await run(command("save", phase="save", result=[{"id": 1, "v": "a"}, {"id": 2, "v": None}], save=save), ports)
    assert await fetch(pg_dsn, f"SELECT id, v FROM public.{table} ORDER BY id") == [
        {"id": 1, "v": "a"}, {"id": 2, "v": None}]


async def test_explicit_command_binds_named_values(pg_dsn, table):
    ports = make_ports(pg_dsn, Emitted())
    await run(command("postgres", auth="pg_local", config={
        "command": f"CREATE TABLE public.{table} (id INT PRIMARY KEY, note TEXT, at TEXT)"}), ports)
    save = save_spec(storage="postgres", auth="pg_local",
                     command=f"INSERT INTO public.{table} (id, note, at) VALUES (:id, :note, '12:30'::text)",
                     data={"id": "{{ result.id }}", "note": "it's :note"})
    done = await run(command("save", phase="save", result={"id": 3}, save=save), ports)
    assert isinstance(done, ActionCompleted), done
    assert await fetch(pg_dsn, f"SELECT id, note, at FROM public.{table}") == [
        {"id": 3, "note": "it's :note", "at": "12:30"}]


async def test_save_to_a_missing_table_fails_the_attempt_naming_the_table(pg_dsn, pool):
    ports = make_ports(pg_dsn, Emitted(), pool)
    save = save_spec(storage="postgres", auth="pg_local", table="public.conf_no_such_table_for_save",
                     data={"id": "{{ result.id }}"})
    failed = await run(command("python", config={"code": "def main():\n    return {'id': 1}\n"}, save=save), ports)
    assert isinstance(failed, ActionFailed)
    assert "conf_no_such_table_for_save" in failed.error and "does not exist" in failed.error
    assert failed.result == {"id": 1}


async def test_upsert_without_key_is_an_error(pg_dsn, table):
    ports = make_ports(pg_dsn, Emitted())
    save = save_spec(storage="postgres", auth="pg_local", table=f"public.{table}", mode="upsert", data={"id": 1})
    failed = await run(command("save", phase="save", result=None, save=save), ports)
    assert "needs `key`" in failed.error


async def test_identifiers_are_quoted_not_pasted(pg_dsn, table):
    ports = make_ports(pg_dsn, Emitted())
    await run(command("postgres", auth="pg_local", config={
        "command": f"CREATE TABLE public.{table} (id INT)"}), ports)
    save = save_spec(storage="postgres", auth="pg_local", table=f"public.{table}",
                     data={'id) VALUES (1); DROP TABLE x; --': 1})
    failed = await run(command("save", phase="save", result=None, save=save), ports)
    assert isinstance(failed, ActionFailed) and "does not exist" in failed.error


async def test_a_database_error_names_its_detail_and_hint_once(pg_dsn, table):
    """asyncpg's str() of an error already ends with a DETAIL line: the step's error gives it once."""
    sql = (f"CREATE TABLE public.{table} (id INT PRIMARY KEY); INSERT INTO public.{table} VALUES (1);\n"
           f"INSERT INTO public.{table} VALUES (1)")
    failed = await run(command("postgres", config={"command": sql}, auth="pg_local"), make_ports(pg_dsn, Emitted()))
    assert isinstance(failed, ActionFailed)
    assert failed.error == (f'command_2: duplicate key value violates unique constraint "{table}_pkey" '
                            f'(Key (id)=(1) already exists.)')
    assert failed.error.count("already exists") == 1 and "DETAIL" not in failed.error
    failed = await run(command("postgres", config={"command": "SELECT * FROM nope_no_such_table_x"},
                               auth="pg_local"), make_ports(pg_dsn, Emitted()))
    assert failed.error == 'command_0: relation "nope_no_such_table_x" does not exist'
    failed = await run(command("postgres", config={"command": "SELECT upper(1)"}, auth="pg_local"),
                       make_ports(pg_dsn, Emitted()))
    assert failed.error.startswith("command_0: function upper(integer) does not exist (No function matches")
    assert failed.error.count("No function matches") == 1 and "HINT" not in failed.error
