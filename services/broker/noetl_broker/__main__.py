"""`python -m noetl_broker`: one broker worker, until SIGTERM/SIGINT.

Reads the Settings (NOETL_KAFKA_BOOTSTRAP, NOETL_TOPIC_PREFIX, NOETL_KAFKA_SESSION_TIMEOUT_MS,
NOETL_HTTP_HOST/PORT, NOETL_LOG_LEVEL ...) plus the broker's own (noetl_broker.settings, docs/broker.md):
NOETL_TOPIC_PARTITIONS, NOETL_BROKER_BATCH_SIZE, NOETL_BROKER_PIPELINE, NOETL_BROKER_POOLS,
NOETL_BROKER_STORE, NOETL_BROKER_COMMIT_INTERVAL, NOETL_BROKER_SESSION_TIMEOUT, NOETL_KAFKA_FETCH_MAX_WAIT_MS,
NOETL_BROKER_CHANGELOG_LAST_ALONE, NOETL_BROKER_STATE_CACHE, NOETL_BROKER_WEB, NOETL_BROKER_EVICT_AFTER,
NOETL_TOPIC_REPLICATION. Creates the missing topics,
then runs faust's worker (its signal handling, graceful stop and crash exit code) with the app from
`create_app`. /health, /ready and /metrics are served on NOETL_HTTP_PORT; logs are JSON lines on stderr.
"""
from __future__ import annotations

import asyncio
import logging
import sys

log = logging.getLogger("noetl.broker")


def main() -> int:
    import faust

    from noetl_runtime.http_ops import configure_json_logging
    from noetl_runtime import kafka_io
    from noetl_runtime.tuning import tune_gc

    from noetl_broker.app import create_app
    from noetl_broker.settings import load_broker_settings

    from pydantic import ValidationError

    from noetl_runtime.settings import describe_invalid

    try:
        settings = load_broker_settings()
    except ValidationError as exc:   # one line naming the variable, not a traceback
        configure_json_logging("INFO")
        log.error("%s", describe_invalid(exc))
        return 2
    configure_json_logging(settings.log_level)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    created = loop.run_until_complete(kafka_io.ensure_topics(
        settings, settings.topics, settings.pools, partitions=settings.topic_partitions,
        replication_factor=settings.topic_replication))
    if created:
        log.info("created topics %s", created)
    app = create_app(settings)
    tune_gc()   # after the imports and the app: what exists now is frozen out of the collector's way
    worker = faust.Worker(app, loop=loop, loglevel=settings.log_level, quiet=True, override_logging=False,
                          redirect_stdouts=False)
    worker.execute_from_commandline()   # exits the process: 0 after a signal, 1 after a crash
    return 0


if __name__ == "__main__":
    sys.exit(main())
