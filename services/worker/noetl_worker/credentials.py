"""Secret and credential lookup for one command, and the redaction that keeps them out of its reports.

Invariant 7 (architecture §2): secret values are resolved only inside the worker and never leave it in
clear. So every value this object hands out is remembered, and `redact` replaces each of them with `***`
in whatever the worker is about to emit (errors, logs, results, saved data).

`{{ secret.NAME }}` needs an async lookup (the credential store), but Jinja renders synchronously. The
templates are therefore rendered twice: a probe pass with a mapping that records which names are read,
then the real pass once those names are fetched. A template whose secret names depend on other secrets'
values (never seen in practice) gets a few probe rounds.
"""
from __future__ import annotations

import re
import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from typing import Any

from noetl_common.ports import Credential, CredentialPort
from noetl_common.render import TemplateError, referenced_names, render

REDACTED = "***"
# Credential fields that locate a service rather than unlock it: redacting them would garble every error
# (a database named "test" would turn "conf_test_table" into "conf_***_table") and protect nothing.
_COORDINATES = frozenset({
    "host", "hostname", "port", "user", "username", "database", "dbname", "db", "db_host", "db_port",
    "db_user", "db_name", "pg_host", "pg_port", "pg_user", "pg_database", "sslmode", "schema", "scope",
    "region", "endpoint", "url", "header", "header_name", "type", "service", "description",
})
_ENV_PREFIX = "NOETL_SECRET_"
_PROBE_ROUNDS = 3


class Secrets:
    """Resolves secrets and credentials for one command and remembers them for redaction."""

    def __init__(self, credentials: CredentialPort | None, env: Mapping[str, str]) -> None:
        self._store = credentials
        self._env = env
        self._credentials: dict[str, Credential | None] = {}
        self._secrets: dict[str, Any] = {}      # name -> value (None: not found)
        self._values: set[str] = set()
        self._pattern: re.Pattern | None = None

    # --- lookup ------------------------------------------------------------------------------------
    async def credential(self, name: str) -> Credential | None:
        if name not in self._credentials:
            cred = await self._store.get(name) if self._store is not None else None
            self._credentials[name] = cred
            if cred is not None:
                self.remember_credential(cred.data)
        return self._credentials[name]

    async def secret(self, name: str) -> Any:
        """NOETL_SECRET_<NAME> first (exact, then upper-case), then credential <name>: its data's
        `value` or `token`, else the whole data. None when neither exists."""
        if name not in self._secrets:
            # NOETL_SECRET_KEY is the store's master key, not a playbook secret: never hand it out.
            env_names = [] if name.upper() == "KEY" else [_ENV_PREFIX + name, _ENV_PREFIX + name.upper()]
            value = next((self._env[n] for n in env_names if n in self._env), None)
            if value is None:
                cred = await self.credential(name)
                if cred is None and name.upper() != name:   # uploaded from NOETL_SECRET_<NAME>: upper case
                    cred = await self.credential(name.upper())
                if cred is not None:
                    data = cred.data or {}
                    value = data.get("value", data.get("token", data))
            self._secrets[name] = value
            self.remember(value)
        return self._secrets[name]

    def env_value(self, name: str) -> str | None:
        """An `auth: {source: env}` value: a secret too, so it is remembered."""
        value = self._env.get(name)
        self.remember(value)
        return value

    # --- redaction ---------------------------------------------------------------------------------
    def remember(self, value: Any) -> None:
        if isinstance(value, str):
            if value:
                self._values.add(value)
                self._pattern = None
        elif isinstance(value, Mapping):
            for v in value.values():
                self.remember(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                self.remember(v)

    def remember_credential(self, data: Mapping[str, Any]) -> None:
        for key, value in data.items():
            if isinstance(value, Mapping):
                self.remember_credential(value)
            elif str(key).lower() not in _COORDINATES:
                self.remember(value)

    @property
    def active(self) -> bool:
        return bool(self._values)

    def redact(self, value: Any) -> Any:
        """value with every remembered secret replaced by *** (strings inside dicts/lists too)."""
        if not self._values or value is None:
            return value
        if self._pattern is None:
            # Longest first, so a secret that contains another is replaced whole.
            ordered = sorted(self._values, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(v) for v in ordered))
        return self._redact(value)

    def _redact(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._pattern.sub(REDACTED, value)
        if isinstance(value, dict):
            return {self._redact(k) if isinstance(k, str) else k: self._redact(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._redact(v) for v in value]
        return value

    # --- rendering with `secret`, `uuid`, `now` ----------------------------------------------------
    async def render(self, value: Any, context: Mapping[str, Any], now: float) -> Any:
        """render(value) with the action-side names bound. Raises TemplateError (hinting at missing
        secrets) like render does."""
        ctx = dict(context)
        ctx.setdefault("uuid", _uuid)
        ctx.setdefault("now", lambda: datetime.fromtimestamp(now, timezone.utc).isoformat())
        if "secret" not in referenced_names(value):
            return render(value, ctx)
        for _ in range(_PROBE_ROUNDS):
            probe = _Probe(self._secrets)
            try:
                render(value, {**ctx, "secret": probe})
            except TemplateError:
                pass  # the real pass below reports it; the probe only collects names
            new = [n for n in probe.read if n not in self._secrets]
            if not new:
                break
            for name in new:
                await self.secret(name)
        try:
            return render(value, {**ctx, "secret": _Known(self._secrets)})
        except TemplateError as exc:
            missing = sorted(n for n, v in self._secrets.items() if v is None)
            if missing:
                hint = ", ".join(f"{n} (set {_ENV_PREFIX}{n.upper()} or store a credential named {n!r})"
                                 for n in missing)
                reason = str(exc).rsplit(" in template ", 1)[0]
                raise TemplateError(exc.template, f"{reason}; secret not found: {hint}") from exc
            raise

    async def check(self, names: list[str]) -> list[str]:
        """The names among `names` that resolve to nothing."""
        return [n for n in names if await self.secret(n) is None]


def _uuid() -> str:
    return str(uuid.uuid4())


class _Probe(Mapping):
    """Records every name read; answers with the value when already known, else a placeholder."""

    def __init__(self, known: dict[str, Any]) -> None:
        self.known = known
        self.read: list[str] = []

    def __getitem__(self, key: str) -> Any:
        if not isinstance(key, str):
            raise KeyError(key)
        self.read.append(key)
        value = self.known.get(key)
        return "" if value is None else value

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


class _Known(Mapping):
    """The resolved secrets: a missing one is an undefined name, so `default(...)` still works."""

    def __init__(self, known: dict[str, Any]) -> None:
        self.known = known

    def __getitem__(self, key: str) -> Any:
        value = self.known.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return (k for k, v in self.known.items() if v is not None)

    def __len__(self) -> int:
        return sum(1 for v in self.known.values() if v is not None)
