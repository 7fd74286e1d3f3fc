"""Topic names: defined here and nowhere else (architecture §1). A prefix isolates installations/tests."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topics:
    prefix: str = ""

    def _name(self, base: str) -> str:
        return f"{self.prefix}{base}"

    @property
    def requests(self) -> str:
        return self._name("noetl.requests")

    @property
    def results(self) -> str:
        return self._name("noetl.results")

    @property
    def events(self) -> str:
        return self._name("noetl.events")

    @property
    def catalog(self) -> str:
        return self._name("noetl.catalog")

    @property
    def dlq(self) -> str:
        return self._name("noetl.dlq")

    def commands(self, pool: str = "default") -> str:
        return self._name(f"noetl.commands.{pool}")

    # Consumer groups (and faust's app id, which names its changelog topics) live here too: under the same
    # prefix, so installations sharing a cluster never share a group.
    def worker_group(self, pool: str = "default") -> str:
        return self._name(f"noetl-worker-{pool}")

    def query_group(self, name: str = "noetl-query") -> str:
        """The query service's group. Another `name` (NOETL_QUERY_GROUP) is a new group, which starts from
        the beginning of noetl.events: how a projection is rebuilt without touching the live one."""
        return self._name(name)

    @property
    def broker_app(self) -> str:
        return self._name("noetl-broker")
