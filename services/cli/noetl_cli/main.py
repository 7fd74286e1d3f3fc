"""The `noetl` command line."""
from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
import yaml
from rich.console import Console
from rich.markup import escape

from noetl_common.dsl import load_playbook
from noetl_cli.tokens import token_app
from noetl_cli.running import (UsageError, caps_from_env, load_credentials, parse_payload, read_playbook_text,
                               run_command)
from noetl_runtime.sqlite_store import SqliteStore

app = typer.Typer(help="Run NoETL playbooks (noetl.io/v1): embedded by default.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)
catalog_app = typer.Typer(help="The playbook catalog of the local store.", no_args_is_help=True)
credential_app = typer.Typer(help="Credentials in the local store (encrypted at rest).", no_args_is_help=True)
app.add_typer(catalog_app, name="catalog")
app.add_typer(credential_app, name="credential")
app.add_typer(token_app, name="token")
# soft_wrap: messages are never broken at 80 columns when stderr is not a terminal (paths stay whole).
# Everything user-supplied that is printed through it is escaped: `[x]` in a message is text, not markup.
err = Console(stderr=True, highlight=False, soft_wrap=True)

StoreOption = typer.Option(None, "--store", envvar="NOETL_STORE",
                           help="SQLite file for the event log, catalog and credentials (default ~/.noetl/noetl.db).")


@app.command()
def run(file: Path = typer.Argument(..., help="The playbook YAML file."),
        payload: Optional[str] = typer.Option(None, "--payload", help="JSON object deep-merged into the workload."),
        set_: list[str] = typer.Option([], "--set", help="key=value (dotted keys, YAML values); repeatable."),
        catalog: list[Path] = typer.Option([], "--catalog", help="Register every playbook under DIR first."),
        credentials: Optional[Path] = typer.Option(None, "--credentials", help="JSON {name: {type, data}}."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON report on stdout."),
        timeout: Optional[float] = typer.Option(None, "--timeout", help="Cancel the run after S seconds."),
        store: Optional[Path] = StoreOption,
        server: Optional[str] = typer.Option(None, "--server", metavar="URL",
                                             help="Run on a noetl server or cluster at URL (its HTTP API) instead "
                                                  "of in this process; --store is then not used.")) -> None:
    """Run a playbook in this process (or on --server) and report what happened."""
    try:
        if server:
            from noetl_cli.remote import run_remote   # httpx only: no runtime, no workers in this process
            code = run_remote(server, file, parse_payload(payload, set_), catalog, credentials, as_json, timeout)
        else:
            code = run_command(file, parse_payload(payload, set_), catalog, credentials, as_json, timeout, store)
    except UsageError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2)
    raise typer.Exit(code)


@app.command("server")
def server_command(ctx: typer.Context,
                   host: str = typer.Option("127.0.0.1", "--host", envvar="NOETL_HTTP_HOST",
                                            help="Interface to listen on."),
                   port: int = typer.Option(8080, "--port", envvar="NOETL_HTTP_PORT", min=1, max=65535),
                   store: Optional[Path] = StoreOption,
                   kafka: Optional[str] = typer.Option(
                       None, "--kafka", metavar="BOOTSTRAP",
                       help="Run on Kafka (host:port[,host:port]) + Postgres instead of SQLite; needs "
                            "NOETL_DATABASE_URL or --database-url-file. Only this flag selects Kafka mode: an "
                            "exported NOETL_KAFKA_BOOTSTRAP does not. Other settings come from NOETL_* "
                            "(docs/cluster.md)."),
                   database_url: Optional[str] = typer.Option(
                       None, "--database-url", metavar="DSN", envvar="NOETL_DATABASE_URL",
                       help="Postgres for the catalog, credentials and read model (with --kafka only). "
                            "Prefer NOETL_DATABASE_URL or --database-url-file: a command line is readable "
                            "by every local user."),
                   database_url_file: Optional[Path] = typer.Option(
                       None, "--database-url-file", metavar="PATH", envvar="NOETL_DATABASE_URL_FILE",
                       help="A file (mode 0600, or a mounted secret) holding the Postgres DSN (with --kafka)."),
                   log_level: str = typer.Option("INFO", "--log-level", envvar="NOETL_LOG_LEVEL",
                                                 help="DEBUG, INFO, WARNING or ERROR."),
                   max_in_flight: Optional[int] = typer.Option(
                       None, "--max-in-flight", envvar="NOETL_MAX_IN_FLIGHT", min=0,
                       help="Executions in flight above which POST /api/executions/run answers 429 with "
                            "Retry-After (0: no bound; default 64).")
                   ) -> None:
    """Serve the HTTP API with every role in this process; resumes in-flight executions. Embedded (SQLite
    store, in-process workers) by default; on Kafka + Postgres with --kafka and --database-url. JSON logs on
    stderr."""
    def given(name: str) -> bool:   # typed on the command line, not taken from the environment
        source = ctx.get_parameter_source(name)   # typer's vendored click: compare by name, not by class
        return source is not None and source.name == "COMMANDLINE"

    if database_url_file is not None:
        if database_url and given("database_url"):
            err.print("[red]error:[/] give the DSN once: --database-url or --database-url-file, not both")
            raise typer.Exit(2)
        if kafka:    # the file wins over an exported NOETL_DATABASE_URL
            from noetl_runtime.dsn_file import read_dsn_file
            try:
                database_url = read_dsn_file(database_url_file)
            except ValueError as exc:
                err.print(f"[red]error:[/] {escape(str(exc))}")
                raise typer.Exit(2)
        elif given("database_url_file"):
            err.print("[red]error:[/] --database-url-file needs --kafka (embedded mode keeps its data in SQLite)")
            raise typer.Exit(2)
    if kafka:
        if store is not None and given("store"):
            err.print("[red]error:[/] --store is for embedded mode; with --kafka the data lives in Postgres")
            raise typer.Exit(2)
        if not database_url:
            err.print("[red]error:[/] --kafka needs --database-url (or NOETL_DATABASE_URL, or "
                      "--database-url-file): the catalog, credentials and read model live in Postgres")
            raise typer.Exit(2)
        if given("database_url"):
            err.print("[yellow]warning:[/] the DSN on the command line is readable by every local user "
                      "(ps); prefer NOETL_DATABASE_URL or --database-url-file")
        from noetl_cli.server_kafka import serve_kafka   # faust, aiokafka and asyncpg only for this mode
        raise typer.Exit(serve_kafka(host, port, kafka, database_url, log_level, max_in_flight))
    if database_url and given("database_url"):
        # An exported NOETL_DATABASE_URL alone does not switch modes; a typed --database-url means Kafka mode.
        err.print("[red]error:[/] --database-url needs --kafka (embedded mode keeps its data in SQLite)")
        raise typer.Exit(2)
    from noetl_cli.server import serve   # FastAPI and uvicorn only for this command
    from noetl_ingest.admission import DEFAULT_MAX_IN_FLIGHT
    raise typer.Exit(serve(host, port, store, log_level,
                           DEFAULT_MAX_IN_FLIGHT if max_in_flight is None else max_in_flight))


@app.command()
def status(execution_id: str = typer.Argument(..., help="The execution id."),
           server: str = typer.Option("http://127.0.0.1:8080", "--server", metavar="URL", envvar="NOETL_SERVER",
                                      help="The noetl server or cluster (its HTTP API)."),
           as_json: bool = typer.Option(False, "--json", help="Print the execution and its explanation as JSON.")
           ) -> None:
    """Status and progress of an execution on a server, and what it waits for (step attempts, leases, retry
    timers, joins, iterators, child executions), until when."""
    from noetl_cli.status import status_command   # httpx only
    try:
        code = status_command(server, execution_id, as_json)
    except UsageError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2)
    raise typer.Exit(code)


