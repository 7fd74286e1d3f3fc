"""Helpers shared by tests of every kind: `from support import free_port`.

Importable because tests/ has no __init__.py: pytest's default (prepend) import mode puts tests/ on sys.path
when it loads tests/conftest.py, before any test module is imported.
"""
from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a server the test is about to start.
    Another process may take it in between; the servers tested fail loudly when that happens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
