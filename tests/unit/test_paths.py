"""noetl_common.paths: the one walker for deferred template paths (the fold writes them, the worker walks
them), and the reading of the dotted paths older versions wrote."""
from __future__ import annotations

import copy

import pytest

from noetl_common import paths
from noetl_common.messages import ActionSpec, Command

ROOT = {"data": {"a.b": {"c": "{{ secret.X }}"}, "a": {"b": "plain"}, "": "empty key", "0": "a digit key"},
        "config": {"headers": {"X.Token": "{{ secret.T }}"}, "urls": ["u0", {"k": "{{ uuid() }}"}]},
        "auth": None}


@pytest.mark.parametrize("path, value", [
    (["data", "a.b", "c"], "{{ secret.X }}"),
    (["data", "a", "b"], "plain"),
    (["data", ""], "empty key"),
    (["data", "0"], "a digit key"),
    (["config", "headers", "X.Token"], "{{ secret.T }}"),
    (["config", "urls", 1, "k"], "{{ uuid() }}"),
    ([], ROOT),
])
def test_lookup_follows_keys_and_indexes_exactly(path, value):
    assert paths.lookup(ROOT, path) == value


@pytest.mark.parametrize("path", [["data", "a.b.c"], ["data", "a", "b", "c"], ["config", "urls", "1"],
                                  ["config", "urls", 2], ["config", "urls", -1], ["data", 0], ["auth", "x"],
                                  ["config", "urls", True]])
def test_a_path_that_does_not_exist_is_a_path_error_naming_it(path):
    with pytest.raises(paths.PathError, match="does not exist"):
        paths.lookup(ROOT, path)


def test_replace_copies_along_the_path_and_leaves_the_original_alone():
    before = copy.deepcopy(ROOT)
    out = paths.replace(ROOT, ["config", "urls", 1, "k"], "v")
    assert out["config"]["urls"][1] == {"k": "v"} and ROOT == before
    assert out["data"] is ROOT["data"]                       # untouched branches are shared, not copied
    assert paths.replace(ROOT, ["data", "a.b"], 1)["data"]["a.b"] == 1
    with pytest.raises(paths.PathError):
        paths.replace(ROOT, ["data", "nope"], 1)             # never creates a key


def test_text_is_readable_and_unambiguous():
    assert paths.text(["config", "headers", "X.Token"]) == 'config.headers["X.Token"]'
    assert paths.text(["data", "urls", 0, "k"]) == "data.urls[0].k"
    assert paths.text(["data", ""]) == 'data[""]'


def test_dotted_paths_of_older_versions_are_read_with_their_rule():
    assert paths.from_dotted("config.headers.X.Token", ROOT) == ["config", "headers", "X.Token"]
    # the old rule's ambiguity, which is why paths are structured now: "a.b" wins over a -> b
    assert paths.from_dotted("data.a.b", ROOT) == ["data", "a.b"]
    assert paths.from_dotted("config.urls.1.k", ROOT) == ["config", "urls", 1, "k"]
    with pytest.raises(paths.PathError):
        paths.from_dotted("config.urls.9", ROOT)


def test_commands_of_older_folds_keep_their_dotted_paths_for_the_worker_to_read():
    raw = ('{"command_id": "c", "execution_id": "e", "step": "s", "visit": 1, "attempt": 1, "time": 1,'
           ' "lease_seconds": 30, "action": {"type": "http", "deferred": ["config.headers.X.Token", '
           '["config", "headers", "X.Token"]]}}')
    assert Command.model_validate_json(raw).action.deferred == ["config.headers.X.Token",
                                                                ["config", "headers", "X.Token"]]
    assert ActionSpec(type="http", deferred=[["data", 0, ""]]).deferred == [["data", 0, ""]]


# ------------------------------------------------------------------------------------------ the worker's side
@pytest.fixture(scope="module")
def http():
    from test_worker_support import HttpFixture
    server = HttpFixture()
    yield server
    server.close()