@app.command()
def validate(file: Path = typer.Argument(..., help="The playbook YAML file."),
             as_json: bool = typer.Option(False, "--json")) -> None:
    """Check a playbook: every error with its location (exit 2), warnings for keys that do not apply."""
    try:
        caps = caps_from_env()   # judged as `noetl run` and registration on this machine would judge it
        text = read_playbook_text(file)
    except UsageError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2)
    playbook, problems = load_playbook(text, caps)
    if as_json:
        print(json.dumps({"valid": playbook is not None, "problems": [p.model_dump() for p in problems]}))
    else:
        for p in problems:
            colour = "red" if p.severity == "error" else "yellow"
            err.print(f"[{colour}]{p.severity}[/] " + escape(f"{p.path} (line {p.line}): {p.message}"))
        if playbook is not None:
            print(f"valid: {playbook.path} ({len(playbook.steps)} steps)")
    raise typer.Exit(0 if playbook is not None else 2)


@catalog_app.command("register")
def catalog_register(paths: list[Path] = typer.Argument(..., help="Playbook files or folders."),
                     store: Optional[Path] = StoreOption) -> None:
    """Register playbooks (each file must validate)."""
    try:
        caps = caps_from_env()
    except UsageError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2)

    async def go() -> None:
        async with SqliteStore(store) as db:
            for path in paths:
                files = sorted(path.rglob("*.y*ml")) if path.is_dir() else [path]
                for file in files:
                    try:
                        text = read_playbook_text(file)
                    except UsageError as exc:
                        if path.is_dir():
                            continue
                        err.print(f"[red]error:[/] {escape(str(exc))}")
                        raise typer.Exit(2)
                    playbook, problems = load_playbook(text, caps)
                    if playbook is None:
                        if path.is_dir():
                            continue
                        err.print(f"[red]INVALID[/] {escape(str(file))}")
                        for p in problems:
                            err.print(f"[red]{escape(p.path)}[/] " + escape(f"(line {p.line}): {p.message}"))
                        raise typer.Exit(2)
                    entry = await db.catalog.register(text, yaml.safe_load(text), playbook.path)
                    print(f"registered {entry.path} version {entry.version}")
    asyncio.run(go())


