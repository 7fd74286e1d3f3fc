"""`noetl run`: load, validate, register the catalog and credentials, run embedded, report."""
from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape

from noetl_common.caps import Caps
from noetl_common.dsl import load_playbook, playbook_identity
from noetl_common.merge import deep_merge
from noetl_runtime.report import invalid_report, run_report
from noetl_runtime.settings import configured_caps
from noetl_runtime.sqlite_store import SqliteStore
from noetl_cli.live import LiveView, summary

EXIT = {"COMPLETED": 0, "FAILED": 1, "CANCELLED": 1, "INVALID": 2}


class UsageError(Exception):
    """Bad command-line input: reported on stderr, exit status 2."""


def caps_from_env() -> Caps:
    """NOETL_MAX_VISITS, NOETL_MAX_ITERATOR_ITEMS and NOETL_STEP_MAX_*, or a UsageError naming the bad one."""
    try:
        return configured_caps()
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def parse_payload(payload: str | None, sets: list[str]) -> dict[str, Any]:
    try:
        merged = json.loads(payload) if payload else {}
    except ValueError as exc:
        raise UsageError(f"--payload is not valid JSON: {exc}") from exc
    if not isinstance(merged, dict):
        raise UsageError("--payload must be a JSON object")
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set expects key=value, got {item!r}")
        try:
            value: Any = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as exc:
            raise UsageError(f"--set {key}: {raw!r} is not a valid YAML value (quote it to pass a string)") from exc
        for part in reversed(key.split(".")):
            value = {part: value}
        merged = deep_merge(merged, value)
    return merged


def problems_as_errors(problems: list[Any]) -> list[dict[str, Any]]:
    return [{"path": p.path, "line": p.line, "message": p.message} for p in problems if p.severity == "error"]


def run_command(file: Path, payload: dict[str, Any], catalogs: list[Path], credentials: Path | None,
                as_json: bool, timeout: float | None, store_path: Path | None) -> int:
    # soft_wrap: lines are never broken at the terminal width (a pipe gets 80 columns): ids, paths and
    # errors stay whole for grep and copy-paste.
    out = Console(file=sys.stdout if not as_json else sys.stderr, highlight=False, soft_wrap=True)
    started = time.monotonic()
    caps = caps_from_env()
    text = read_playbook_text(file)
    playbook, problems = load_playbook(text, caps)
    errors = problems_as_errors(problems)
    for p in problems:   # warnings name what was ignored or assumed; with --json they go to stderr
        if p.severity == "warning":
            out.print("[yellow]warning[/] " + escape(f"{p.path} (line {p.line}): {p.message}"))
    if playbook is None:
        report = invalid_report(errors, int((time.monotonic() - started) * 1000))
        if as_json:
            print(json.dumps(report))
        else:
            out.print(f"[red]INVALID[/] {escape(str(file))}: {len(errors)} error(s)")
            for e in errors:
                out.print(escape(f"  {e['path']} (line {e['line']}): {e['message']}"))
        return EXIT["INVALID"]
    document = yaml.safe_load(text)
    report = asyncio.run(_run(document, text, playbook.path, payload, catalogs, credentials, out, as_json,
                              timeout, store_path, started, caps))
    if as_json:
        print(json.dumps(report, default=str))
    else:
        summary(out, report)
    return EXIT[report["status"]]


async def _run(document: dict[str, Any], text: str, path: str, payload: dict[str, Any], catalogs: list[Path],
               credentials: Path | None, out: Console, as_json: bool, timeout: float | None,
               store_path: Path | None, started: float, caps: Caps) -> dict[str, Any]:
    # Imported here: the runtime pulls in the worker and every action (httpx, asyncpg, duckdb), which
    # `validate`, `catalog` and `credential` do not need (they start about twice as fast without it).
    from noetl_embedded.runtime import EmbeddedRuntime

    store = SqliteStore(store_path)
    try:
        await register_catalogs(store, catalogs)
        entry = await store.catalog.register(text, document, path)
        if credentials is not None:
            await load_credentials(store, credentials)
        runtime = EmbeddedRuntime(store, resume=False, caps=caps)   # a run never picks up other executions
        await runtime.start()
        try:
            start = runtime.start_message(document, path, entry.version, payload, time.time())
            if not as_json:
                out.print(f"[bold]{escape(path)}[/] v{entry.version} execution {start.execution_id}")
                runtime.add_listener(LiveView(out, start.execution_id))
            runtime.submit(start)
            try:
                state = await asyncio.wait_for(runtime.wait(start.execution_id), timeout)
            except asyncio.TimeoutError:
                runtime.cancel(start.execution_id, time.time(), f"timed out after {timeout:g}s (--timeout)")
                state = await asyncio.wait_for(runtime.wait(start.execution_id), 30)
            events = await store.events(start.execution_id)
        finally:
            await runtime.stop()
        return run_report(state, events, int((time.monotonic() - started) * 1000))
    finally:
        await store.aclose()


async def register_catalogs(store: SqliteStore, folders: list[Path]) -> int:
    """Register every `kind: Playbook` YAML file under the folders (others, like case files, are skipped)."""
    count = 0
    for folder in folders:
        files = sorted(folder.rglob("*.yaml")) + sorted(folder.rglob("*.yml")) if folder.is_dir() else [folder]
        for file in files:
            text = file.read_text()
            try:
                doc = yaml.safe_load(text)
            except yaml.YAMLError:
                continue
            path = playbook_identity(doc)[1] if isinstance(doc, dict) else None
            if isinstance(doc, dict) and doc.get("kind") == "Playbook" and path:
                await store.catalog.register(text, doc, path)
                count += 1
    return count


async def load_credentials(store: SqliteStore, file: Path) -> int:
    try:
        spec = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--credentials {file}: {exc}") from exc
    if not isinstance(spec, dict):
        raise UsageError("--credentials must hold a JSON object {name: {type, data}}")
    for name, value in spec.items():
        if not isinstance(value, dict) or not isinstance(value.get("data") or {}, dict):
            raise UsageError(f"--credentials {file}: {name!r} must be an object {{type, data: {{...}}}}")
    for name, value in spec.items():
        await store.credentials.put(name, value.get("type", "generic"), value.get("data") or {},
                                    value.get("description"))
    return len(spec)


def read_playbook_text(file: Path) -> str:
    """The file's text, or a UsageError naming the file and why (missing, a folder, not UTF-8)."""
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {file}: {exc}") from exc
