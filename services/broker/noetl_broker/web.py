"""The broker's HTTP views on faust's web server: /health, /ready, /metrics, and /explain/{execution_id}
(what the execution waits for, from the table; forwarded to the worker that owns its partition).

/health and /ready are open (probes); /explain and /metrics need `Authorization: Bearer NOETL_BROKER_TOKEN`
(docs/security.md "The broker's listener"). The broker holds no API tokens (it has no database), so its
callers (the API and query roles, Prometheus) share this one token with it. Without a configured token
nobody is let in, unless NOETL_AUTH=off (allowed on a loopback address only).
"""
from __future__ import annotations

import hmac
import math
import time
from collections.abc import Callable, Iterator
from functools import wraps
from typing import TYPE_CHECKING, Any

MAX_CREDENTIAL = 8192   # characters of an Authorization header; longer is refused unread

if TYPE_CHECKING:
    import faust

    from noetl_broker.app import Broker


def refusal(authorization: str | None, token: str | None, auth_off: bool = False) -> str | None:
    """Why a request with this Authorization header may not see /explain or /metrics (None: it may)."""
    if auth_off:
        return None
    if token is None:
        return "this broker has no NOETL_BROKER_TOKEN: its /explain and /metrics serve nobody"
    if authorization is None or len(authorization) > MAX_CREDENTIAL:
        return "a bearer token is required (NOETL_BROKER_TOKEN)"
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return "a bearer token is required (NOETL_BROKER_TOKEN)"
    if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"),
                               token.encode("utf-8", "surrogateescape")):
        return "the bearer token is not this broker's (NOETL_BROKER_TOKEN)"
    return None


def guarded(token: str | None, auth_off: bool) -> Callable[[Any], Any]:
    """A view that answers 401 unless the request carries the broker's token. Checked before faust's
    table_route forwards anything, so an unauthenticated request costs no other broker a hop."""
    def decorate(fun: Any) -> Any:
        @wraps(fun)
        async def view(web: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
            why = refusal(request.headers.get("Authorization"), token, auth_off)
            if why is not None:
                return web.json({"detail": why}, status=401, headers={"WWW-Authenticate": "Bearer"})
            return await fun(web, request, *args, **kwargs)
        return view
    return decorate


def install_views(app: faust.App, broker: Broker, token: str | None = None, auth_off: bool = False) -> None:
    guard = guarded(token, auth_off)

    @app.page("/health")
    async def health(web: Any, request: Any) -> Any:
        return web.json({"status": "ok"})

    @app.page("/ready")
    async def ready(web: Any, request: Any) -> Any:
        why = broker.not_ready()
        if why is not None:
            return web.json({"status": "not ready", "reason": why}, status=503)
        return web.json({"status": "ready", "partitions": sorted(broker.assigned)})

    @app.page("/explain/{execution_id}")
    @guard
    @app.table_route(table=broker.table, match_info="execution_id")
    async def explain(web: Any, request: Any, execution_id: str) -> Any:
        try:
            now = float(request.query.get("now") or time.time())   # the asking API's clock
        except ValueError:
            now = math.nan
        if not math.isfinite(now):
            return web.json({"detail": "now must be a finite number of epoch seconds"}, status=400)
        body = await broker.explain(execution_id, now)
        if body is None:
            return web.json({"detail": f"no state of execution {execution_id!r} on this broker"}, status=404)
        return web.json(body)

    @app.page("/metrics")
    @guard
    async def metrics(web: Any, request: Any) -> Any:
        return web.text(prometheus_text(broker), content_type="text/plain; version=0.0.4")


def prometheus_text(broker: Broker) -> str:
    """The broker's counters and gauges in Prometheus text format (its /metrics; `noetl server --kafka`
    serves them on its own /metrics)."""
    gauges = {
        "noetl_broker_timers_pending": ("deadlines scheduled", float(broker.timers.pending())),
        "noetl_broker_state_cache": ("parsed states cached", float(len(broker.cache))),
        "noetl_broker_table_states": ("execution states in the table (running, and finished within "
                                      "NOETL_BROKER_EVICT_AFTER)", float(len(broker.table.data))),
        "noetl_broker_evictions_pending": ("finished states waiting for their eviction",
                                           float(len(broker.evictions))),
        "noetl_broker_batches_inflight": ("folded batches not yet durable", float(broker.inflight)),
        "noetl_broker_ready": ("1 when the table is recovered and the agent folds", float(broker.recovered)),
    }
    return broker.metrics.prometheus(gauges)


class BrokerCollector:
    """The broker's metrics as a Prometheus collector (read live), for a host process's registry."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def collect(self) -> Iterator[Any]:
        from prometheus_client.parser import text_string_to_metric_families

        yield from text_string_to_metric_families(prometheus_text(self.broker))
