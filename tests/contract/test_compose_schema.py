"""docker-compose.yml against the Compose Specification, without a Docker engine.

`compose-spec` wraps the Rust compose_spec parser, which rejects what `docker compose config` rejects on
schema grounds: unknown keys (anything not `x-`), bad enum values, malformed ports and durations. YAML
merge keys (`<<:`) are resolved first, as compose does, by parsing with PyYAML; so are the `${VAR...}`
references, as compose interpolates them before it validates (the .env secrets set, nothing else).
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

compose_spec = pytest.importorskip("compose_spec")

ROOT = Path(__file__).resolve().parents[2]
DOT_ENV = {"NOETL_SECRET_KEY": "a-fernet-key", "NOETL_POSTGRES_PASSWORD": "a-password", "NOETL_BROKER_TOKEN": "a-token"}
REFERENCE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's `${NAME}`, `${NAME:-default}`, `${NAME-default}`, `${NAME:?error}`, `${NAME?error}`."""
    def value(match: re.Match[str]) -> str:
        name, op, arg = match.group("name", "op", "arg")
        present = name in env and (env[name] != "" or not (op or "").startswith(":"))
        if present:
            return env[name]
        if op and op.endswith("?"):
            raise ValueError(f"compose would refuse: {arg}")
        return arg if op else ""
    return REFERENCE.sub(value, text)


COMPOSE = yaml.safe_load(interpolate((ROOT / "docker-compose.yml").read_text(), DOT_ENV))


def parse(document: dict[str, Any]) -> Any:
    return compose_spec.PyCompose.from_json(json.dumps(document))


def test_docker_compose_follows_the_compose_specification() -> None:
    parsed = parse(COMPOSE)
    assert set(parsed.service_names()) == set(COMPOSE["services"])


@pytest.mark.parametrize("key, value, reason", [
    ("imagee", "x", "does not start with \"x-\""),
    ("restart", "sometimes", "unknown variant `sometimes`"),
    ("ports", ["not-a-port"], "port"),
    ("healthcheck", {"test": ["CMD", "true"], "interval": "ten"}, "duration"),
    ("depends_on", {"postgres": {"condition": "service_happy"}}, "unknown variant `service_happy`"),
])
def test_the_schema_check_catches_what_compose_would_refuse(key: str, value: Any, reason: str) -> None:
    broken = copy.deepcopy(COMPOSE)
    broken["services"]["ingest"][key] = value
    with pytest.raises(ValueError, match=reason.replace("`", ".").replace("\"", ".")):
        parse(broken)


def test_interpolation_is_compose_s() -> None:
    assert interpolate("127.0.0.1:${P:-8080}:8080", {}) == "127.0.0.1:8080:8080"
    assert interpolate("127.0.0.1:${P:-8080}:8080", {"P": "18080"}) == "127.0.0.1:18080:8080"
    assert interpolate("${P:-8080}", {"P": ""}) == "8080" and interpolate("${P-8080}", {"P": ""}) == ""
    with pytest.raises(ValueError, match="set K in .env"):
        interpolate("${K:?set K in .env}", {"K": ""})
