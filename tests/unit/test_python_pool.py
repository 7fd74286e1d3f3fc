"""The python process pool (DSL §2.1): binding rules, one namespace, captured output, real timeouts."""
import asyncio
import time

import pytest

from noetl_worker.python_pool import PythonPool


@pytest.fixture(scope="module")
def pool():
    p = PythonPool(2)
    yield p
    p.close()


async def test_parameters_bind_by_name_with_defaults(pool):
    code = "def main(a, b, c=3):\n    return {'a': a, 'b': b, 'c': c}\n"
    out = await pool.run(code, {"a": 1, "b": "two", "unused": True}, 10)
    assert out.ok and out.result == {"a": 1, "b": "two", "c": 3}


async def test_input_data_receives_the_whole_data_unless_it_is_a_key(pool):
    code = "def main(input_data):\n    return sorted(input_data)\n"
    assert (await pool.run(code, {"a": 1, "b": 2}, 10)).result == ["a", "b"]
    code = "def main(input_data):\n    return input_data['name']\n"
    assert (await pool.run(code, {"input_data": {"name": "ann"}}, 10)).result == "ann"


async def test_kwargs_receive_all_of_data(pool):
    code = "def main(a, **kw):\n    return {'a': a, 'kw': kw}\n"
    out = await pool.run(code, {"a": 1, "b": 2, "c": [3]}, 10)
    assert out.result == {"a": 1, "kw": {"b": 2, "c": [3]}}
    code = "def main(**kw):\n    return {k: [v, type(v).__name__] for k, v in kw.items()}\n"
    out = await pool.run(code, {"n": 3, "r": 0.5, "f": True, "l": [1], "d": {"k": 1}}, 10)
    assert out.result == {"n": [3, "int"], "r": [0.5, "float"], "f": [True, "bool"], "l": [[1], "list"],
                          "d": [{"k": 1}, "dict"]}


async def test_missing_required_parameter_is_named(pool):
    out = await pool.run("def main(a, needed):\n    return 1\n", {"a": 1}, 10)
    assert not out.ok
    assert "'needed'" in out.error and "missing" in out.error
    assert "Traceback" not in (out.log or "")


async def test_module_level_imports_and_helpers_are_visible_in_main(pool):
    code = ("import json\nimport math as m\nHELPER = 10\n\ndef helper(x):\n    return x + HELPER\n\n"
            "def main():\n    return {'x': helper(m.floor(1.5)), 'text': json.dumps([1])}\n")
    out = await pool.run(code, {}, 10)
    assert out.ok and out.result == {"x": 11, "text": "[1]"}


async def test_module_state_does_not_leak_between_calls(pool):
    code = "COUNT = []\n\ndef main():\n    COUNT.append(1)\n    return len(COUNT)\n"
    results = [(await pool.run(code, {}, 10)).result for _ in range(4)]
    assert results == [1, 1, 1, 1]


async def test_stdout_and_stderr_are_captured_as_the_log(pool):
    code = "import sys\n\ndef main(x):\n    print('hello', x)\n    print('oops', file=sys.stderr)\n    return x\n"
    out = await pool.run(code, {"x": 5}, 10)
    assert out.ok and out.result == 5
    assert out.log == "hello 5\noops\n"


async def test_exception_gives_type_and_message_with_traceback_in_log(pool):
    code = "def main():\n    print('before')\n    raise ValueError('boom')\n"
    out = await pool.run(code, {}, 10)
    assert not out.ok and out.error == "ValueError: boom"
    assert out.log.startswith("before\n")
    assert "Traceback" in out.log and 'File "<step code>", line 3, in main' in out.log
    assert "_python_child" not in out.log   # the pool's own frames are not the user's business


async def test_syntax_error_and_missing_main(pool):
    out = await pool.run("def main(:\n  pass\n", {}, 10)
    assert not out.ok and out.error.startswith("SyntaxError")
    out = await pool.run("x = 1\n", {}, 10)
    assert not out.ok and "main()" in out.error


