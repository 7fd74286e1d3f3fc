"""Every playbook in examples/ validates cleanly and really completes through `noetl run`.

The examples are what a new user runs first (README), so they are run exactly as documented: the
installed `noetl` command in a subprocess, embedded, with a throwaway store and no external services.

With NOETL_EXAMPLES_SERVER=URL the same checks run against that server instead (`noetl run --server URL`,
authenticated by NOETL_API_TOKEN): scripts/container-test.sh runs them through the docker-compose stack.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from noetl_common.dsl import load_playbook

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def _noetl() -> list[str]:
    beside = Path(sys.executable).with_name("noetl")   # the venv running the tests
    if beside.exists():
        return [str(beside)]
    found = shutil.which("noetl")
    if found is None:
        pytest.fail("the `noetl` command is not installed (pip install -e .)")
    return [found]


def _retried(report: dict[str, Any]) -> bool:
    """flaky timed out, then raised, then succeeded: three real attempts."""
    errors = [e["error"] for e in report["events"] if e["event_type"] == "action_error"]
    return (report["result"] == {"succeeded_on_attempt": 3} and report["steps"]["flaky"]["attempts"] == 3
            and len(errors) == 2 and errors[0] == "timed out after 3s" and "transient failure" in errors[1])


# example file -> a check of its report (the execution result, and for the retry example its attempts)
EXPECTED: dict[str, Callable[[dict[str, Any]], bool]] = {
    "hello_world.yaml": lambda r: r["result"] == {"greeting": "Hello, World!", "name_length": 5},
    "fan_out_join.yaml": lambda r: r["result"] == {"mean": 18.0, "min": 4, "max": 42, "spread": 38}
    and r["steps"]["report"]["visits"] == 1,
    "retry_and_timeout.yaml": _retried,
    "iterator.yaml": lambda r: r["result"]["names"] == ["pen", "mug", "lamp", "desk"]
    and [item["rank"] for item in r["result"]["ranked"]] == [1, 2, 3, 4],
    "duckdb_report.yaml": lambda r: r["result"]["total"] == 570.25 and r["result"]["by_region"][0] == {
        "region": "east", "orders": 1, "revenue": 310.25},
    "child_playbook.yaml": lambda r: r["result"] == {"product": 21, "summary": "2 x 10 = 20"},
    "child_multiply.yaml": lambda r: r["result"] == {"summary": "1 x 10 = 10"},
}


SERVER = os.environ.get("NOETL_EXAMPLES_SERVER")   # run on this server (and its workers) instead


def run_example(name: str, store: Path) -> tuple[int, dict[str, Any], str]:
    env = {k: v for k, v in os.environ.items() if k != "NOETL_STORE"}
    where = ["--server", SERVER] if SERVER else ["--store", str(store)]
    proc = subprocess.run(
        [*_noetl(), "run", str(EXAMPLES / name), "--json", "--catalog", str(EXAMPLES), *where],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"{name}: stdout is not one JSON report (exit {proc.returncode}):\n"
                    f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.returncode, report, proc.stderr


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_validates_without_problems(name: str) -> None:
    playbook, problems = load_playbook((EXAMPLES / name).read_text())
    assert playbook is not None
    assert problems == [], [p.message for p in problems]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_completes(name: str, tmp_path: Path) -> None:
    code, report, stderr = run_example(name, tmp_path / "noetl.db")
    assert report["status"] == "COMPLETED", (report.get("error"), stderr[-2000:])
    assert code == 0
    assert EXPECTED[name](report), (report["result"], report["steps"])

