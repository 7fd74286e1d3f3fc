"""Secret and credential lookup for one command, and the redaction that keeps them out of its reports.

Invariant 7 (architecture §2): secret values are resolved only inside the worker and never leave it in
clear. So every value this object hands out is remembered, and `redact` replaces each of them, in every
form `redaction.forms` lists, with `***` in whatever the worker is about to emit (errors, logs, results,
saved data); the process's log records are redacted too (`redaction.register_process_secret`).

`{{ secret.NAME }}` needs an async lookup (the credential store), but Jinja renders synchronously. The
templates are therefore rendered twice: a probe pass with a mapping that records which names are read,
then the real pass once those names are fetched. A template whose secret names depend on other secrets'
values (never seen in practice) gets a few probe rounds. The `secret` namespace answers only by name: it
cannot be listed, iterated, printed or serialised whole, so no template can walk every secret.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from typing import Any, NoReturn

from noetl_common.ports import Credential, CredentialPort
from noetl_common.render import TemplateError, referenced_names, render

from noetl_worker.redaction import REDACTED, Redactor, register_process_secret

__all__ = ["REDACTED", "Secrets", "ENV_PREFIX", "MASTER_KEY_ENV"]

# Credential fields that locate a service rather than unlock it: redacting them would garble every error
# (a database named "test" would turn "conf_test_table" into "conf_***_table") and protect nothing.
_COORDINATES = frozenset({
    "host", "hostname", "port", "user", "username", "database", "dbname", "db", "db_host", "db_port",
    "db_user", "db_name", "pg_host", "pg_port", "pg_user", "pg_database", "sslmode", "schema", "scope",
    "region", "endpoint", "url", "header", "header_name", "type", "service", "description",
})
ENV_PREFIX = "NOETL_SECRET_"
MASTER_KEY_ENV = "NOETL_SECRET_KEY"   # the store's master key: shares the prefix, is never a playbook secret
_PROBE_ROUNDS = 3


def secret_env_name(name: str, env: Mapping[str, str]) -> str | None:
    """The NOETL_SECRET_* variable that holds secret `name` (as written, then upper-cased), never the
    master key. `name` may carry the prefix already (`auth: {source: env, name: NOETL_SECRET_API}`)."""
    bare = name[len(ENV_PREFIX):] if name.upper().startswith(ENV_PREFIX) else name
    for candidate in (ENV_PREFIX + bare, ENV_PREFIX + bare.upper()):
        if candidate.upper() != MASTER_KEY_ENV and candidate in env:
            return candidate
    return None


class Secrets:
    """Resolves secrets and credentials for one command and remembers them for redaction."""

    def __init__(self, credentials: CredentialPort | None, env: Mapping[str, str]) -> None:
        self._store = credentials
        self._env = env
        self._credentials: dict[str, Credential | None] = {}
        self._secrets: dict[str, Any] = {}      # name -> value (None: not found)
        self._redactor = Redactor()

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
            variable = secret_env_name(name, self._env) if name.upper() != "KEY" else None
            value = self._env[variable] if variable is not None else None
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
        """An `auth: {source: env}` value: only NOETL_SECRET_* variables (not the master key), so a step
        cannot send the engine's own configuration (database URL, master key) anywhere. Remembered."""
        variable = secret_env_name(name, self._env)
        value = self._env[variable] if variable is not None else None
        self.remember(value)
        return value

    # --- redaction ---------------------------------------------------------------------------------
    def remember(self, value: Any) -> None:
        if isinstance(value, str):
            if value:
                self._redactor.add(value)
                register_process_secret(value)
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
        return self._redactor.active

    def redact(self, value: Any) -> Any:
        """value with every remembered secret (in each of its forms) replaced by *** (strings inside
        dicts/lists too)."""
        return self._redactor.value(value)

    def redact_cut(self, text: str, marker: str) -> str:
        """`text` that was cut at `marker` (bounded output), redacted including secrets cut in two there."""
        return self._redactor.text(self._redactor.cut_edges(text, marker))

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
                hint = ", ".join(f"{n} (set {ENV_PREFIX}{n.upper()} or store a credential named {n!r})"
                                 for n in missing)
                reason = str(exc).rsplit(" in template ", 1)[0]
                raise TemplateError(exc.template, f"{reason}; secret not found: {hint}") from exc
            raise

    async def check(self, names: list[str]) -> list[str]:
        """The names among `names` that resolve to nothing."""
        return [n for n in names if await self.secret(n) is None]


def _uuid() -> str:
    return str(uuid.uuid4())


class _Namespace(Mapping):
    """`secret` in templates: a value by name, nothing else. Listing, iterating, printing, pickling or
    JSON-encoding it fails, so `{{ secret | tojson }}`, `{{ secret | list }}` or `{% for k in secret %}`
    cannot walk the secrets; its state sits in underscore attributes the sandbox refuses to read."""

    __slots__ = ("_known",)

    def __init__(self, known: dict[str, Any]) -> None:
        self._known = known

    def __iter__(self) -> Iterator[str]:
        raise TypeError("the secret namespace cannot be listed: read one secret by name (secret.NAME)")

    def __len__(self) -> int:
        raise TypeError("the secret namespace has no length: read one secret by name (secret.NAME)")

    def __repr__(self) -> str:
        return "<secret namespace: read one secret by name>"

    __str__ = __repr__

    def __reduce_ex__(self, protocol: Any) -> NoReturn:
        raise TypeError("the secret namespace cannot be serialised: read one secret by name (secret.NAME)")


class _Probe(_Namespace):
    """Records every name read; answers with the value when already known, else a placeholder."""

    __slots__ = ("_read",)

    def __init__(self, known: dict[str, Any]) -> None:
        super().__init__(known)
        self._read: list[str] = []

    @property
    def read(self) -> list[str]:
        return self._read

    def __getitem__(self, key: str) -> Any:
        if not isinstance(key, str):
            raise KeyError(key)
        self._read.append(key)
        value = self._known.get(key)
        return "" if value is None else value


class _Known(_Namespace):
    """The resolved secrets: a missing one is an undefined name, so `default(...)` still works."""

    __slots__ = ()

    def __getitem__(self, key: str) -> Any:
        value = self._known.get(key) if isinstance(key, str) else None
        if value is None:
            raise KeyError(key)
        return value
