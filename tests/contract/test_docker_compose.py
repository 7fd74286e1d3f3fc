"""docker-compose.yml, checked without a Docker engine: the images, the structure compose needs, and that
every NOETL_* variable it sets is one the role reads (Settings / BrokerSettings), with the required ones set.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml
from cryptography.fernet import Fernet

from noetl_broker.settings import BrokerSettings
from noetl_runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
ROLES = {"ingest": "noetl_frontend", "broker": "noetl_broker", "worker": "noetl_worker", "query": "noetl_query",
         "render": "noetl_render"}
NEEDS_DATABASE = {"ingest", "worker", "query", "render"}
NEEDS_KEY = {"ingest", "worker"}           # the two that encrypt or decrypt credentials


def env_names(settings_class) -> set[str]:
    prefix = settings_class.model_config.get("env_prefix", "")
    names = {f"{prefix}{name}".upper() for name in settings_class.model_fields}
    for field in settings_class.model_fields.values():
        alias = field.validation_alias
        for choice in getattr(alias, "choices", [alias] if isinstance(alias, str) else []):
            if isinstance(choice, str):
                names.add(choice.upper())
    return names


def test_images_are_the_official_kraft_kafka_and_postgres_16():
    assert SERVICES["kafka"]["image"].startswith("apache/kafka:")
    assert SERVICES["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"   # KRaft, no ZooKeeper
    assert SERVICES["postgres"]["image"] == "postgres:16"
    for role in ROLES:
        assert SERVICES[role]["build"] == "." and (ROOT / "Dockerfile").exists()


@pytest.mark.parametrize("role", sorted(ROLES))
def test_each_role_runs_its_module_and_waits_for_its_dependencies(role):
    service = SERVICES[role]
    assert service["command"] == ["python", "-m", ROLES[role]]
    assert importlib.util.find_spec(ROLES[role]) is not None
    assert set(service["depends_on"]) == {"kafka", "postgres", "migrate"}
    assert "/ready" in " ".join(service["healthcheck"]["test"])
    assert set(service["depends_on"]) <= set(SERVICES)


@pytest.mark.parametrize("role", sorted(ROLES))
def test_every_variable_set_is_read_and_the_required_ones_are_set(role):
    env = SERVICES[role]["environment"]
    readable = env_names(BrokerSettings if role == "broker" else Settings)
    extras = {"NOETL_WORKER_POOL"} if role == "worker" else set()
    unknown = {name for name in env if name.startswith("NOETL_")} - readable - extras
    assert unknown == set(), f"{role} sets variables nothing reads: {sorted(unknown)}"
    assert "NOETL_KAFKA_BOOTSTRAP" in env and env["NOETL_HTTP_HOST"] == "0.0.0.0"
    if role in NEEDS_DATABASE:
        assert "NOETL_DATABASE_URL" in env
    assert ("NOETL_SECRET_KEY" in env) == (role in NEEDS_KEY)


def test_the_development_key_is_a_valid_fernet_key_and_can_be_overridden():
    value = SERVICES["ingest"]["environment"]["NOETL_SECRET_KEY"]
    match = re.fullmatch(r"\$\{NOETL_SECRET_KEY:-(.+)\}", value)
    assert match, "the key must come from the environment, with a development default"
    Fernet(match.group(1).encode())
    assert SERVICES["worker"]["environment"]["NOETL_SECRET_KEY"] == value   # same key for both


def test_the_api_is_published_and_the_migration_runs_first():
    assert "8080:8080" in SERVICES["ingest"]["ports"]
    assert SERVICES["migrate"]["command"] == ["python", "-m", "noetl_runtime.postgres_schema"]
    assert importlib.util.find_spec("noetl_runtime.postgres_schema") is not None
    for role in ROLES:
        assert SERVICES[role]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
