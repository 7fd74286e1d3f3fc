"""The `noetl` command line, driven like a user drives it: the installed console script in a subprocess.

Nothing is mocked: each test runs the real runtime against its own SQLite store under tmp_path (passed with
--store or NOETL_STORE, so ~/.noetl is never touched) and checks the exit status, the --json report of the
command contract (shared/conformance/README.md) or the human output, and that no Traceback escaped.
"""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from support import printed_traceback

NOETL = Path(sys.executable).with_name("noetl")   # the console script installed next to this interpreter
SECRET = "pw-Zq8v3Nf1-must-never-be-printed"


outputs: list[subprocess.CompletedProcess[str]] = []   # every command's output, for leak checks


def launch(*args: str | Path, store: Path, stdin: bool = False) -> subprocess.Popen[str]:
    """Start `noetl ARGS` with NOETL_STORE pointing into tmp_path (commands that take --store get it too).
    Not a terminal, no COLUMNS: what a user sees when piping the output."""
    environ = {k: v for k, v in os.environ.items()
               if k not in ("FORCE_COLOR", "NOETL_SECRET_KEY", "COLUMNS") and not k.startswith("NOETL_SECRET_")}
    environ["NOETL_STORE"] = str(store)
    assert NOETL.exists(), f"the noetl console script is not installed at {NOETL}"
    return subprocess.Popen([str(NOETL), *map(str, args)], stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ)


def finish(popen: subprocess.Popen[str], stdin: str | None = None, timeout: float = 60
           ) -> subprocess.CompletedProcess[str]:
    try:
        out, err = popen.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        popen.kill()
        out, err = popen.communicate()
        pytest.fail(f"noetl {popen.args[1:]} did not finish in {timeout}s:\n{out}\n{err}")
    proc = subprocess.CompletedProcess(popen.args, popen.returncode, out, err)
    outputs.append(proc)
    assert not printed_traceback(proc.stderr), proc.stderr      # never a crash, whatever the input
    assert not printed_traceback(proc.stdout), proc.stdout
    return proc