@catalog_app.command("list")
def catalog_list(store: Optional[Path] = StoreOption) -> None:
    async def go() -> None:
        async with SqliteStore(store) as db:
            for entry in await db.catalog.list():
                print(f"{entry.path}\tv{entry.version}")
    asyncio.run(go())


@credential_app.command("set")
def credential_set(name: str, type_: str = typer.Option("generic", "--type"),
                   data: Optional[str] = typer.Option(None, "--data", help="JSON object (or - for stdin)."),
                   file: Optional[Path] = typer.Option(None, "--file", help="JSON {name: {type, data}} to load."),
                   store: Optional[Path] = StoreOption) -> None:
    """Store a credential, encrypted with NOETL_SECRET_KEY (or the store's key file)."""
    async def go() -> None:
        async with SqliteStore(store) as db:
            if file is not None:
                print(f"stored {await load_credentials(db, file)} credential(s)")
                return
            raw = sys.stdin.read() if data == "-" else (data or "{}")
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise UsageError("--data must be a JSON object")
            await db.credentials.put(name, type_, value)
            print(f"stored credential {name} ({type_})")
    try:
        asyncio.run(go())
    except (UsageError, ValueError) as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2)


@credential_app.command("list")
def credential_list(store: Optional[Path] = StoreOption) -> None:
    async def go() -> None:
        async with SqliteStore(store) as db:
            for cred in await db.credentials.list():
                print(f"{cred.name}\t{cred.type}")
    asyncio.run(go())


@credential_app.command("delete")
def credential_delete(name: str, store: Optional[Path] = StoreOption) -> None:
    async def go() -> bool:
        async with SqliteStore(store) as db:
            return await db.credentials.delete(name)
    if not asyncio.run(go()):
        err.print(f"no credential named {escape(name)}")
        raise typer.Exit(1)
    print(f"deleted {name}")


def main() -> None:   # pragma: no cover - console entry
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()
