"""Shared fixtures."""
import os
import shutil
import tempfile
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    """A real Postgres (architecture §5). Set NOETL_TEST_PG_DSN, e.g. by starting one with
    scripts/pg-start.sh; tests that need it are skipped, saying why, when it is unset."""
    dsn = os.environ.get("NOETL_TEST_PG_DSN")
    if not dsn:
        pytest.skip("NOETL_TEST_PG_DSN is not set: no Postgres to test against")
    return dsn


@pytest.fixture
def step_dir():
    """A folder python step code may write to. When tests run as root, steps run as NOETL_STEP_USER
    (docs/security.md), which cannot enter pytest's own tmp_path (its root is 0700): files a test shares
    with step code (markers, counters) go here instead."""
    path = Path(tempfile.mkdtemp(prefix="noetl-test-steps-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)