def cli(*args: str | Path, store: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return finish(launch(*args, store=store, stdin=stdin is not None), stdin)


def report_of(proc: subprocess.CompletedProcess[str]) -> tuple[int, dict]:
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"--json must print exactly one JSON object on stdout, got:\n{proc.stdout}\n{proc.stderr}"
    return proc.returncode, json.loads(lines[0])


def run_json(playbook: Path, store: Path, *extra: str | Path) -> tuple[int, dict]:
    return report_of(cli("run", playbook, "--json", "--store", store, *extra, store=store))


def run_all(runs: dict[str, tuple]) -> dict[str, subprocess.CompletedProcess[str]]:
    """Independent commands run concurrently (each with its own store) to keep the suite fast."""
    started = {key: launch(*args, store=store) for key, (args, store) in runs.items()}
    return {key: finish(popen) for key, popen in started.items()}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def one_step(tmp_path: Path, name: str, step_body: str) -> Path:
    """start -> s (the step under test: `step_body` are its keys) -> end."""
    body = textwrap.indent(textwrap.dedent(step_body).strip("\n"), "    ")
    return write(tmp_path, name, f"""
apiVersion: noetl.io/v1
kind: Playbook
metadata: {{name: {name}, path: tests/cli/{name}}}
workflow:
  - step: start
    next: [{{step: s}}]
  - step: s
{body}
    next: [{{step: end}}]
  - step: end
""")


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    """1-based line number of the n-th line containing `needle`."""
    hits = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    return hits[occurrence - 1]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "x.db"


# ------------------------------------------------------------------------------------------ invalid input
INVALID = """
apiVersion: noetl.io/v1
kind: Playbook
metadata:
  name: invalid_many
  path: tests/cli/invalid_many
workbook:
  - name: helper
    type: python
    code: |
      def main():
          return {}
workflow:
  - step: start
    next: [{step: fetch}, {step: nowhere_step}]
  - step: fetch
    type: htttp
    endpoint: http://127.0.0.1:1/
    next: [{step: end}]
  - step: fetch
    type: python
    code: |
      def main():
          return {}
  - step: call
    type: workbook
    name: no_such_entry
    next: [{step: end}]
  - step: loop
    type: iterator
    collection: [1, 2]
    task: {type: python, code: "def main(): return 1"}
    next: [{step: end}]
  - step: broken_template
    type: python
    data: {x: "{{ workload.x + }}"}
    code: |
      def main(x):
          return x
    retry: {max_attempts: 0}
  - step: end
"""


def test_invalid_playbook_is_rejected_with_every_error_located(tmp_path: Path, store: Path) -> None:
    path = write(tmp_path, "invalid", INVALID)
    text = path.read_text()
    code, report = run_json(path, store)
    assert code == 2
    assert report["status"] == "INVALID" and report["execution_id"] is None
    assert report["steps"] == {} and report["events"] == []
    errors = report["errors"]
    # every error has a path and a real line number
    for e in errors:
        assert isinstance(e["path"], str) and e["path"], e
        assert isinstance(e["line"], int) and 1 <= e["line"] <= len(text.splitlines()), e
        assert e["message"], e
    by_cause = {cause: [e for e in errors if cause in e["message"]]
                for cause in ("nowhere_step", "htttp", "duplicate", "no_such_entry", "element", "workload.x +",
                              "max_attempts")}
    assert all(by_cause.values()), f"an error is missing: {by_cause}\n{errors}"
    # ... and the line is where the problem is, not just any number
    assert by_cause["nowhere_step"][0]["line"] == line_of(text, "nowhere_step")
    assert by_cause["htttp"][0]["line"] == line_of(text, "type: htttp")
    assert by_cause["duplicate"][0]["line"] == line_of(text, "- step: fetch", 2)
    assert by_cause["no_such_entry"][0]["line"] == line_of(text, "name: no_such_entry")
    assert by_cause["max_attempts"][0]["line"] == line_of(text, "max_attempts: 0")
    assert by_cause["duplicate"][0]["path"] == "workflow[2].step"
    assert not store.exists()                       # rejected before anything ran or was stored

    human = cli("run", path, "--store", store, store=store)   # the same without --json: readable, exit 2
    assert human.returncode == 2
    assert "INVALID" in human.stdout
    for e in errors:
        assert f"{e['path']} (line {e['line']}): {e['message']}" in human.stdout


def test_broken_yaml_is_invalid_with_its_line(tmp_path: Path, store: Path) -> None:
    path = write(tmp_path, "broken", """
        apiVersion: noetl.io/v1
        kind: Playbook
        metadata: {name: broken, path: tests/cli/broken}
        workflow:
          - step: start
            next: [{step: end}
          - step: end
        """)
    code, report = run_json(path, store)
    assert code == 2 and report["status"] == "INVALID"
    (error,) = report["errors"]
    assert "YAML" in error["message"]
    # PyYAML fails where the flow sequence breaks (line 7), having opened it on line 6
    assert error["line"] in (line_of(path.read_text(), "next: [{step: end}"), line_of(path.read_text(), "step: end", 2))


USAGE_ERRORS = {   # case -> (extra arguments of `run`, what stderr must say)
    "payload_not_json": (["--payload", "{bad"], "--payload is not valid JSON"),
    "payload_not_object": (["--payload", "[1, 2]"], "--payload must be a JSON object"),
    "set_without_value": (["--set", "novalue"], "--set expects key=value, got 'novalue'"),
    "set_bad_yaml": (["--set", "x=[1"], "--set x: '[1' is not a valid YAML value"),
    "credentials_not_objects": (["--credentials", "{folder}/creds.json"], "--credentials {folder}/creds.json: "
                                "'pg' must be an object {type, data: {...}}"),
}
UNREADABLE = ["missing", "directory", "not_utf8"]


@pytest.fixture(scope="module")
def usage_errors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, subprocess.CompletedProcess]]:
    """Every bad-command-line case, run concurrently: case -> (playbook, store, finished process)."""
    cases: dict[str, tuple[Path, Path, list]] = {}
    for case, (extra, _message) in USAGE_ERRORS.items():
        folder = tmp_path_factory.mktemp(case)
        path = one_step(folder, "ok", """
            type: python
            code: |
              def main():
                  return 1
            """)
        (folder / "creds.json").write_text('{"pg": "postgresql://u:p@h/db"}')
        extra = [arg.replace("{folder}", str(folder)) for arg in extra]
        cases[case] = (path, folder / "x.db", ["run", path, "--json", "--store", folder / "x.db", *extra])
    for kind in UNREADABLE:
        folder = tmp_path_factory.mktemp(kind)
        path = folder / "some [dir]" / "playbook.yaml"    # brackets: printed as text, never read as markup
        path.parent.mkdir()
        if kind == "directory":
            path.mkdir()
        elif kind == "not_utf8":
            path.write_bytes(b"\xff\xfe not utf-8")
        cases[kind] = (path, folder / "x.db", ["run", path, "--json", "--store", folder / "x.db"])
        cases[f"validate_{kind}"] = (path, folder / "y.db", ["validate", path])
    done = run_all({case: (args, store) for case, (_, store, args) in cases.items()})
    return {case: (path, store, done[case]) for case, (path, store, _) in cases.items()}


