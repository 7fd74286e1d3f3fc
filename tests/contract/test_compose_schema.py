"""docker-compose.yml against the Compose Specification, without a Docker engine.

`compose-spec` wraps the Rust compose_spec parser, which rejects what `docker compose config` rejects on
schema grounds: unknown keys (anything not `x-`), bad enum values, malformed ports and durations. YAML
merge keys (`<<:`) are resolved first, as compose does, by parsing with PyYAML.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

compose_spec = pytest.importorskip("compose_spec")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


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
