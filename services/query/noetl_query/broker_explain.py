"""The explainer of a cluster's API and query roles: they hold no execution state, the brokers do.

`BrokerExplainer(url)` asks `GET {NOETL_BROKER_URL}/explain/{id}?now=...` of the brokers' web servers; the
broker that gets the request forwards it to the one that owns the execution's partition (faust's
`table_route`, noetl_broker.web), which answers `noetl_common.explain` of its table's latest snapshot.
"""
from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from noetl_query.handlers import NoLiveState

MAX_PATH = 2000   # longer ids are no execution id (a uuid); not worth a request that a web server refuses


class BrokerExplainer:
    def __init__(self, url: str, timeout: float = 10.0, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        # NOETL_BROKER_TOKEN: the brokers' /explain takes it (noetl_broker.web); forwarded with the request
        # when the broker that gets it hands it to the owner of the execution's partition
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def __call__(self, execution_id: str, now: float) -> dict[str, Any] | None:
        path = quote(execution_id, safe="").replace(".", "%2E")   # '..' stays an id, never a path step
        if len(path) > MAX_PATH:
            return None
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                response = await client.get(f"{self.url}/explain/{path}", params={"now": repr(now)},
                                            headers=self.headers)
        except httpx.HTTPError as exc:
            raise NoLiveState(f"the brokers at {self.url} cannot be asked: {type(exc).__name__}: {exc}") from exc
        if response.status_code == 404:
            return None
        if response.status_code == 401:   # never shown to the caller as theirs: a configuration error here
            raise NoLiveState(f"the brokers at {self.url} refused this service's NOETL_BROKER_TOKEN "
                              "(unset or not theirs)")
        if response.status_code != 200:
            raise NoLiveState(f"the brokers at {self.url} answered HTTP {response.status_code}: "
                              f"{response.text[:300]}")
        try:
            body = response.json()
        except ValueError as exc:
            raise NoLiveState(f"the brokers at {self.url} answered something that is not JSON") from exc
        if not isinstance(body, dict) or not isinstance(body.get("items"), list):
            raise NoLiveState(f"the brokers at {self.url} answered something that is not an explanation")
        return body