@pytest.mark.parametrize("kind", UNREADABLE)
@pytest.mark.parametrize("command", ["run", "validate"])
def test_unreadable_playbook_file_is_a_clear_usage_error(usage_errors: dict, kind: str, command: str) -> None:
    path, store, proc = usage_errors[kind if command == "run" else f"validate_{kind}"]
    assert proc.returncode == 2, proc
    assert proc.stdout == ""                      # not even a JSON report: the command never started
    assert f"error: cannot read {path}: " in proc.stderr, proc.stderr   # the whole path, on one line
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not store.exists()


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_bad_payload_or_set_exits_2(usage_errors: dict, case: str) -> None:
    path, store, proc = usage_errors[case]
    assert proc.returncode == 2
    assert proc.stdout == ""
    message = USAGE_ERRORS[case][1].replace("{folder}", str(path.parent))
    assert proc.stderr.startswith(f"error: {message}"), proc.stderr
    if not case.startswith("credentials"):
        assert not store.exists()                 # rejected before the store was opened


# ------------------------------------------------------------------------------------------ --set, live view
def test_set_and_payload_reach_the_workload_typed_and_deep_merged(tmp_path: Path, store: Path) -> None:
    path = write(tmp_path, "typed", """
        apiVersion: noetl.io/v1
        kind: Playbook
        metadata: {name: typed, path: tests/cli/typed}
        workload:
          cfg: {db: {host: default-host, port: 1, name: app}}
          name: default
          n: 0
        workflow:
          - step: start
            next: [{step: show}]
          - step: show
            type: python
            data:
              cfg: "{{ workload.cfg }}"
              n: "{{ workload.n }}"
              flag: "{{ workload.flag }}"
              name: "{{ workload.name }}"
              ratio: "{{ workload.ratio }}"
              tags: "{{ workload.tags }}"
              quoted: "{{ workload.quoted }}"
            code: |
              def main(cfg, n, flag, name, ratio, tags, quoted):
                  values = dict(cfg=cfg, n=n, flag=flag, name=name, ratio=ratio, tags=tags, quoted=quoted)
                  return {"values": values, "types": {k: type(v).__name__ for k, v in values.items()}}
            next: [{step: end}]
          - step: end
        """)
    code, report = run_json(path, store, "--payload", '{"cfg": {"db": {"host": "payload-host"}}, "name": "p"}',
                            "--set", "cfg.db.port=5432", "--set", "n=7", "--set", "flag=true",
                            "--set", "name=alice", "--set", "ratio=0.5", "--set", "tags=[a, b]",
                            "--set", "quoted='42'")
    assert code == 0, report
    result = report["steps"]["show"]["result"]
    assert result["values"] == {"cfg": {"db": {"host": "payload-host", "port": 5432, "name": "app"}}, "n": 7,
                                "flag": True, "name": "alice", "ratio": 0.5, "tags": ["a", "b"], "quoted": "42"}
    assert result["types"] == {"cfg": "dict", "n": "int", "flag": "bool", "name": "str", "ratio": "float",
                               "tags": "list", "quoted": "str"}
    start = report["events"][0]
    assert start["event_type"] == "execution_start"
    assert start["meta"]["workload"]["cfg"]["db"] == {"host": "payload-host", "port": 5432, "name": "app"}


