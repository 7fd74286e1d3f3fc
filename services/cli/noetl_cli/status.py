"""`noetl status ID --server URL`: one execution on a server or cluster, over its HTTP API only: its status
and progress (GET /api/executions/{id}?events=false) and what it waits for, and until when
(GET /api/executions/{id}/explain, noetl_common.explain).

Exit 0 when the server answered about the execution, 2 when it could not be asked (unreachable, unknown
execution, an answer that makes no sense). A server that cannot explain (a cluster role without the live
states: 503) still gets its status printed, with the reason the explanation is missing.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any
from urllib.parse import quote

import httpx
from rich.console import Console
from rich.markup import escape

from noetl_cli.remote import RemoteError, _Api

MAX_ID = 1000   # an execution id is a uuid; a longer one is a typo or worse, refused before any request


def status_command(server: str, execution_id: str, as_json: bool) -> int:
    if not execution_id or len(execution_id) > MAX_ID or any(ord(c) < 32 for c in execution_id):
        raise RemoteError(f"not an execution id: {execution_id[:80]!r}")
    report = asyncio.run(_ask(server.rstrip("/"), execution_id))
    if as_json:
        print(json.dumps(report, default=str))
    else:
        show(Console(file=sys.stdout, highlight=False, soft_wrap=True), report)
    return 0


async def _ask(server: str, execution_id: str) -> dict[str, Any]:
    path = f"/api/executions/{quote(execution_id, safe='').replace('.', '%2E')}"   # '..' stays an id
    from noetl_cli.remote import api_token

    token = api_token(server, os.environ)   # NOETL_API_TOKEN, or the local admin.token for loopback URLs
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=server, timeout=30.0, headers=headers) as client:
        api = _Api(client, server)
        response = await api.call("GET", path, params={"events": "false"})
        if response.status_code == 404:
            raise RemoteError(f"no execution {execution_id!r} on {server}")
        summary = _object(api.ok(response, f"reading execution {execution_id}"), "the execution")
        response = await api.call("GET", f"{path}/explain")
        if response.status_code == 503:
            return {"execution": summary, "explain": None, "explain_error": _detail(response)}
        if response.status_code == 404:   # finished between the two reads and gone, or not folded yet
            return {"execution": summary, "explain": None, "explain_error": _detail(response)}
        explanation = _object(api.ok(response, f"explaining execution {execution_id}"), "the explanation")
        if not isinstance(explanation.get("items"), list):
            raise RemoteError(f"the server's explanation has no list of items: {str(explanation)[:200]}")
    return {"execution": summary, "explain": explanation}


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RemoteError(f"the server answered {what} with a {type(value).__name__}, not an object")
    return value


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
        return str(body.get("detail")) if isinstance(body, dict) else str(body)[:500]
    except ValueError:
        return response.text[:500]


def show(out: Console, report: dict[str, Any]) -> None:
    e = report["execution"]
    status = str(e.get("status"))
    colour = {"COMPLETED": "green", "FAILED": "red", "CANCELLED": "yellow"}.get(status, "cyan")
    version = f" v{e['version']}" if e.get("version") is not None else ""
    out.print(f"[bold]{escape(str(e.get('execution_id')))}[/] [{colour}]{escape(status)}[/] "
              f"{escape(str(e.get('path') or e.get('playbook_name')))}{escape(version)}")
    line = f"started {escape(str(e.get('start_time')))}, progress {escape(str(e.get('progress')))}%"
    if e.get("end_time"):
        line += f", ended {escape(str(e['end_time']))}"
    out.print(line)
    if e.get("error"):
        out.print(f"[red]error:[/] {escape(str(e['error']))}")
    explanation = report.get("explain")
    if explanation is None:
        out.print(f"[yellow]cannot say what it waits for:[/] {escape(str(report.get('explain_error')))}")
        return
    items = explanation["items"]
    if status == "RUNNING":
        out.print(f"waiting for ({len(items)}), at {escape(str(explanation.get('now_iso', '')))}:")
    for item in items:
        text = item.get("text") if isinstance(item, dict) else item
        out.print(f"  - {escape(str(text))}")
