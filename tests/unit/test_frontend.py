"""The HTTP API is composed once (noetl_frontend.app.build_api): `noetl server` and the cluster's API
(`python -m noetl_frontend`, `noetl server --kafka`) serve the same routes, ops endpoints and error answers;
only their ports differ. The apps are built, not served: the behaviour of the routes is tested over HTTP by
test_http_api.py (embedded) and tests/integration/test_services_kafka.py (cluster)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")

from noetl_runtime.postgres_store import MissingSecretKey  # noqa: E402


def routes(app: Any) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in app.openapi()["paths"].items() for method in ops}


@pytest.fixture
def embedded_app(tmp_path: Path) -> Any:
    from noetl_cli.server import build_app
    from noetl_embedded.runtime import EmbeddedRuntime
    from noetl_runtime.sqlite_store import SqliteStore

    from noetl_runtime.auth import Authenticator
    from noetl_runtime.tokens import SqliteTokens

    store = SqliteStore(tmp_path / "noetl.db")
    yield build_app(store, EmbeddedRuntime(store), auth=Authenticator(SqliteTokens(store)))
    store.close()


@pytest.fixture
def tokens(tmp_path: Path) -> Any:
    from noetl_runtime.sqlite_store import SqliteStore
    from noetl_runtime.tokens import SqliteTokens

    store = SqliteStore(tmp_path / "tokens.db")
    yield SqliteTokens(store)
    store.close()


@pytest.fixture
def cluster_app(tokens: Any) -> Any:
    pytest.importorskip("aiokafka")
    from noetl_frontend.app import cluster_api
    from noetl_runtime.auth import Authenticator
    from noetl_runtime.settings import Settings

    # No pool and no producer: building the app touches neither (they are used per request). The tokens
    # are a SQLite store's instead of the cluster's Postgres ones (no pool here).
    return cluster_api(Settings(), None, None, auth=Authenticator(tokens))


def test_both_modes_serve_the_same_routes(embedded_app: Any, cluster_app: Any) -> None:
    embedded, cluster = routes(embedded_app), routes(cluster_app)
    assert embedded == cluster
    api = {path for _, path in embedded if path.startswith("/api/")}
    assert {"/api/executions/run", "/api/executions/{execution_id}", "/api/context/render",
            "/api/credentials/{name}"} <= api
    assert {("GET", "/health"), ("GET", "/ready"), ("GET", "/metrics")} <= embedded


def test_both_modes_answer_a_missing_key_with_503_and_only_the_cluster_knows_kafka(embedded_app: Any,
                                                                                    cluster_app: Any) -> None:
    from aiokafka.errors import KafkaError

    assert MissingSecretKey in embedded_app.exception_handlers
    assert MissingSecretKey in cluster_app.exception_handlers
    assert KafkaError in cluster_app.exception_handlers and KafkaError not in embedded_app.exception_handlers


async def test_the_cluster_app_keeps_the_ingest_roles_metric_names(cluster_app: Any, tokens: Any) -> None:
    import httpx

    viewer, _ = await tokens.create("metrics", "viewer", None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=cluster_app), base_url="http://api",
                                 headers={"Authorization": f"Bearer {viewer}"}) as api:
        assert (await api.get("/health")).status_code == 200
        text = (await api.get("/metrics")).text
    assert 'service="ingest"' in text and "noetl_ingest_messages_produced 0.0" in text