def test_without_json_a_live_view_and_a_summary(tmp_path: Path, store: Path) -> None:
    path = write(tmp_path, "live", """
        apiVersion: noetl.io/v1
        kind: Playbook
        metadata: {name: live, path: tests/cli/live}
        workflow:
          - step: start
            next: [{step: first_step}]
          - step: first_step
            type: python
            code: |
              def main():
                  return {"answer": 42}
            next: [{step: end}]
          - step: end
        """)
    proc = cli("run", path, "--store", store, store=store)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    header = out.splitlines()[0]
    assert header.startswith("tests/cli/live v1 execution ")
    execution_id = header.rsplit(" ", 1)[1]
    assert len(execution_id) == 36                  # the whole id, not wrapped onto the next line
    assert "▶ first_step" in out and "✓ first_step" in out and "✓ end" in out
    assert out.index("▶ first_step") < out.index("✓ first_step") < out.index("▶ end")
    assert f"execution {execution_id}" in out       # the summary table's title
    assert '{"answer": 42}' in out                  # the step's result in the table
    assert "COMPLETED in " in out
    assert "✗" not in out and "{" not in header


def test_live_view_shows_a_failure_verbatim(tmp_path: Path, store: Path) -> None:
    """Error text is shown as text: `[x]` and `[/bold]` are not rich markup (a stray closing tag used to
    raise MarkupError in the listener, which killed the runtime's fold loop with a Traceback)."""
    path = one_step(tmp_path, "live_fail", """
        type: python
        code: |
          def main():
              raise ValueError("bad [x] value, stray [/bold] tag")
        """)
    proc = cli("run", path, "--store", store, store=store)
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout
    assert "▶ s" in out and "✗ s: ValueError: bad [x] value, stray [/bold] tag" in out
    assert "FAILED in " in out
    assert "step 's' failed: ValueError: bad [x] value, stray [/bold] tag" in out
    assert "✓ end" not in out and "▶ end" not in out


# ------------------------------------------------------------------------------------ bad input fails the step
FAILING_STEPS = {
    "missing_credential": ("""
        type: postgres
        auth: nope
        command: "SELECT 1"
        """, ["credential 'nope' not found"]),
    "unreachable_host": ("""
        type: http
        endpoint: http://127.0.0.1:1/
        """, ["http://127.0.0.1:1/", "ConnectError"]),
    "returns_a_set": ("""
        type: python
        code: |
          def main():
              return {1, 2}
        """, ["not JSON-serialisable", "set"]),
    "returns_an_object": ("""
        type: python
        code: |
          def main():
              return {"ok": 1, "thing": object()}
        """, ["not JSON-serialisable", "object at result['thing']"]),
    "raises": ("""
        type: python
        code: |
          def main():
              raise KeyError("no such key: region")
        """, ["KeyError", "no such key: region"]),
    "kills_its_process": ("""
        type: python
        code: |
          import os
          def main():
              os._exit(3)
        """, ["python worker process exited with code 3"]),
}


@pytest.fixture(scope="module")
def failing_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    runs = {}
    for case, (body, _causes) in FAILING_STEPS.items():
        folder = tmp_path_factory.mktemp(case)
        runs[case] = (["run", one_step(folder, case, body), "--json", "--store", folder / "x.db"], folder / "x.db")
    return run_all(runs)


@pytest.mark.parametrize("case", list(FAILING_STEPS))
def test_bad_input_fails_only_its_step(failing_runs: dict, case: str) -> None:
    code, report = report_of(failing_runs[case])
    assert code == 1, report
    assert report["status"] == "FAILED"
    steps = report["steps"]
    assert steps["start"]["status"] == "COMPLETED"
    assert steps["s"]["status"] == "FAILED" and steps["s"]["attempts"] == 1
    assert "end" not in steps                            # nothing after the failed step ran
    for cause in FAILING_STEPS[case][1]:
        assert cause in steps["s"]["error"], steps["s"]["error"]
    assert report["error"] == f"step 's' failed: {steps['s']['error']}"
    types = [e["event_type"] for e in report["events"]]
    assert types[-1] == "execution_failed" and types.count("step_failed") == 1
    assert "execution_complete" not in types


