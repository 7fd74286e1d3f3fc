"""The limits server fixture (tests/security/limits_support.py)."""
from __future__ import annotations

import pytest

from limits_support import LimitsServer


@pytest.fixture(scope="module")
def limits_server(tmp_path_factory: pytest.TempPathFactory):
    server = LimitsServer(tmp_path_factory.mktemp("limits") / "noetl.db")
    yield server
    server.stop()
