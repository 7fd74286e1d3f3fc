"""Turn a step's `auth` reference into credential data (DSL §2.8, the reference's §5 forms).

Forms accepted (after the fold rendered them; they name credentials, they never hold secrets):
- `"pg_local"`: the stored credential of that name;
- `{source: credential|secret|env|inline, key|name: ..., type|service: ..., fields: {...}, scope: ...}`:
  one spec (the presence of any spec key says so); `env` reads NOETL_SECRET_<NAME> only, never the
  engine's other variables nor its master key (NOETL_SECRET_KEY);
- `{alias: spec, ...}`: several, by alias (DuckDB turns each into a SECRET). A spec may be a bare name.
Resolution happens only here, inside the worker; the values go to `Secrets` for redaction.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from noetl_worker.credentials import Secrets

_SPEC_KEYS = frozenset({"source", "key", "name", "service", "secret_name", "scope", "fields", "inject",
                        "type", "credential"})


class AuthError(Exception):
    """The reference cannot be resolved: the message names what is missing."""


@dataclass
class ResolvedAuth:
    service: str                  # bearer | basic | api_key | header | postgres | hmac | s3 | generic ...
    data: dict[str, Any] = field(default_factory=dict)
    name: str | None = None       # the credential or alias name, for error messages
    scope: str | None = None


async def resolve_auth(auth: Any, secrets: Secrets) -> ResolvedAuth | dict[str, ResolvedAuth] | None:
    """None when there is no auth; one ResolvedAuth; or {alias: ResolvedAuth} for an alias map."""
    if auth is None or auth == "" or auth == {}:
        return None
    if isinstance(auth, str):
        return await _resolve_spec({"source": "credential", "key": auth}, secrets, auth)
    if isinstance(auth, dict):
        if auth.keys() & _SPEC_KEYS:
            return await _resolve_spec(auth, secrets, None)
        out: dict[str, ResolvedAuth] = {}
        for alias, spec in auth.items():
            if isinstance(spec, str):
                spec = {"source": "credential", "key": spec}
            if not isinstance(spec, dict):
                raise AuthError(f"auth alias {alias!r}: expected a credential name or a mapping, "
                                f"got {type(spec).__name__}")
            out[str(alias)] = await _resolve_spec(spec, secrets, str(alias))
        return out
    raise AuthError(f"auth must be a credential name or a mapping, got {type(auth).__name__}")


async def resolve_single(auth: Any, secrets: Secrets, kind: str) -> ResolvedAuth | None:
    """For actions that take one credential (http, postgres): an alias map with one entry is accepted."""
    resolved = await resolve_auth(auth, secrets)
    if isinstance(resolved, dict):
        if len(resolved) != 1:
            raise AuthError(f"a {kind} step takes one credential in `auth`, got aliases {sorted(resolved)}")
        return next(iter(resolved.values()))
    return resolved


async def _resolve_spec(spec: dict[str, Any], secrets: Secrets, alias: str | None) -> ResolvedAuth:
    source = str(spec.get("source") or "credential").lower()
    service = spec.get("service") or spec.get("type")
    name = spec.get("key") or spec.get("name") or spec.get("credential") or spec.get("secret_name")
    label = alias or name
    if source == "credential":
        if not name:
            raise AuthError(f"auth {_label(label)}: a credential spec needs `key` (the credential name)")
        cred = await secrets.credential(str(name))
        if cred is None:
            raise AuthError(f"credential {str(name)!r} not found")
        data = dict(cred.data or {})
        # Some stores nest the payload as {"data": {...}}: the fields the action needs live inside.
        if isinstance(data.get("data"), dict) and len(data) == 1:
            data = dict(data["data"])
        service = service or cred.type
    elif source == "secret":
        if not name:
            raise AuthError(f"auth {_label(label)}: a secret spec needs `name`")
        value = await secrets.secret(str(name))
        if value is None:
            raise AuthError(f"secret {str(name)!r} not found (set NOETL_SECRET_{str(name).upper()} "
                            f"or store a credential named {str(name)!r})")
        data = dict(value) if isinstance(value, dict) else {"value": value}
    elif source == "env":
        if not name:
            raise AuthError(f"auth {_label(label)}: an env spec needs `name`")
        value = secrets.env_value(str(name))
        if value is None:
            bare = str(name).upper().removeprefix("NOETL_SECRET_")
            if bare == "KEY":
                raise AuthError(f"auth {_label(label)}: NOETL_SECRET_KEY is the engine's master key; it is never "
                                f"given to steps")
            raise AuthError(f"auth {_label(label)}: `source: env` reads only NOETL_SECRET_* variables (never "
                            f"the engine's own, such as its master key): set NOETL_SECRET_{bare}")
        data = {"value": value}
    elif source == "inline":
        data = dict(spec.get("fields") or {k: v for k, v in spec.items() if k not in _SPEC_KEYS})
        secrets.remember_credential(data)
    else:
        raise AuthError(f"auth {_label(label)}: unknown source {source!r} (credential, secret, env, inline)")
    if source != "inline" and isinstance(spec.get("fields"), dict):
        data.update(spec["fields"])
    return ResolvedAuth(str(service or "generic").lower(), data, label,
                        str(spec["scope"]) if spec.get("scope") else None)


def _label(label: str | None) -> str:
    return repr(label) if label else "spec"


def first(data: dict[str, Any], *keys: str) -> Any:
    """The first of `keys` present with a non-empty value (credential field aliases)."""
    for key in keys:
        value = data.get(key)
        if value not in (None, ""):
            return value
    return None
