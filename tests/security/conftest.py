"""Fixtures of the security tests: the limits server (tests/security/limits_support.py), a fresh engine
home for the step-isolation tests (their helpers are in engine_run.py), and the Kafka endpoint of the
integration tests (Tansu, started once per session when no Kafka is configured) for the security tests
that run `noetl server --kafka` or the broker."""
from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from limits_support import LimitsServer


def _integration_conftest():
    # tests/integration/conftest.py owns how a Kafka endpoint is found or started; reuse it, do not copy it
    path = Path(__file__).resolve().parents[1] / "integration" / "conftest.py"
    spec = importlib.util.spec_from_file_location("noetl_integration_kafka_fixtures", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_kafka = _integration_conftest()
kafka_endpoint = _kafka.kafka_endpoint
topics = _kafka.topics


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kafka: needs a Kafka protocol endpoint (KAFKA_BOOTSTRAP_SERVERS, Docker "
                                       "or Tansu)")


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