def _command_of(document_step: dict) -> Command:
    from noetl_common.engine import advance
    from noetl_common.messages import StartExecution
    playbook = {"apiVersion": "noetl.io/v1", "kind": "Playbook", "metadata": {"name": "p", "path": "p"},
                "workflow": [{"step": "start", "next": [{"step": "s"}]}, {"step": "s", **document_step,
                                                                          "next": [{"step": "end"}]},
                             {"step": "end"}]}
    (command,) = advance(None, StartExecution(execution_id="e", time=1.0, playbook=playbook, path="p")).commands
    return command


async def _execute(command: Command, env: dict) -> list:
    from noetl_worker.execute import execute
    from noetl_worker.ports import WorkerPorts
    from test_worker_support import Emitted, MemoryCredentials
    ports = WorkerPorts(emit=Emitted(), credentials=MemoryCredentials({}), catalog=None, python_pool=None,
                        worker_id="w", env=env)
    await execute(command, ports)
    return list(ports.emit)


async def test_the_worker_renders_the_paths_the_fold_deferred_dots_and_indexes_included(http):
    command = _command_of({"type": "http", "method": "POST", "endpoint": f"{http.url}/echo",
                           "headers": {"X.Token": "{{ secret.TOKEN }}", "a.b": "{{ 'plain' }}"},
                           "data": {"ids": ["x", "{{ secret.TOKEN }}-{{ uuid() | length }}"]}})
    assert sorted(command.action.deferred) == [["config", "headers", "X.Token"], ["data", "ids", 1]]
    (done,) = [m for m in await _execute(command, {"NOETL_SECRET_TOKEN": "s3cr3t"}) if m.kind != "action_started"]
    assert done.kind == "action_completed", done
    call = http.calls[-1]
    assert call["headers"]["x.token"] == "s3cr3t" and call["headers"]["a.b"] == "plain"
    assert call["json"] == {"ids": ["x", "s3cr3t-36"]}
    assert command.action.config["headers"]["X.Token"] == "{{ secret.TOKEN }}"   # the command is untouched


async def test_a_deferred_template_that_yields_no_value_fails_the_attempt_naming_it():
    command = _command_of({"type": "python", "code": "def main(x):\n    return x\n", "data": {"x": "{{ uuid }}"}})
    (failed,) = [m for m in await _execute(command, {}) if m.kind != "action_started"]
    assert failed.kind == "action_failed"
    assert failed.error == ("cannot render data.x: `uuid` is a function, not a value (call it: add `()`) in "
                            "template '{{ uuid }}'")


async def test_a_deferred_path_missing_from_the_action_fails_the_attempt_not_the_worker():
    command = _command_of({"type": "python", "code": "def main(x):\n    return x\n", "data": {"x": "{{ uuid() }}"}})
    broken = command.model_copy(update={"action": command.action.model_copy(update={"deferred": [["data", "y"]]})})
    (failed,) = [m for m in await _execute(broken, {}) if m.kind != "action_started"]
    assert failed.kind == "action_failed" and failed.error == (
        "deferred template: path data.y does not exist (no 'y' at data) in the action")


async def test_the_worker_reads_an_older_dotted_path_and_fails_the_attempt_on_an_impossible_one(http):
    from test_worker_support import command
    old = command("http", config={"endpoint": f"{http.url}/echo", "headers": {"X.Token": "{{ secret.TOKEN }}"}},
                  deferred=["config.headers.X.Token"])
    (done,) = [m for m in await _execute(old, {"NOETL_SECRET_TOKEN": "old-s3cr3t"}) if m.kind != "action_started"]
    assert done.kind == "action_completed" and http.calls[-1]["headers"]["x.token"] == "old-s3cr3t"
    impossible = command("python", data={"k": "{{ uuid() }}"}, deferred=["data.nope"], config={"code": "x"})
    (failed,) = [m for m in await _execute(impossible, {}) if m.kind != "action_started"]
    assert failed.kind == "action_failed" and failed.error == "deferred template: path 'data.nope' does not exist in the action"
