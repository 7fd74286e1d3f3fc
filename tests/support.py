"""Helpers shared by tests of every kind: `from support import free_port`.

Importable because pyproject's pytest settings put tests/ on sys.path (`pythonpath = ["tests"]`).
"""
from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a server the test is about to start.
    Another process may take it in between; the servers tested fail loudly when that happens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
