"""The embedded engine needs none of the [kafka] extra: `pip install .[server]` then `noetl run` and
`noetl server` must work without aiokafka or faust installed. Checked in a fresh interpreter in which
importing them fails, as it would when they are absent."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

BLOCK = textwrap.dedent("""
    import builtins
    real = builtins.__import__
    def without_kafka(name, *args, **kwargs):
        if name.split(".")[0] in ("aiokafka", "faust"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return real(name, *args, **kwargs)
    builtins.__import__ = without_kafka
""")


@pytest.mark.parametrize("module", ["noetl_cli.main", "noetl_cli.server", "noetl_embedded.runtime"])
def test_embedded_modules_import_without_the_kafka_extra(module: str) -> None:
    done = subprocess.run([sys.executable, "-c", BLOCK + f"\nimport {module}\nprint('ok')"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_blocker_does_block() -> None:
    done = subprocess.run([sys.executable, "-c", BLOCK + "\nimport aiokafka"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0 and "blocked by the test" in done.stderr
