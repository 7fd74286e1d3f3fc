"""The human view of a run: steps as they start and finish, attempts, errors, then a summary."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from noetl_common.messages import Event

_SHOWN = {"step_started", "step_completed", "step_failed", "action_error", "action_retry", "iteration_failed",
          "execution_complete", "execution_failed", "execution_cancelled"}


class LiveView:
    def __init__(self, console: Console, execution_id: str | None = None) -> None:
        self.console = console
        self.execution_id = execution_id
        self.iterations = 0

    def __call__(self, event: Event) -> None:
        if self.execution_id and event.execution_id != self.execution_id:
            return   # child executions are summarised by their parent step
        if event.event_type == "iteration_completed":
            self.iterations += 1
            return
        if event.event_type not in _SHOWN:
            return
        t = event.timestamp[11:23]
        # Step names and errors are user text: escaped, or rich reads `[x]` in them as markup (and a stray
        # `[/x]` raises MarkupError inside the runtime's fold loop).
        name = escape(event.node_name)
        error = escape(str(event.error))
        kind = event.event_type
        if kind == "step_started":
            self.console.print(f"[dim]{t}[/] [cyan]▶[/] {name}")
        elif kind == "step_completed":
            took = f" [dim]({event.duration * 1000:.0f} ms)[/]" if event.duration is not None else ""
            self.console.print(f"[dim]{t}[/] [green]✓[/] {name}{took}")
        elif kind == "step_failed":
            self.console.print(f"[dim]{t}[/] [red]✗ {name}[/]: {error}")
        elif kind == "action_error":
            where = f"\\[{event.current_index}]" if event.current_index is not None else ""
            self.console.print(f"[dim]{t}[/] [yellow]![/] {name}{where} attempt {event.attempt}: {error}")
        elif kind == "action_retry":
            delay = (event.result or {}).get("delay", 0)
            self.console.print(f"[dim]{t}[/] [yellow]↻[/] {name} retry in {delay:.2f}s")
        elif kind == "iteration_failed":
            self.console.print(f"[dim]{t}[/] [red]✗[/] {name}\\[{event.current_index}]: {error}")


def summary(console: Console, report: dict[str, Any]) -> None:
    table = Table(title=f"execution {report['execution_id']}", show_lines=False)
    # Every cell and message below is user text (step names, results, errors): escaped, never markup.
    for column in ("step", "status", "visits", "attempts", "result / error"):
        table.add_column(column)
    for name, step in report["steps"].items():
        detail = step["error"] if step["error"] else _short(step["result"])
        table.add_row(escape(name), step["status"], str(step["visits"]), str(step["attempts"]), escape(detail))
    console.print(table)
    colour = {"COMPLETED": "green", "FAILED": "red"}.get(report["status"], "yellow")
    console.print(f"[bold {colour}]{report['status']}[/] in {report['duration_ms']} ms")
    if report.get("error"):
        console.print(f"[red]{escape(report['error'])}[/]")
    if report["status"] == "COMPLETED":
        console.print(f"result: {escape(_short(report['result'], 500))}")


def _short(value: Any, limit: int = 80) -> str:
    import json
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"
