"""Fixtures of the security tests: the limits server (tests/security/limits_support.py) and a fresh engine
home for the step-isolation tests (their helpers are in engine_run.py)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from limits_support import LimitsServer


@pytest.fixture(scope="module")
def limits_server(tmp_path_factory: pytest.TempPathFactory):
    server = LimitsServer(tmp_path_factory.mktemp("limits") / "noetl.db")
    yield server
    server.stop()


@pytest.fixture
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh folder for the engine's store and files, outside pytest's 0700 tree (an engine running as
    another user must be able to use it)."""
    path = Path(tempfile.mkdtemp(prefix="noetl-security-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)
