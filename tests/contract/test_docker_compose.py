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


REQUIRED_FROM_ENV = ("NOETL_SECRET_KEY", "NOETL_POSTGRES_PASSWORD", "NOETL_BROKER_TOKEN")
REQUIRED = re.compile(r"\$\{(?P<name>[A-Z_]+):\?(?P<message>[^}]+)\}")


def test_the_secrets_come_only_from_env_and_compose_refuses_to_start_without_them():
    """Issue 9: no committed key or password. `${NAME:?message}` makes compose refuse to start (unset or
    empty) with the message, which says where to set it; no `${NAME:-default}` gives one a fallback."""
    text = (ROOT / "docker-compose.yml").read_text()
    for name in REQUIRED_FROM_ENV:
        uses = [m for m in REQUIRED.finditer(text) if m.group("name") == name]
        assert uses, f"{name} is not required from the environment"
        for use in uses:
            assert f"set {name} in .env" in use.group("message"), use.group(0)
        assert not re.search(rf"\$\{{{name}:?-", text), f"{name} has a default"
    assert not re.search(r"[A-Za-z0-9_-]{43}=", text), "a Fernet key is committed in docker-compose.yml"
    key = SERVICES["ingest"]["environment"]["NOETL_SECRET_KEY"]
    assert REQUIRED.fullmatch(key) and SERVICES["worker"]["environment"]["NOETL_SECRET_KEY"] == key
    dsn = SERVICES["ingest"]["environment"]["NOETL_DATABASE_URL"]
    password = re.fullmatch(r"postgresql://noetl:(.+)@postgres:5432/noetl", dsn).group(1)
    assert REQUIRED.fullmatch(password).group("name") == "NOETL_POSTGRES_PASSWORD"
    assert SERVICES["postgres"]["environment"]["POSTGRES_PASSWORD"] == password
    # the brokers' /explain and /metrics take the broker token; the roles that ask them send it
    token = SERVICES["broker"]["environment"]["NOETL_BROKER_TOKEN"]
    assert REQUIRED.fullmatch(token) and all(SERVICES[r]["environment"].get("NOETL_BROKER_TOKEN") == token
                                             for r in ("ingest", "query"))


def test_the_env_file_is_never_committed_nor_copied_into_the_image():
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert ".env" in (ROOT / ".dockerignore").read_text().split()
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert set(example) == set(REQUIRED_FROM_ENV) and not any(example.values()), example
    Fernet(Fernet.generate_key())     # the command .env.example gives makes a key cryptography accepts


def test_only_the_api_is_published_and_only_on_loopback():
    """The host port may be chosen in .env (NOETL_API_PUBLISH_PORT, default 8080: the compose test picks a
    free one); the address is a literal 127.0.0.1 that no variable can widen."""
    published = {name: service["ports"] for name, service in SERVICES.items() if service.get("ports")}
    assert published == {"ingest": ["127.0.0.1:${NOETL_API_PUBLISH_PORT:-8080}:8080"]}, published


def test_the_migration_runs_first():
    assert SERVICES["migrate"]["command"] == ["python", "-m", "noetl_runtime.postgres_schema"]
    assert importlib.util.find_spec("noetl_runtime.postgres_schema") is not None
    for role in ROLES:
        assert SERVICES[role]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
