"""What authentication costs per request: the `noetl server` app over ASGI (no network), a cheap read
(GET /api/executions?limit=1 on an empty store) with a valid API token vs the same app with NOETL_AUTH=off,
and Authenticator.authenticate() alone (a SQLite token lookup: one sha256 and one indexed read).

    python bench/auth_bench.py [--repeat 3] [--requests 2000]
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx

from common import describe
from noetl_cli.server import build_app
from noetl_runtime.auth import Authenticator, AuthSettings
from noetl_embedded.runtime import EmbeddedRuntime
from noetl_runtime.sqlite_store import SqliteStore
from noetl_runtime.tokens import SqliteTokens


async def per_request_us(app: object, headers: dict[str, str], requests: int) -> float:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
        for _ in range(50):   # warm-up
            await client.get("/api/executions", params={"limit": 1}, headers=headers)
        started = time.perf_counter()
        for _ in range(requests):
            answer = await client.get("/api/executions", params={"limit": 1}, headers=headers)
            assert answer.status_code == 200, answer.text
        return (time.perf_counter() - started) / requests * 1e6


async def run(repeat: int, requests: int) -> None:
    with tempfile.TemporaryDirectory(prefix="noetl-auth-bench.") as work:
        store = SqliteStore(Path(work) / "noetl.db")
        tokens = SqliteTokens(store)
        for i in range(1000):   # a store with many tokens: the lookup is by hash, not a scan
            await tokens.create(f"t{i}", "viewer", None)
        token, _ = await tokens.create("bench", "viewer", None)
        auth = Authenticator(tokens)
        on = build_app(store, EmbeddedRuntime(store), auth=auth)
        off = build_app(store, EmbeddedRuntime(store), auth=Authenticator(tokens, settings=AuthSettings(auth="off")))
        with_token, without, alone = [], [], []
        for _ in range(repeat):
            with_token.append(await per_request_us(on, {"Authorization": f"Bearer {token}"}, requests))
            without.append(await per_request_us(off, {}, requests))
            started = time.perf_counter()
            for _ in range(requests):
                await auth.authenticate(f"Bearer {token}")
            alone.append((time.perf_counter() - started) / requests * 1e6)
        store.close()
    print(f"GET /api/executions, token (1,001 tokens in the store), µs/request: {describe(with_token)}")
    print(f"GET /api/executions, NOETL_AUTH=off, µs/request:                  {describe(without)}")
    print(f"authenticate() alone (SQLite lookup), µs:                          {describe(alone)}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    asyncio.run(run(args.repeat, args.requests))


if __name__ == "__main__":
    main()
