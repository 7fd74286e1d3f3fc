"""`noetl run` never runs something silently (issue 8 scope 7): it prints the validation warnings, and a
playbook that would run nothing (a later-dialect document, action keys without an action type) is INVALID
(exit 2) instead of COMPLETED. Driven like a user does: the installed console script in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

NOETL = Path(sys.executable).with_name("noetl")


def noetl(*args: str | Path, store: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "COLUMNS")}
    env["NOETL_STORE"] = str(store)
    proc = subprocess.run([str(NOETL), *map(str, args)], capture_output=True, text=True, timeout=120, env=env)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    return proc


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


TOP_LEVEL = """\
    apiVersion: noetl.io/v1
    kind: Playbook
    name: top_level
    path: tests/top_level
    workflow:
      - step: start
        headers: {X: y}
        next: [{step: child}]
      - step: child
        type: playbook
        path: tests/child_top_level
    """
CHILD = """\
    apiVersion: noetl.io/v1
    kind: Playbook
    name: child
    path: tests/child_top_level
    workflow:
      - step: start
        next: [end]
      - step: end
        result: {from_child: 7}
    """


def test_run_prints_warnings_and_finds_a_child_registered_by_its_top_level_path(tmp_path: Path) -> None:
    pb, catalog = write(tmp_path, "top.yaml", TOP_LEVEL), tmp_path / "catalog"
    catalog.mkdir()
    write(catalog, "child.yaml", CHILD)
    proc = noetl("run", pb, "--json", "--catalog", catalog, store=tmp_path / "s.db")
    report = json.loads(proc.stdout)       # stdout stays exactly the JSON report; warnings go to stderr
    assert (proc.returncode, report["status"]) == (0, "COMPLETED"), report
    assert report["steps"]["child"]["result"] == {"from_child": 7}
    assert "warning name (line 3): top-level 'name' belongs under metadata: (metadata.name); accepted" in proc.stderr
    assert "warning workflow[0].headers (line 7): key 'headers' does not apply to a control step" in proc.stderr
    human = noetl("run", pb, "--catalog", catalog, store=tmp_path / "s.db")
    assert human.returncode == 0 and "warning path (line 4): top-level 'path' belongs under metadata" in human.stdout


def test_a_step_with_code_but_no_type_is_invalid_not_a_silent_success(tmp_path: Path) -> None:
    pb = write(tmp_path, "no_type.yaml", """\
        apiVersion: noetl.io/v1
        kind: Playbook
        metadata: {name: t, path: tests/no_type}
        workflow:
          - step: start
            code: |
              def main():
                  raise SystemExit("this must run or be refused")
        """)
    proc = noetl("run", pb, "--json", store=tmp_path / "s.db")
    report = json.loads(proc.stdout)
    assert (proc.returncode, report["status"]) == (2, "INVALID")
    assert [(e["path"], e["line"]) for e in report["errors"]] == [("workflow[0].code", 6)]
    assert "add type: python" in report["errors"][0]["message"]


def test_a_v10_playbook_runs_through_the_second_front_end(tmp_path: Path) -> None:
    pb = write(tmp_path, "v10.yaml", """\
        apiVersion: noetl.io/v2
        kind: Playbook
        metadata: {name: hello, path: tests/v10}
        workflow:
          - step: start
            tool: {kind: python, code: "result = {'ok': True}"}
            next:
              spec: {mode: exclusive}
              arcs: [{step: end}]
          - step: end
            tool: {kind: noop}
        """)
    proc = noetl("run", pb, "--json", store=tmp_path / "s.db")
    report = json.loads(proc.stdout)
    assert (proc.returncode, report["status"]) == (0, "COMPLETED")
    assert report["steps"]["start"]["result"] == {"ok": True}   # stored as returned (V10-6.2)


def test_a_v10_playbook_with_an_unsupported_kind_is_invalid_naming_the_kind(tmp_path: Path) -> None:
    pb = write(tmp_path, "v10.yaml", """\
        apiVersion: noetl.io/v2
        kind: Playbook
        metadata: {name: hello, path: tests/v10}
        workflow:
          - step: start
            tool: {kind: shell, command: "rm -rf /"}
            next: {arcs: [{step: end}]}
          - step: end
            tool: {kind: noop}
        """)
    proc = noetl("run", pb, "--json", store=tmp_path / "s.db")
    report = json.loads(proc.stdout)
    assert (proc.returncode, report["status"]) == (2, "INVALID")
    assert [(e["path"], e["line"]) for e in report["errors"]] == [("workflow[0].tool.kind", 6)]
    assert "tool kind 'shell' is not supported by this engine" in report["errors"][0]["message"]