def test_python_pool_survives_a_dying_process(tmp_path: Path, store: Path, step_dir: Path) -> None:
    """The first attempt kills its worker process; the retry and a later step run on the (refilled) pool."""
    marker = step_dir / "crashed-once"
    path = write(tmp_path, "survive", """
        apiVersion: noetl.io/v1
        kind: Playbook
        metadata: {name: survive, path: tests/cli/survive}
        workflow:
          - step: start
            next: [{step: crash}]
          - step: crash
            type: python
            data: {marker: "{{ workload.marker }}"}
            retry: {max_attempts: 2}
            code: |
              import os
              def main(marker):
                  if not os.path.exists(marker):
                      open(marker, "w").close()
                      os._exit(3)
                  return {"pid": os.getpid(), "survived": True}
            next: [{step: after}]
          - step: after
            type: python
            code: |
              import os
              def main():
                  return {"pid": os.getpid()}
            next: [{step: end}]
          - step: end
        """)
    code, report = run_json(path, store, "--set", f"marker={json.dumps(str(marker))}")
    assert code == 0, report
    crash = report["steps"]["crash"]
    assert crash["status"] == "COMPLETED" and crash["attempts"] == 2 and crash["result"]["survived"] is True
    assert report["steps"]["after"]["status"] == "COMPLETED"
    errors = [e for e in report["events"] if e["event_type"] == "action_error"]
    assert len(errors) == 1 and "exited with code 3" in errors[0]["error"]


# -------------------------------------------------------------------------------------------------- validate
def test_validate(tmp_path: Path, store: Path) -> None:
    valid = write(tmp_path, "valid", """
        apiVersion: noetl.io/v1
        kind: Playbook
        metadata: {name: valid, path: tests/cli/valid}
        workflow:
          - step: start
            next: [{step: end}]
          - step: end
            type: python
            code: "def main(): return 1"
            not_a_key: 1
        """)
    proc = cli("validate", valid, store=store)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "valid: tests/cli/valid (2 steps)"
    assert f"warning workflow[1].not_a_key (line {line_of(valid.read_text(), 'not_a_key')})" in proc.stderr

    invalid = write(tmp_path, "invalid", INVALID)
    proc = cli("validate", invalid, store=store)
    assert proc.returncode == 2
    assert "valid:" not in proc.stdout
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error ")]
    assert len(error_lines) == 7, proc.stderr
    assert all(" (line " in line for line in error_lines)
    assert f"error workflow[2].step (line {line_of(invalid.read_text(), '- step: fetch', 2)}): duplicate" in proc.stderr
    # the template text, brackets and all, is reported as written
    assert "'{{ workload.x + }}'" in proc.stderr

    proc = cli("validate", invalid, "--json", store=store)
    assert proc.returncode == 2
    verdict = json.loads(proc.stdout)
    assert verdict["valid"] is False
    errors = [p for p in verdict["problems"] if p["severity"] == "error"]
    assert len(errors) == 7 and all(isinstance(p["line"], int) for p in errors)
    assert not store.exists()                        # validating touches no store


# --------------------------------------------------------------------------------------------------- catalog
CHILD = """
apiVersion: noetl.io/v1
kind: Playbook
metadata: {name: child, path: tests/cli/child}
workload: {x: 1}
workflow:
  - step: start
    next: [{step: double}]
  - step: double
    type: python
    data: {x: "{{ workload.x }}"}
    code: |
      def main(x):
          return {"doubled": x * 2}
    next: [{step: end}]
  - step: end
"""


def test_catalog_register_and_list(tmp_path: Path, store: Path) -> None:
    folder = tmp_path / "playbooks"
    folder.mkdir()
    child = write(folder, "child", CHILD)
    (folder / "case.yaml").write_text("description: not a playbook\nexpect: {status: COMPLETED}\n")
    write(folder, "broken", INVALID)

    proc = cli("catalog", "register", child, "--store", store, store=store)
    assert proc.returncode == 0 and proc.stdout.strip() == "registered tests/cli/child version 1"
    proc = cli("catalog", "register", folder, store=store)    # NOETL_STORE; the folder skips non-playbooks
    assert proc.returncode == 0 and proc.stdout.strip() == "registered tests/cli/child version 2"

    bad = run_all({"invalid": (["catalog", "register", folder / "broken.yaml"], store),
                   "missing": (["catalog", "register", tmp_path / "nope.yaml"], store)})
    assert bad["invalid"].returncode == 2 and "registered" not in bad["invalid"].stdout
    assert "INVALID" in bad["invalid"].stderr and "nowhere_step" in bad["invalid"].stderr
    assert bad["missing"].returncode == 2 and "cannot read" in bad["missing"].stderr

    proc = cli("catalog", "list", "--store", store, store=store)
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == ["tests/cli/child\tv1", "tests/cli/child\tv2"]   # nothing else added


