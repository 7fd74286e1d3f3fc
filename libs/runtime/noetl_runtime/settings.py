"""Runtime settings for the services (Kafka mode): read from NOETL_* environment variables.

Nothing is read at import time: call `load_settings()` in a service's factory and pass the result down.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from noetl_common.caps import (CEILING_MAX_ITERATOR_ITEMS, CEILING_MAX_VISITS, DEFAULT_MAX_ITERATOR_ITEMS,
                               DEFAULT_MAX_VISITS, Caps)
from noetl_common.dsl.validate import STEP_LIMITS
from noetl_common.messages import (DEFAULT_LEASE_RETRIES, DEFAULT_LEASE_RETRY_DELAY, MAX_LEASE_RETRIES,
                                   MAX_LEASE_RETRY_DELAY)
from noetl_common.topics import Topics

# The bound on executions in flight above which POST /api/executions/run answers 429 (NOETL_MAX_IN_FLIGHT;
# 0: no bound). Measured with bench/load_ramp.py on a 2-core machine: see docs/decisions.md.
DEFAULT_MAX_IN_FLIGHT = 64

# The largest request body any HTTP route takes (NOETL_MAX_BODY_BYTES): a playbook is kilobytes, a step's
# result posted by a worker may be megabytes; above this the answer is 413 (docs/security.md, Limits).
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
# Kafka's names (security.protocol, sasl.mechanism); aiokafka and faust take the same strings.
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class EngineLimits(BaseSettings):
    """The operator's caps on what one playbook may ask of the engine (docs/security.md, "Loops and
    iterators"): read by every runtime that loads playbooks or owns the fold, the same variables in every
    mode. `Settings` (the services, `noetl server --kafka`) includes them; the embedded modes read them alone,
    as they read HttpLimits. The core gets them as a `Caps` (`engine_caps`)."""
    model_config = SettingsConfigDict(env_prefix="NOETL_", extra="ignore", frozen=True)

    # NOETL_MAX_VISITS: the highest max_visits a step may declare (and the default's ceiling).
    max_visits: int = Field(DEFAULT_MAX_VISITS, ge=1, le=CEILING_MAX_VISITS)
    # NOETL_MAX_ITERATOR_ITEMS: the most items one iterator may fan out to.
    max_iterator_items: int = Field(DEFAULT_MAX_ITERATOR_ITEMS, ge=1, le=CEILING_MAX_ITERATOR_ITEMS)


class Settings(EngineLimits):
    model_config = SettingsConfigDict(env_prefix="NOETL_", extra="ignore", frozen=True, populate_by_name=True)

    # The NOETL_ name wins; KAFKA_BOOTSTRAP_SERVERS is what scripts/kafka-start.sh, testcontainers and
    # most Kafka tooling export, so accepting it spares a second variable.
    kafka_bootstrap: str = Field(
        "127.0.0.1:9092",
        validation_alias=AliasChoices("NOETL_KAFKA_BOOTSTRAP", "KAFKA_BOOTSTRAP_SERVERS"),
    )
    topic_prefix: str = ""
    kafka_client_id: str = "noetl"
    # 6 s is the smallest a default Kafka broker accepts. Tansu delays group joins in proportion to it, so
    # its tests use 3 s; production clusters may want more (Kafka's client default is 45 s).
    kafka_session_timeout_ms: int = Field(6000, gt=0)
    # The longest a fetch waits on the server for data, for every consumer (broker, worker, query). Real
    # Kafka answers a waiting fetch as soon as data arrives, so there this only bounds idle polling (at
    # 10 ms an idle consumer sends ~100 empty fetches/s per node: the chart sets 100); Tansu answers only
    # when the wait is over, so there it is added to every hop (~250 ms per step at aiokafka's default
    # 500). See docs/kafka.md.
    kafka_fetch_max_wait_ms: int = Field(10, ge=1)
    # 0: aiokafka batches whatever queues up while a request is in flight anyway; a linger only adds its
    # own length to every round trip (measured: +3 ms p50 at 2 ms, and lower throughput on Tansu).
    kafka_linger_ms: int = Field(0, ge=0)
    # Off by default: Tansu (tests) rejects the InitProducerId that idempotence needs. Turn it on against
    # a real Kafka cluster; correctness never depends on it (architecture §2.6).
    kafka_enable_idempotence: bool = False
    # How the clients reach Kafka (kafka_io.security_options turns these into client options). PLAINTEXT is
    # the default because the development and test brokers (docker-compose, Tansu) speak nothing else.
    kafka_security_protocol: SecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: SaslMechanism = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    # The CA bundle (PEM) the brokers' certificates are checked against, for SSL and SASL_SSL; unset: the
    # system's CAs. The certificate is always verified, host name included (aiokafka's create_ssl_context).
    kafka_ssl_cafile: str | None = None
    database_url: str | None = Field(None, repr=False)   # may hold a password: keep it out of logs
    # The Postgres schema of the installation's tables (catalog, credentials, read models): one per
    # installation, as the topic prefix is one per installation on a shared Kafka.
    database_schema: str = Field("noetl", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
    # Partitions of the topics a service creates when they are missing (the broker's setting of the same
    # name): every execution-keyed topic must have the same count, whoever creates it first.
    topic_partitions: int = Field(6, ge=1)
    # Replication of the topics a service creates when they are missing, the broker's changelog included.
    # 1 suits one-node Kafka (Tansu, docker-compose); use 3 on a production cluster.
    topic_replication: int = Field(1, ge=1)
    # NOETL_QUERY_GROUP: a consumer group for the query service other than Topics.query_group()'s default
    # (the topic prefix still goes in front). A new name replays noetl.events from the start.
    query_group: str | None = None
    secret_key: SecretStr | None = None
    lease_seconds: float = Field(30.0, gt=0)
    # An attempt whose lease expired (its worker went silent) is sent again this many times, after
    # lease_retry_delay × 1, 2, 4, ... s, before the step's own `retry` policy counts it (docs/broker.md).
    lease_retries: int = Field(DEFAULT_LEASE_RETRIES, ge=0, le=MAX_LEASE_RETRIES)
    lease_retry_delay: float = Field(DEFAULT_LEASE_RETRY_DELAY, ge=0, le=MAX_LEASE_RETRY_DELAY, allow_inf_nan=False)
    max_in_flight: int = Field(DEFAULT_MAX_IN_FLIGHT, ge=0)
    worker_pool: str = "default"
    worker_concurrency: int = Field(64, gt=0)
    http_host: str = "127.0.0.1"
    http_port: int = Field(8082, gt=0, lt=65536)
    # NOETL_BROKER_URL: the brokers' web servers (e.g. their Service); the API and query roles ask them what a
    # running execution waits for (GET /api/executions/{id}/explain). Unset: that route answers 503 for one.
    broker_url: str | None = None
    # NOETL_BROKER_TOKEN: the bearer token of the brokers' web servers (/explain, /metrics; docs/security.md
    # "The broker's listener"). The brokers require it; the API and query roles send it to NOETL_BROKER_URL.
    broker_token: SecretStr | None = None
    log_level: LogLevel = "INFO"

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _kafka_security_is_consistent(self) -> Settings:
        # Caught here, at start-up, rather than as an authentication error at the first connection.
        if self.kafka_security_protocol.startswith("SASL_") and not (
                self.kafka_sasl_username and self.kafka_sasl_password):
            raise ValueError(f"NOETL_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                             "NOETL_KAFKA_SASL_USERNAME and NOETL_KAFKA_SASL_PASSWORD")
        if self.kafka_ssl_cafile and not self.kafka_security_protocol.endswith("SSL"):
            raise ValueError("NOETL_KAFKA_SSL_CAFILE is set but NOETL_KAFKA_SECURITY_PROTOCOL "
                             f"({self.kafka_security_protocol}) does not use TLS")
        return self

    @property
    def topics(self) -> Topics:
        return Topics(prefix=self.topic_prefix)


class HttpLimits(BaseSettings):
    """The limits every HTTP app applies, read on their own: the embedded server builds its apps without
    the Kafka settings."""
    model_config = SettingsConfigDict(env_prefix="NOETL_", extra="ignore", frozen=True)

    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, gt=0)


def load_http_limits(**overrides: Any) -> HttpLimits:
    return HttpLimits(**overrides)


def load_engine_limits(**overrides: Any) -> EngineLimits:
    """NOETL_MAX_VISITS and NOETL_MAX_ITERATOR_ITEMS from the environment (a ValidationError when they are not
    whole numbers within their bounds: `describe_invalid` words it for a start-up message)."""
    return EngineLimits(**overrides)


def engine_caps(limits: EngineLimits, steps: StepSettings | None = None) -> Caps:
    """The core's view of the settings. `steps`: the maximums of python steps' `limits:`, where playbooks are
    loaded for a user (registration, `noetl run`, `noetl validate`); None for the fold, which runs no step."""
    maximums = None if steps is None else {name: getattr(steps, f"max_{name}") for name in STEP_LIMITS}
    return Caps.of(limits.max_visits, limits.max_iterator_items, maximums)


def describe_invalid(exc: ValidationError, prefix: str | None = None) -> str:
    """A settings error in one line, naming the environment variables (`NOETL_MAX_VISITS: Input should be a
    valid integer ...`) rather than pydantic's field names and a traceback. `prefix`: the variables' prefix
    (default: StepSettings' for its errors, NOETL_ for the others)."""
    prefix = prefix or (STEP_PREFIX if exc.title == "StepSettings" else "NOETL_")
    parts = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        name = field.upper() if field.upper().startswith(("NOETL_", "KAFKA_")) else f"{prefix}{field.upper()}"
        given = error.get("input")
        shown = f" (got {given!r:.80})" if isinstance(given, (str, int, float)) else ""
        parts.append(f"{name}: {error['msg']}{shown}" if field else f"{error['msg']}")
    return "invalid settings: " + "; ".join(parts)


STEP_PREFIX = "NOETL_STEP_"   # StepSettings' variables


def _names(raw: str) -> tuple[str, ...]:
    """A comma- or whitespace-separated list from one environment variable."""
    return tuple(part for part in raw.replace(",", " ").split() if part)


class StepSettings(BaseSettings):
    """How step code is isolated (docs/security.md, "How step code is isolated"): NOETL_STEP_* variables.

    Read by the worker in both modes (`load_step_settings()`), apart from `Settings` so an embedded engine
    never needs the Kafka settings to be valid. Each limit has a default and a maximum: a step's own
    `limits:` may ask for any value up to the maximum, and the maximum is what hostile code is held to.
    """
    model_config = SettingsConfigDict(env_prefix="NOETL_STEP_", extra="ignore", frozen=True)

    # When the engine runs as root, python steps run as this user (it must exist and must not be root;
    # the image creates `noetl-step`). `nobody` exists on every Linux but is shared with other services.
    user: str = Field("nobody", min_length=1)
    # Where each attempt's working directory is made (a private folder per pool inside it); unset: the
    # system's temporary directory.
    work_dir: str | None = None
    # Environment variables python steps see besides PATH, LANG, LC_*, TZ and a few PYTHON*/SSL ones:
    # names separated by commas or spaces. NOETL_* variables are never passed, even when named here.
    env_allow: str = ""
    # Modules each python process imports once at start, so steps that use them do not pay the import.
    preload: str = ""
    # Resource limits of one python step, and the largest a step may ask for.
    memory_mb: int = Field(1024, ge=16)
    max_memory_mb: int = Field(16384, ge=16)
    cpu_seconds: int = Field(600, ge=1)
    max_cpu_seconds: int = Field(86400, ge=1)
    processes: int = Field(64, ge=1)
    max_processes: int = Field(1024, ge=1)
    open_files: int = Field(1024, ge=16)
    max_open_files: int = Field(65536, ge=16)
    file_size_mb: int = Field(1024, ge=1)
    max_file_size_mb: int = Field(65536, ge=1)
    # Captured output of an attempt (python stdout/stderr, tracebacks, notes) kept in its ActionCompleted/
    # ActionFailed `log`: at most this many bytes, its start and its end. It travels in the attempt's fact and
    # event (docs/query.md "Step output"): JSON-escaping can make it up to 6x larger (control characters),
    # and the default keeps that under Kafka's 1 MB message limit.
    log_max_bytes: int = Field(64 * 1024, ge=1024)
    # Directories (and URL prefixes such as s3://bucket/) DuckDB steps may read and write, and the DuckDB
    # extensions they may INSTALL/LOAD; everything else outside the process is refused.
    duckdb_directories: str = ""
    duckdb_extensions: str = ""

    @model_validator(mode="after")
    def _defaults_within_maximums(self) -> StepSettings:
        for name in ("memory_mb", "cpu_seconds", "processes", "open_files", "file_size_mb"):
            if getattr(self, name) > getattr(self, f"max_{name}"):
                raise ValueError(f"NOETL_STEP_{name.upper()} ({getattr(self, name)}) is above "
                                 f"NOETL_STEP_MAX_{name.upper()} ({getattr(self, f'max_{name}')})")
        bad = [n for n in _names(self.env_allow) if n.upper().startswith("NOETL_")]
        if bad:
            raise ValueError(f"NOETL_STEP_ENV_ALLOW cannot pass engine variables to steps: {', '.join(bad)}")
        return self

    @property
    def env_allow_names(self) -> tuple[str, ...]:
        return _names(self.env_allow)

    @property
    def preload_modules(self) -> tuple[str, ...]:
        return _names(self.preload)

    @property
    def duckdb_directory_list(self) -> tuple[str, ...]:
        return _names(self.duckdb_directories)

    @property
    def duckdb_extension_names(self) -> tuple[str, ...]:
        return tuple(n.lower() for n in _names(self.duckdb_extensions))


def load_step_settings(**overrides: Any) -> StepSettings:
    """Step isolation settings from the environment; keyword overrides (field names) win over it."""
    return StepSettings(**overrides)


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment; keyword overrides (field names) win over it."""
    return Settings(**overrides)


def configured_caps(with_step_maximums: bool = True) -> Caps:
    """The caps from the environment (NOETL_MAX_VISITS, NOETL_MAX_ITERATOR_ITEMS, and NOETL_STEP_MAX_* unless
    `with_step_maximums` is false), for the embedded modes and `noetl validate`. A ValueError with one line
    naming the variable when one is not a whole number within its bounds."""
    try:
        limits = load_engine_limits()
    except ValidationError as exc:
        raise ValueError(describe_invalid(exc)) from None
    try:
        steps = load_step_settings() if with_step_maximums else None
    except ValidationError as exc:
        raise ValueError(describe_invalid(exc, STEP_PREFIX)) from None
    return engine_caps(limits, steps)