async def test_non_serialisable_return_is_reported_in_the_child(pool):
    out = await pool.run("def main():\n    return {1, 2}\n", {}, 10)
    assert not out.ok and out.error == "result is not JSON-serialisable: set"
    out = await pool.run("import datetime\ndef main():\n    return {'a': [1, datetime.date(2020, 1, 1)]}\n", {}, 10)
    assert out.error == "result is not JSON-serialisable: date at result['a'][1]"
    out = await pool.run("def main():\n    return float('nan')\n", {}, 10)
    assert not out.ok and "nan" in out.error


async def test_tuples_come_back_as_json_lists(pool):
    out = await pool.run("def main():\n    return {'t': (1, 2), 1: 'int key'}\n", {}, 10)
    assert out.result == {"t": [1, 2], "1": "int key"}


async def test_timeout_kills_a_busy_loop_and_the_pool_keeps_working():
    pool = PythonPool(1)
    try:
        start = time.monotonic()
        out = await pool.run("def main():\n    while True:\n        pass\n", {}, 0.5)
        assert not out.ok and out.error == "timed out after 0.5s"
        assert time.monotonic() - start < 3
        out = await pool.run("def main(n):\n    return n * n\n", {"n": 7}, 10)
        assert out.ok and out.result == 49
    finally:
        pool.close()


async def test_crash_is_reported_and_the_process_replaced():
    pool = PythonPool(1)
    try:
        out = await pool.run("import os\ndef main():\n    os._exit(3)\n", {}, 10)
        assert not out.ok and "exited with code 3" in out.error
        out = await pool.run("import os, signal\ndef main():\n    os.kill(os.getpid(), signal.SIGKILL)\n", {}, 10)
        assert not out.ok and "killed by signal 9" in out.error
        assert (await pool.run("def main():\n    return 'alive'\n", {}, 10)).result == "alive"
    finally:
        pool.close()


async def test_cancelling_a_call_stops_the_code_and_frees_the_slot():
    pool = PythonPool(1)
    try:
        task = asyncio.create_task(pool.run("import time\ndef main():\n    time.sleep(60)\n", {}, None))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        out = await asyncio.wait_for(pool.run("def main():\n    return 1\n", {}, 10), 10)
        assert out.result == 1
    finally:
        pool.close()


async def test_callers_beyond_the_pool_size_wait_their_turn(pool):
    code = "import time\ndef main(i):\n    time.sleep(0.05)\n    return i\n"
    results = await asyncio.gather(*(pool.run(code, {"i": i}, 10) for i in range(10)))
    assert [r.result for r in results] == list(range(10))


async def test_data_that_cannot_be_sent_is_reported(pool):
    out = await pool.run("def main(x):\n    return 1\n", {"x": lambda: 1}, 10)
    assert not out.ok and "cannot be sent" in out.error


async def test_many_concurrent_trivial_calls_all_answer_right(pool):
    """4,000 calls from 32 concurrent callers each get their own answer (no crossed replies, no lost call).
    How fast the pool is belongs to the benchmarks (bench/embedded_bench.py), not to a timed unit test."""
    code = "def main(n):\n    return n*n\n"
    n_calls = 4000
    answered: list[int] = []

    async def caller(k):
        for i in range(k, n_calls, 32):
            out = await pool.run(code, {"n": i}, 10, execution="bench")
            assert out.result == i * i
            answered.append(i)

    await asyncio.gather(*(caller(k) for k in range(32)))
    assert sorted(answered) == list(range(n_calls))


async def test_closed_pool_refuses_work():
    pool = PythonPool(1)
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        await pool.run("def main():\n    return 1\n", {}, 1)


async def test_children_do_not_see_secret_env_and_subprocess_output_is_the_steps_log(monkeypatch, capfd):
    monkeypatch.setenv("NOETL_SECRET_HIDDEN", "do-not-inherit")
    pool = PythonPool(1)
    try:
        code = ("import os\ndef main():\n    print('before', flush=True)\n    os.system('echo from-a-subprocess')\n"
                "    return os.environ.get('NOETL_SECRET_HIDDEN', 'absent')\n")
        out = await pool.run(code, {}, 10)
        assert out.ok and out.result == "absent"
        assert out.log == "before\nfrom-a-subprocess\n"   # in order, and only in the step's own log
        captured = capfd.readouterr()
        assert "from-a-subprocess" not in captured.out and "from-a-subprocess" not in captured.err
    finally:
        pool.close()