def test_run_with_catalog_finds_child_playbooks(tmp_path: Path, store: Path) -> None:
    folder = tmp_path / "catalog"
    folder.mkdir()
    write(folder, "child", CHILD)
    (folder / "case.yaml").write_text("description: not a playbook\n")
    parent = write(tmp_path, "parent", """
        apiVersion: noetl.io/v1
        kind: Playbook
        metadata: {name: parent, path: tests/cli/parent}
        workflow:
          - step: start
            next: [{step: call}]
          - step: call
            type: playbook
            path: tests/cli/child
            return_step: double
            data: {x: 21}
            next: [{step: end}]
          - step: end
        """)
    code, report = run_json(parent, store, "--catalog", folder)
    assert code == 0, report
    assert report["steps"]["call"]["result"] == {"doubled": 42}
    assert all(e["execution_id"] == report["execution_id"] for e in report["events"])  # no child events


# ------------------------------------------------------------------------------------------------ credentials
def test_credentials_set_list_delete_never_show_the_secret(tmp_path: Path, store: Path) -> None:
    data = json.dumps({"host": "db.internal", "user": "app", "password": SECRET})
    proc = cli("credential", "set", "pg_main", "--type", "postgres", "--data", data, "--store", store, store=store)
    assert proc.returncode == 0 and proc.stdout.strip() == "stored credential pg_main (postgres)"
    proc = cli("credential", "set", "token", "--type", "bearer", "--data", "-", store=store,
               stdin=json.dumps({"token": SECRET + "-tok"}))
    assert proc.returncode == 0

    proc = cli("credential", "list", store=store)
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == ["pg_main\tpostgres", "token\tbearer"]

    # at rest: neither the database nor its WAL holds the secret in clear (only Fernet tokens)
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith(store.name))
    assert b"db.internal" not in stored and SECRET.encode() not in stored
    with sqlite3.connect(store) as db:
        rows = db.execute("SELECT name, type, secret FROM credentials ORDER BY name").fetchall()
    assert [(n, t) for n, t, _ in rows] == [("pg_main", "postgres"), ("token", "bearer")]
    assert all(bytes(secret).startswith(b"gAAAAA") for _, _, secret in rows)   # Fernet tokens

    bad = run_all({data: (["credential", "set", "broken", "--data", data], store) for data in ("not json", "[1, 2]")})
    assert bad["not json"].returncode == 2 and bad["not json"].stderr.startswith("error: Expecting value")
    assert bad["[1, 2]"].returncode == 2 and bad["[1, 2]"].stderr.startswith("error: --data must be a JSON object")

    proc = cli("credential", "delete", "pg_main", store=store)
    assert proc.returncode == 0 and proc.stdout.strip() == "deleted pg_main"
    proc = cli("credential", "delete", "pg_main", store=store)
    assert proc.returncode == 1 and "no credential named pg_main" in proc.stderr
    assert cli("credential", "list", store=store).stdout.splitlines() == ["token\tbearer"]
    assert SECRET not in "".join(p.stdout + p.stderr for p in outputs)


def test_a_stored_credential_reaches_a_postgres_step(tmp_path: Path, store: Path, pg_dsn: str) -> None:
    proc = cli("credential", "set", "pg_test", "--type", "postgres", "--data", json.dumps({"dsn": pg_dsn}),
               store=store)
    assert proc.returncode == 0
    path = one_step(tmp_path, "pg", """
        type: postgres
        auth: pg_test
        command: "SELECT 40 + 2 AS answer"
        """)
    code, report = run_json(path, store)
    assert code == 0, report
    assert "42" in json.dumps(report["steps"]["s"]["result"])
