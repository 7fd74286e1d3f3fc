"""Shared fixtures."""
import os

import pytest


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    """A real Postgres (architecture §5). Set NOETL_TEST_PG_DSN, e.g. by starting one with
    scripts/pg-start.sh; tests that need it are skipped, saying why, when it is unset."""
    dsn = os.environ.get("NOETL_TEST_PG_DSN")
    if not dsn:
        pytest.skip("NOETL_TEST_PG_DSN is not set: no Postgres to test against")
    return dsn
