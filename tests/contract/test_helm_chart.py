"""The Helm chart (deploy/helm/noetl) against what operators rely on and what the services really do.

Rendered by the real Helm engine (helm-python-sdk: Helm v4's Go SDK, offline), for the chart's defaults and
for deploy/helm/values-production.yaml; linted by Helm; every manifest validated against the Kubernetes
OpenAPI schemas (kubernetes-validate, strict: unknown fields fail) for the oldest Kubernetes the chart
supports and the newest the validator ships. Then the contract:

- every role has its Deployment (each worker pool its own, bound to noetl.commands.<pool>), Services, HPAs,
  PDBs, the ServiceAccount, the migration hook Job;
- probes hit /health and /ready on the container's HTTP port, which is the NOETL_HTTP_PORT the process
  reads, and the FastAPI roles really serve those paths;
- every environment variable the chart sets is one the role reads (a Settings field, or a variable its own
  code reads), and every one the role needs is set and parses;
- the Ingress (and the optional HTTPRoute) sends every API path to the service that serves it, the list of
  paths being the services' own routes;
- values that cannot work are refused at install time with a message naming the value.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic import AliasChoices

from noetl_runtime.auth import Authenticator
from noetl_runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
VALUE_SET_NAMES = ("default", "production")
# The chart's kubeVersion floor (Chart.yaml) and the newest schemas kubernetes-validate ships.
MIN_KUBE = "1.29.0"
KUBE_VERSIONS = (MIN_KUBE, kubernetes_validate.latest_version())
# Custom resources have no schema in kubernetes-validate: they get the structural tests below instead.
CUSTOM_KINDS = {"ServiceMonitor": "monitoring.coreos.com/v1", "HTTPRoute": "gateway.networking.k8s.io/v1"}
HTTP_ROLES = ("ingest", "query", "render")     # the roles behind the Ingress
# The ingest role is the API's entry point: the frontend, which serves every service's routes (one URL).
MODULES = {"ingest": "noetl_frontend", "query": "noetl_query", "render": "noetl_render",
           "broker": "noetl_broker", "worker": "noetl_worker", "migrate": "noetl_runtime.postgres_schema"}

# Variables the chart sets that are not Settings fields: each must be read, by name, by the code of the
# role it is set for (checked by searching that role's package for the literal name). The migration Job
# has no Settings: every variable it gets must be read by noetl_runtime.postgres_schema itself.
EXTRAS = {
    "NOETL_WORKER_SHUTDOWN_GRACE": "seconds in-flight commands get on SIGTERM (WorkerOptions.from_env)",
    "NOETL_WORKER_PYTHON_PROCESSES": "python step processes per worker (noetl_worker.__main__)",
}
# How the roles connect to Kafka (externalKafka.securityProtocol, .tls, .auth): Settings fields, documented.
KAFKA_SECURITY = {"NOETL_KAFKA_SECURITY_PROTOCOL", "NOETL_KAFKA_SASL_MECHANISM", "NOETL_KAFKA_SASL_USERNAME",
                  "NOETL_KAFKA_SASL_PASSWORD", "NOETL_KAFKA_SSL_CAFILE"}
HTTP = {"NOETL_HTTP_HOST", "NOETL_HTTP_PORT"}
DB = {"NOETL_DATABASE_URL", "NOETL_DATABASE_SCHEMA"}
REQUIRED = {
    "ingest": {"NOETL_KAFKA_BOOTSTRAP", "NOETL_TOPIC_PARTITIONS", "NOETL_SECRET_KEY"} | DB | HTTP,
    "query": {"NOETL_KAFKA_BOOTSTRAP"} | DB | HTTP,
    "render": DB | HTTP,                       # reads the projected event log: no Kafka
    "broker": {"NOETL_KAFKA_BOOTSTRAP", "NOETL_TOPIC_PARTITIONS", "NOETL_BROKER_POOLS"} | HTTP,
    "worker": {"NOETL_KAFKA_BOOTSTRAP", "NOETL_TOPIC_PARTITIONS", "NOETL_WORKER_POOL", "NOETL_SECRET_KEY"} | DB | HTTP,
    "migrate": DB,
}
# Least privilege: who must never get the database or the credentials key.
FORBIDDEN = {
    "broker": {"NOETL_DATABASE_URL", "NOETL_SECRET_KEY"},
    "query": {"NOETL_SECRET_KEY"},
    "render": {"NOETL_SECRET_KEY"},
    "migrate": {"NOETL_SECRET_KEY"},
}

# The API: (method, path template, the service whose router defines it: the role the Ingress sends it to).
# test_route_list_is_the_services_routes holds this list to the routers of noetl_ingest, noetl_query and
# noetl_render, and to the apps the roles serve.
API_ROUTES = [
    ("POST", "/api/catalog/register", "ingest"),
    ("POST", "/api/executions/run", "ingest"),
    ("POST", "/api/execute", "ingest"),
    ("POST", "/api/executions/{execution_id}/cancel", "ingest"),
    ("POST", "/api/events", "ingest"),
    ("POST", "/api/credentials", "ingest"),
    ("GET", "/api/credentials", "ingest"),
    ("GET", "/api/credentials/{name}", "ingest"),
    ("DELETE", "/api/credentials/{name}", "ingest"),
    ("GET", "/api/executions", "query"),
    ("GET", "/api/executions/{execution_id}", "query"),
    ("GET", "/api/executions/{execution_id}/events", "query"),
    ("GET", "/api/executions/{execution_id}/explain", "query"),
    ("GET", "/api/executions/{execution_id}/logs", "query"),
    ("GET", "/api/execution/data/{execution_id}", "query"),
    ("GET", "/api/events/summary/{execution_id}", "query"),
    ("GET", "/api/events/by-execution/{execution_id}", "query"),
    ("GET", "/api/catalog/list", "query"),
    ("GET", "/api/catalog/playbook", "query"),
    ("POST", "/api/context/render", "render"),
]
SAMPLES = {"execution_id": "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", "name": "pg_main"}
FERNET = "x" * 43 + "="


def concrete(template: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: SAMPLES[m.group(1)], template)


def settings_env_names(cls: type) -> set[str]:
    """The environment variable names a pydantic-settings class reads."""
    prefix = cls.model_config.get("env_prefix", "")
    names: set[str] = set()
    for field_name, info in cls.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {c for c in alias.choices if isinstance(c, str)}
        elif isinstance(alias, str):
            names.add(alias)
        else:
            names.add(f"{prefix}{field_name}".upper())
    return names


def settings_class(role: str) -> type:
    if role == "broker":
        from noetl_broker.settings import BrokerSettings
        return BrokerSettings
    return Settings


def role_of(key: str) -> str:
    return key.split(":", 1)[0]


def role_source(role: str) -> str:
    """The source text of the role's own code (its package, or the migration module)."""
    import importlib.util
    spec = importlib.util.find_spec(MODULES[role])
    assert spec is not None and spec.origin is not None, f"{MODULES[role]} is not importable"
    origin = Path(spec.origin)
    files = [origin] if role == "migrate" else sorted(origin.parent.rglob("*.py"))
    return "\n".join(f.read_text() for f in files)


def role_app(role: str) -> Any:
    """The FastAPI app the HTTP role's process serves (without ports: only its routes are looked at)."""
    import importlib
    if role == "ingest":
        from noetl_frontend.app import build_api
        return build_api(None, None, None, service="ingest", description="",   # type: ignore[arg-type]
                         auth=Authenticator(None))
    return importlib.import_module(f"{MODULES[role]}.app").create_app(None, auth=Authenticator(None))


def api_routes(app_or_router: Any) -> set[tuple[str, str]]:
    """(METHOD, path template) of every /api route of an app or a router."""
    from fastapi import FastAPI
    app = app_or_router
    if not isinstance(app, FastAPI):
        app = FastAPI()
        app.include_router(app_or_router)
    return {(method.upper(), path) for path, ops in app.openapi()["paths"].items() if path.startswith("/api/")
            for method in ops}


def message(exc: BaseException) -> str:
    return str(exc)


@pytest.fixture(params=VALUE_SET_NAMES)
def rendered(request: pytest.FixtureRequest, helm_chart: Any) -> Any:
    return helm_chart.named(request.param)


# ------------------------------------------------------------------------------------- Helm itself
def test_helm_engine_is_helm_v4(helm_chart: Any) -> None:
    assert helm_chart.helm.helm_sdk_version().startswith("v4."), helm_chart.helm.helm_sdk_version()


@pytest.mark.parametrize("name", VALUE_SET_NAMES)
def test_helm_lint_is_clean(helm_chart: Any, name: str) -> None:
    """`helm lint --strict --kube-version` finds nothing but the optional subcharts not being vendored
    (they are fetched by `helm dependency build`, which needs the network)."""
    not_vendored = "chart directory is missing these dependencies: kafka,postgresql"
    for kube in KUBE_VERSIONS:
        report = helm_chart.lint(helm_chart.values_of(name), strict=True, kube_version=f"v{kube}")
        problems = [m for m in report["messages"] if m["severity"] >= 2 and m["error"] != not_vendored]
        assert not problems, f"helm lint ({name}, {kube}): {problems}"
        assert set(report["errors"]) <= {not_vendored}, report["errors"]


def test_kube_version_floor_is_the_one_validated(helm_chart: Any) -> None:
    assert helm_chart.metadata["kubeVersion"] == f">={MIN_KUBE}-0"


def test_optional_subcharts_are_declared_disabled_and_not_vendored(helm_chart: Any) -> None:
    deps = {d["name"]: d for d in helm_chart.metadata["dependencies"]}
    assert set(deps) == {"kafka", "postgresql"}
    assert deps["kafka"]["condition"] == "kafka.enabled"
    assert deps["postgresql"]["condition"] == "postgresql.enabled"
    values = helm_chart.default_values
    assert values["kafka"]["enabled"] is False and values["postgresql"]["enabled"] is False
    statuses = {d["name"]: d["status"] for d in helm_chart.helm.dependency_list(str(helm_chart.dir))}
    assert statuses == {"kafka": "missing", "postgresql": "missing"}, statuses
    assert not (helm_chart.dir / "charts").exists()


# ------------------------------------------------------------------------ Kubernetes schema validation
@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_every_manifest_is_valid_kubernetes(rendered: Any, kube: str) -> None:
    failures = []
    custom = 0
    for doc in rendered.manifests():
        if doc["kind"] in CUSTOM_KINDS:
            assert doc["apiVersion"] == CUSTOM_KINDS[doc["kind"]]
            custom += 1
            continue
        try:
            kubernetes_validate.validate(doc, kube, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    assert not failures, "\n".join(failures)
    assert len(rendered.docs) - custom >= 15


def test_names_are_dns_labels(rendered: Any) -> None:
    for doc in rendered.docs:
        name = doc["metadata"]["name"]
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name


# ----------------------------------------------------------------------------------------- the roles
def test_each_role_has_its_deployment(rendered: Any, helm_chart: Any) -> None:
    workloads = rendered.workloads()
    values = helm_chart.values_of(rendered_name(rendered)) or {}
    pools = [p["name"] for p in values.get("workers", helm_chart.default_values["workers"])]
    assert set(workloads) == {"ingest", "query", "render", "broker", "migrate"} | {f"worker:{p}" for p in pools}
    for key, workload in workloads.items():
        container = workload["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["python", "-m", MODULES[role_of(key)]], key
    for pool in pools:
        env, _ = rendered.container_env(workloads[f"worker:{pool}"])
        assert env["NOETL_WORKER_POOL"].value == pool     # -> consumer of noetl.commands.<pool>
    broker_env, _ = rendered.container_env(workloads["broker"])
    assert broker_env["NOETL_BROKER_POOLS"].value.split(",") == pools   # the broker creates their topics


def rendered_name(rendered: Any) -> str:
    return "default" if rendered.values is None else "production"


def test_one_image_for_every_role(rendered: Any) -> None:
    images = {c["image"] for w in rendered.workloads().values() for c in w["spec"]["template"]["spec"]["containers"]}
    assert len(images) == 1, images


def test_services_select_exactly_their_role(rendered: Any) -> None:
    workloads = rendered.of_kind("Deployment")
    services = rendered.of_kind("Service")
    assert {s["metadata"]["name"] for s in services} == {d["metadata"]["name"] for d in workloads}
    for svc in services:
        selector = svc["spec"]["selector"]
        matched = [d for d in workloads
                   if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert [d["metadata"]["name"] for d in matched] == [svc["metadata"]["name"]], svc["metadata"]["name"]
        (port,) = svc["spec"]["ports"]
        assert port["targetPort"] == "http"
        container = matched[0]["spec"]["template"]["spec"]["containers"][0]
        assert any(p["name"] == "http" for p in container["ports"])


def test_deployment_selectors_do_not_overlap(rendered: Any) -> None:
    deployments = rendered.of_kind("Deployment")
    for d in deployments:
        selector = d["spec"]["selector"]["matchLabels"]
        assert selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        owners = [o["metadata"]["name"] for o in deployments
                  if selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()]
        assert owners == [d["metadata"]["name"]]


def test_hpas_and_pdbs_target_real_deployments(rendered: Any) -> None:
    deployments = {d["metadata"]["name"]: d for d in rendered.of_kind("Deployment")}
    for hpa in rendered.of_kind("HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment" and target["name"] in deployments
        labels = deployments[target["name"]]["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] in ("ingest", "worker")
        assert "replicas" not in deployments[target["name"]]["spec"], "the HPA owns the replica count"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    for pdb in rendered.of_kind("PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        matched = [n for n, d in deployments.items() if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert matched == [pdb["metadata"]["name"]]
    assert {p["metadata"]["name"] for p in rendered.of_kind("PodDisruptionBudget")} == set(deployments)


def test_production_scales_ingest_and_workers(helm_chart: Any) -> None:
    rendered = helm_chart.named("production")
    scaled = {h["spec"]["scaleTargetRef"]["name"] for h in rendered.of_kind("HorizontalPodAutoscaler")}
    assert scaled == {"noetl-ingest", "noetl-worker-default", "noetl-worker-io"}
    batch = rendered.get("Deployment", "noetl-worker-batch")
    assert batch["spec"]["replicas"] == 0      # a pool's `replicas: 0` is not replaced by the default
    io_env, opaque = rendered.container_env(rendered.get("Deployment", "noetl-worker-io"))
    assert io_env["NOETL_WORKER_CONCURRENCY"].value == "256"
    assert opaque == ["secret:noetl-playbook-secrets"]
    hpa = rendered.get("HorizontalPodAutoscaler", "noetl-worker-default")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (4, 12)   # pool keys over defaults


def test_service_account_is_used_and_mounts_no_token(rendered: Any) -> None:
    (sa,) = rendered.of_kind("ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    for key, workload in rendered.workloads().items():
        pod = workload["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, key
        if key != "migrate":   # the hook runs before the release's ServiceAccount exists
            assert pod["serviceAccountName"] == sa["metadata"]["name"], key


# ---------------------------------------------------------------------------------- probes and ports
def test_probes_hit_health_and_ready_on_the_http_port(rendered: Any) -> None:
    for key, workload in rendered.workloads().items():
        if key == "migrate":
            continue
        container = workload["spec"]["template"]["spec"]["containers"][0]
        env, _ = rendered.container_env(workload)
        (port,) = [p for p in container["ports"] if p["name"] == "http"]
        assert str(port["containerPort"]) == env["NOETL_HTTP_PORT"].value, key
        assert env["NOETL_HTTP_HOST"].value == "0.0.0.0", key    # reachable from the kubelet and Services
        expected = {"livenessProbe": "/health", "readinessProbe": "/ready", "startupProbe": "/health"}
        for probe, path in expected.items():
            get = container[probe]["httpGet"]
            assert get["path"] == path, (key, probe)
            assert get["port"] in ("http", port["containerPort"]), (key, probe)


@pytest.mark.parametrize("role", HTTP_ROLES)
def test_http_roles_serve_the_probe_and_metrics_paths(role: str) -> None:
    """The FastAPI apps really have /health, /ready and /metrics (the broker and the workers are checked
    by tests/contract/test_helm_env_starts_services.py, which GETs them from the running processes)."""
    paths = role_app(role).openapi()["paths"]
    for path in ("/health", "/ready", "/metrics"):
        assert "get" in paths.get(path, {}), f"{role} does not serve GET {path}"


# --------------------------------------------------------------------------- environment contract
def _check_env(rendered: Any) -> None:
    problems: list[str] = []
    for key, workload in rendered.workloads().items():
        role = role_of(key)
        env, _ = rendered.container_env(workload)
        known = settings_env_names(settings_class(role)) if role != "migrate" else set()
        source = None
        for name in env:
            if name in known:
                continue
            if name in EXTRAS or role == "migrate":
                source = source if source is not None else role_source(role)
                if f'"{name}"' in source or f"'{name}'" in source:
                    continue
                problems.append(f"{key}: sets {name}, which {MODULES[role]} never reads")
                continue
            problems.append(f"{key}: sets {name}, which is neither a {settings_class(role).__name__} field "
                            f"nor a documented extra its code reads")
        missing = REQUIRED[role] - set(env)
        if missing:
            problems.append(f"{key}: required {sorted(missing)} not set")
        leaked = FORBIDDEN.get(role, set()) & set(env)
        if leaked:
            problems.append(f"{key}: gets {sorted(leaked)} it has no use for")
    assert not problems, "\n".join(problems)


def test_every_variable_the_chart_sets_is_read_and_required_ones_are_set(rendered: Any) -> None:
    _check_env(rendered)


def test_env_values_parse_with_the_roles_settings(rendered: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Load each role's Settings from exactly the chart's environment: the values parse and mean what the
    manifests say (port, pool, partitions, bootstrap)."""
    import os
    from noetl_worker.service import WorkerOptions

    values = rendered.values or {}
    partitions = (values.get("topics") or {}).get("partitions", 6)
    for key, workload in rendered.workloads().items():
        role = role_of(key)
        if role == "migrate":
            continue
        env, _ = rendered.container_env(workload)
        for name in list(os.environ):
            if name.startswith("NOETL_") or name == "KAFKA_BOOTSTRAP_SERVERS":
                monkeypatch.delenv(name)
        placeholders = {"NOETL_DATABASE_URL": "postgresql://u@db:5432/noetl", "NOETL_SECRET_KEY": FERNET,
                        "NOETL_BROKER_TOKEN": "b" * 43}
        for var in env.values():
            monkeypatch.setenv(var.name, var.value if var.value is not None else placeholders[var.name])
        settings = settings_class(role)()
        container = workload["spec"]["template"]["spec"]["containers"][0]
        assert settings.http_port == container["ports"][0]["containerPort"]
        assert settings.http_host == "0.0.0.0"
        assert settings.kafka_bootstrap == env["NOETL_KAFKA_BOOTSTRAP"].value
        if role == "worker":
            assert settings.worker_pool == key.split(":", 1)[1]
            options = WorkerOptions.from_env()
            grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
            assert grace > options.shutdown_grace, "the kubelet must wait longer than the worker drains"
        if role in ("ingest", "query"):   # /explain asks the brokers' Service
            broker_service = next(w for k, w in rendered.workloads().items() if role_of(k) == "broker")
            assert settings.broker_url is not None
            assert settings.broker_url.startswith(f"http://{broker_service['metadata']['name']}:")
        if role in ("ingest", "query", "broker"):   # the broker's /explain and /metrics take its token
            assert settings.broker_token is not None and len(settings.broker_token.get_secret_value()) >= 32
        else:
            assert "NOETL_BROKER_TOKEN" not in env
        if role == "broker":
            assert settings.topic_partitions == partitions
            assert workload["spec"]["replicas"] <= settings.topic_partitions


def test_roles_share_one_database_one_key_one_schema(rendered: Any) -> None:
    seen: dict[str, set[str]] = {}
    for workload in rendered.workloads().values():
        env, _ = rendered.container_env(workload)
        for name in ("NOETL_DATABASE_URL", "NOETL_SECRET_KEY", "NOETL_DATABASE_SCHEMA", "NOETL_KAFKA_BOOTSTRAP",
                     "NOETL_TOPIC_PREFIX"):
            if name in env:
                seen.setdefault(name, set()).add(env[name].value or env[name].source.split("/")[-1])
    assert all(len(v) == 1 for v in seen.values()), seen


def test_secrets_only_come_from_secrets(helm_chart: Any) -> None:
    rendered = helm_chart.render({"externalDatabase": {"password": "s3cret-pw"},
                                  "externalKafka": {"securityProtocol": "SASL_SSL",
                                                    "auth": {"username": "u", "password": "kafka-pw"}}})
    for doc in rendered.docs:
        if doc["kind"] == "Secret":
            continue
        text = yaml.safe_dump(doc)
        assert "s3cret-pw" not in text and "kafka-pw" not in text, f"{doc['kind']}/{doc['metadata']['name']}"
    for workload in rendered.workloads().values():
        env, _ = rendered.container_env(workload)
        for name in ("NOETL_DATABASE_URL", "NOETL_SECRET_KEY", "NOETL_KAFKA_SASL_PASSWORD"):
            if name in env:
                assert env[name].source.startswith("secret:"), (workload["metadata"]["name"], name)


def test_the_extras_are_documented() -> None:
    doc = (ROOT / "docs" / "kubernetes.md").read_text()
    for name in [*EXTRAS, *sorted(KAFKA_SECURITY)]:
        assert name in doc, f"docs/kubernetes.md does not mention {name}"


def _settings_from(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch, **secrets: str) -> Settings:
    """Settings loaded from exactly a container's environment; `secrets` stand in for Secret references."""
    import os
    for name in list(os.environ):
        if name.startswith("NOETL_") or name == "KAFKA_BOOTSTRAP_SERVERS":
            monkeypatch.delenv(name)
    placeholders = {"NOETL_DATABASE_URL": "postgresql://u@db:5432/noetl", "NOETL_SECRET_KEY": FERNET, **secrets}
    for var in env.values():
        monkeypatch.setenv(var.name, var.value if var.value is not None else placeholders[var.name])
    return Settings()


def test_kafka_security_reaches_every_kafka_role(helm_chart: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """SASL_SSL with a CA Secret: the protocol and mechanism in the ConfigMap, the credentials from the
    Secret, the CA mounted read-only where NOETL_KAFKA_SSL_CAFILE points; each role's Settings parse it."""
    rendered = helm_chart.render({"externalKafka": {
        "securityProtocol": "SASL_SSL", "tls": {"caSecret": "kafka-ca", "caKey": "ca.pem"},
        "auth": {"saslMechanism": "SCRAM-SHA-256", "username": "noetl", "password": "pw"}}})
    _check_env(rendered)
    for doc in rendered.manifests():     # the CA volume and mount are valid Kubernetes
        if doc["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(doc, MIN_KUBE, strict=True)
    data = rendered.chart_secret_data("noetl-secrets")
    assert (data["NOETL_KAFKA_SASL_USERNAME"], data["NOETL_KAFKA_SASL_PASSWORD"]) == ("noetl", "pw")
    for key, workload in rendered.workloads().items():
        if not REQUIRED[role_of(key)] & {"NOETL_KAFKA_BOOTSTRAP"}:
            continue
        env, _ = rendered.container_env(workload)
        assert env["NOETL_KAFKA_SASL_PASSWORD"].source == "secret:noetl-secrets/NOETL_KAFKA_SASL_PASSWORD", key
        settings = _settings_from(env, monkeypatch, NOETL_KAFKA_SASL_USERNAME="noetl",
                                  NOETL_KAFKA_SASL_PASSWORD="pw")
        assert settings.kafka_security_protocol == "SASL_SSL" and settings.kafka_sasl_mechanism == "SCRAM-SHA-256"
        assert settings.kafka_ssl_cafile == "/etc/noetl/kafka-ca/ca.pem", key
        pod = workload["spec"]["template"]["spec"]
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "kafka-ca")
        assert mount["readOnly"] is True and settings.kafka_ssl_cafile.startswith(mount["mountPath"] + "/"), key
        volume = next(v for v in pod["volumes"] if v["name"] == "kafka-ca")
        assert volume["secret"]["secretName"] == "kafka-ca"
        assert volume["secret"]["items"] == [{"key": "ca.pem", "path": "ca.pem"}], key


def test_kafka_is_plaintext_without_credentials_by_default(rendered: Any) -> None:
    for key, workload in rendered.workloads().items():
        env, _ = rendered.container_env(workload)
        if key == "migrate":
            continue
        assert env["NOETL_KAFKA_SECURITY_PROTOCOL"].value == "PLAINTEXT", key
        assert not (KAFKA_SECURITY - {"NOETL_KAFKA_SECURITY_PROTOCOL"}) & set(env), key
        assert all(v["name"] != "kafka-ca" for v in workload["spec"]["template"]["spec"]["volumes"]), key


# ------------------------------------------------------------------------------------- secrets
def test_the_chart_secret_holds_a_fernet_key_and_the_dsn(helm_chart: Any) -> None:
    from cryptography.fernet import Fernet

    rendered = helm_chart.named("default")
    data = rendered.chart_secret_data("noetl-secrets")
    Fernet(data["NOETL_SECRET_KEY"].encode())        # a generated key that cryptography accepts
    assert data["NOETL_DATABASE_URL"] == "postgresql://noetl@postgresql:5432/noetl"
    secret = rendered.get("Secret", "noetl-secrets")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"

    key = Fernet.generate_key().decode()
    given = helm_chart.render({"secrets": {"secretKey": key},
                               "externalDatabase": {"password": "p@ss/word", "sslmode": "require"}})
    data = given.chart_secret_data("noetl-secrets")
    assert data["NOETL_SECRET_KEY"] == key
    assert data["NOETL_DATABASE_URL"] == "postgresql://noetl:p%40ss%2Fword@postgresql:5432/noetl?sslmode=require"


def test_existing_secret_is_used_and_nothing_secret_is_rendered(helm_chart: Any) -> None:
    rendered = helm_chart.named("production")
    assert not rendered.of_kind("Secret")
    for key, workload in rendered.workloads().items():
        env, _ = rendered.container_env(workload)
        if "NOETL_DATABASE_URL" in env:
            assert env["NOETL_DATABASE_URL"].source == "secret:noetl-secrets/NOETL_DATABASE_URL", key


# ------------------------------------------------------------------------------ security context
def test_pods_are_locked_down(rendered: Any) -> None:
    for key, workload in rendered.workloads().items():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, key
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, key
        # Service links would inject <SERVICE>_PORT-style variables; a Service named noetl-http-... would
        # become NOETL_HTTP_PORT=tcp://... in every pod.
        assert pod["enableServiceLinks"] is False, key
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True, key
            assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False, key
            assert sc["capabilities"] == {"drop": ["ALL"]}, key
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, key
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in pod["volumes"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], key    # writable /tmp on a read-only root
            if "workingDir" in container:                         # faust writes its data dir there
                assert "emptyDir" in volumes[mounts[container["workingDir"]]], key
            assert container.get("resources", {}).get("requests"), f"{key}: no resource requests"


# ----------------------------------------------------------------------------------- migration hook
def test_migration_is_a_pre_install_and_pre_upgrade_hook(rendered: Any) -> None:
    job = rendered.workloads()["migrate"]
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    env, _ = rendered.container_env(job)
    secret_name = env["NOETL_DATABASE_URL"].source.split(":", 1)[1].split("/")[0]
    release_objects = {d["metadata"]["name"] for d in rendered.docs
                       if d["kind"] == "Secret" and "helm.sh/hook" not in d["metadata"].get("annotations", {})}
    # A pre-install hook runs before the release's objects exist: its Secret is a hook too, or the operator's.
    assert secret_name not in release_objects
    hook_secret = rendered.find("Secret", secret_name)
    if hook_secret is not None:
        assert hook_secret["metadata"]["annotations"]["helm.sh/hook"] == annotations["helm.sh/hook"]
        assert int(hook_secret["metadata"]["annotations"]["helm.sh/hook-weight"]) < \
            int(annotations["helm.sh/hook-weight"])
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_migration_waits_for_a_bundled_postgres(helm_chart: Any) -> None:
    rendered = helm_chart.render({"postgresql": {"enabled": True, "auth": {"password": "pw"}}})
    assert rendered.workloads()["migrate"]["metadata"]["annotations"]["helm.sh/hook"] == "post-install,pre-upgrade"
    data = rendered.chart_secret_data("noetl-secrets")
    assert data["NOETL_DATABASE_URL"] == "postgresql://noetl:pw@noetl-postgresql:5432/noetl"
    kafka = helm_chart.render({"kafka": {"enabled": True}})
    assert kafka.get("ConfigMap", "noetl-config")["data"]["NOETL_KAFKA_BOOTSTRAP"] == "noetl-kafka:9092"


# ----------------------------------------------------------------------------------------- routing
def _backend_role(name: str) -> str:
    return name.removeprefix("noetl-")


def resolve_ingress(ingress: dict[str, Any], path: str, *, nginx_exact_is_regex: bool = False) -> str | None:
    """The service an Ingress sends `path` to.

    With nginx.ingress.kubernetes.io/use-regex (ingress-nginx): every path is a case-insensitive regex
    anchored at the start, tried longest first, the first match wins (ingress-nginx's documented
    ordering); Exact paths are `location =` blocks, or, as some versions write them under use-regex,
    regexes like the others (`nginx_exact_is_regex`). Without it: the Ingress API's rules (Exact first,
    then the longest element-wise Prefix); an ImplementationSpecific path matches nothing here.
    """
    (rule,) = ingress["spec"]["rules"]
    paths = [(p["path"], p["pathType"], p["backend"]["service"]["name"]) for p in rule["http"]["paths"]]
    regex = ingress["metadata"].get("annotations", {}).get("nginx.ingress.kubernetes.io/use-regex") == "true"
    if regex:
        if not nginx_exact_is_regex:
            for p, kind, svc in paths:
                if kind == "Exact" and p == path:
                    return _backend_role(svc)
        for p, kind, svc in sorted(paths, key=lambda x: -len(x[0])):
            if kind == "Exact" and not nginx_exact_is_regex:
                continue
            if re.match(p, path, re.IGNORECASE):
                return _backend_role(svc)
        return None
    for p, kind, svc in paths:
        if kind == "Exact" and p == path:
            return _backend_role(svc)
    best: tuple[int, str] | None = None
    for p, kind, svc in paths:
        if kind != "Prefix":
            continue
        prefix = p.rstrip("/")
        if path == prefix or path.startswith(prefix + "/") or prefix == "":
            if best is None or len(prefix) > best[0]:
                best = (len(prefix), svc)
    return _backend_role(best[1]) if best else None


def resolve_httproute(route: dict[str, Any], method: str, path: str) -> str | None:
    """Gateway API HTTPRoute precedence: Exact path, then the longest PathPrefix, then a method match."""
    candidates = []
    for rule in route["spec"]["rules"]:
        for match in rule["matches"]:
            kind, value = match["path"]["type"], match["path"]["value"]
            if match.get("method") not in (None, method):
                continue
            prefix = value.rstrip("/")
            if kind == "Exact" and path != value:
                continue
            if kind == "PathPrefix" and not (path == prefix or path.startswith(prefix + "/") or prefix == ""):
                continue
            rank = (kind == "Exact", len(value), "method" in match)
            candidates.append((rank, rule["backendRefs"][0]["name"]))
    if not candidates:
        return None
    return _backend_role(max(candidates, key=lambda c: c[0])[1])


def test_route_list_is_the_services_routes() -> None:
    """API_ROUTES is exactly what the routers of noetl_ingest, noetl_query and noetl_render define under
    /api; each role serves the routes the Ingress sends it, and the ingest role (the frontend) serves them
    all, for the clients that use one URL."""
    from noetl_ingest.app import router as ingest_router
    from noetl_query.app import router as query_router
    from noetl_render.app import router as render_router

    defined = {(method, path, role) for role, router in (("ingest", ingest_router), ("query", query_router),
                                                         ("render", render_router))
               for method, path in api_routes(router(None))}   # type: ignore[arg-type]
    assert set(API_ROUTES) == defined, (
        f"missing from API_ROUTES: {sorted(defined - set(API_ROUTES))}; "
        f"not defined: {sorted(set(API_ROUTES) - defined)}")
    served = {role: api_routes(role_app(role)) for role in HTTP_ROLES}
    for method, path, role in API_ROUTES:
        assert (method, path) in served[role], f"{role} does not serve {method} {path}"
    assert served["ingest"] == {(method, path) for method, path, _ in API_ROUTES}


# An Ingress the chart accepts: a named host with TLS for it (the default renders none).
HOST = "noetl.example.com"
EXPOSED = {"enabled": True, "host": HOST, "tls": [{"secretName": "noetl-tls", "hosts": [HOST]}]}


def exposed(rendered: Any, helm_chart: Any) -> Any:
    """The value set with its Ingress on: production turns it on itself; the defaults get EXPOSED."""
    return rendered if rendered.values is not None else helm_chart.render({"ingress": EXPOSED})


@pytest.mark.parametrize("nginx_exact_is_regex", [False, True])
def test_ingress_routes_every_api_path_to_its_service(rendered: Any, helm_chart: Any,
                                                      nginx_exact_is_regex: bool) -> None:
    rendered = exposed(rendered, helm_chart)
    (ingress,) = rendered.of_kind("Ingress")
    wrong = []
    for method, template, role in API_ROUTES:
        got = resolve_ingress(ingress, concrete(template), nginx_exact_is_regex=nginx_exact_is_regex)
        if got != role:
            wrong.append(f"{method} {template} -> {got}, served by {role}")
    assert not wrong, "\n".join(wrong)
    services = {s["metadata"]["name"] for s in rendered.of_kind("Service")}
    for p in ingress["spec"]["rules"][0]["http"]["paths"]:
        assert p["backend"]["service"]["name"] in services
        assert p["backend"]["service"]["port"] == {"name": "http"}


def test_ingress_without_regex_routes_everything_but_cancel(helm_chart: Any) -> None:
    """On a controller without regex paths (ingress.regex: false, the regex path dropped), every path but
    POST /api/executions/{id}/cancel still routes: that one needs the regex or the HTTPRoute."""
    paths = [p for p in helm_chart.default_values["ingress"]["paths"] if p["pathType"] != "ImplementationSpecific"]
    rendered = helm_chart.render({"ingress": {**EXPOSED, "regex": False, "paths": paths}})
    (ingress,) = rendered.of_kind("Ingress")
    assert "nginx.ingress.kubernetes.io/use-regex" not in (ingress["metadata"].get("annotations") or {})
    for method, template, role in API_ROUTES:
        if template.endswith("/cancel"):
            continue
        assert resolve_ingress(ingress, concrete(template)) == role, (method, template)


def test_httproute_routes_every_api_path_by_method(helm_chart: Any) -> None:
    rendered = helm_chart.render({"ingress": {"enabled": False},
                                  "httpRoute": {"enabled": True, "parentRefs": [{"name": "gw"}],
                                                "hostnames": ["noetl.example.com"]}})
    assert not rendered.of_kind("Ingress")
    (route,) = rendered.of_kind("HTTPRoute")
    assert route["apiVersion"] == CUSTOM_KINDS["HTTPRoute"] and route["spec"]["parentRefs"] == [{"name": "gw"}]
    assert len(route["spec"]["rules"]) <= 16            # the Gateway API's limit
    wrong = [f"{m} {t} -> {resolve_httproute(route, m, concrete(t))}, served by {r}"
             for m, t, r in API_ROUTES if resolve_httproute(route, m, concrete(t)) != r]
    assert not wrong, "\n".join(wrong)
    services = {s["metadata"]["name"]: s for s in rendered.of_kind("Service")}
    for rule in route["spec"]["rules"]:
        (ref,) = rule["backendRefs"]
        assert ref["port"] == services[ref["name"]]["spec"]["ports"][0]["port"]


# ------------------------------------------------------------------------- exposure, network policies
def _selects(selector: dict[str, str], workload: dict[str, Any]) -> bool:
    return selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()


def test_the_default_render_exposes_nothing_outside_the_cluster(helm_chart: Any) -> None:
    """Issue 9: no Ingress without auth and TLS; by default there is none at all, no HTTPRoute, and every
    Service stays inside the cluster."""
    rendered = helm_chart.named("default")
    assert helm_chart.default_values["ingress"]["enabled"] is False
    assert not rendered.of_kind("Ingress") and not rendered.of_kind("HTTPRoute")
    assert {s["spec"]["type"] for s in rendered.of_kind("Service")} == {"ClusterIP"}


def test_an_ingress_is_rendered_only_for_a_host_with_tls(rendered: Any, helm_chart: Any) -> None:
    (ingress,) = exposed(rendered, helm_chart).of_kind("Ingress")
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"], "an Ingress for every host"
    assert any(rule["host"] in tls["hosts"] and tls["secretName"] for tls in ingress["spec"]["tls"])


def test_every_role_has_a_network_policy_that_admits_only_its_peers(rendered: Any, helm_chart: Any) -> None:
    """One NetworkPolicy per role (each worker pool, the migration Job too), selecting exactly that role's
    pods; the API roles admit the ingress controller and Prometheus, the others Prometheus only (nobody by
    default: metricsFrom is empty), and no rule admits every source."""
    values = {**helm_chart.default_values["networkPolicy"], **(rendered.values or {}).get("networkPolicy", {})}
    policies = rendered.of_kind("NetworkPolicy")
    workloads = rendered.workloads()
    for key, workload in workloads.items():
        mine = [p for p in policies if _selects(p["spec"]["podSelector"]["matchLabels"], workload)]
        assert len(mine) == 1, f"{key}: {[p['metadata']['name'] for p in mine]}"
        (policy,) = mine
        selector = policy["spec"]["podSelector"]["matchLabels"]
        others = [k for k, w in workloads.items() if k != key and _selects(selector, w)]
        assert not others, f"{policy['metadata']['name']} also selects {others}"
        assert policy["spec"]["policyTypes"] == ["Ingress"], key
        rules = policy["spec"]["ingress"]
        peers = values["metricsFrom"] if key != "migrate" else []
        if role_of(key) in HTTP_ROLES:
            peers = values["apiFrom"] + peers
        if key == "broker":     # explain: ingest and query ask a broker, which forwards to the owner
            callers = [p for p in rules[0]["from"] if "podSelector" in p and "namespaceSelector" not in p]
            reached = {k for k, w in workloads.items()
                       if any(_selects(c["podSelector"]["matchLabels"], w) for c in callers)}
            assert reached == {"ingest", "query", "broker"}, reached
            for name in ("ingest", "query"):
                env, _ = rendered.container_env(workloads[name])
                assert env["NOETL_BROKER_URL"].value.startswith(f"http://{policy['metadata']['name']}:")
            peers = callers + peers
        if peers:
            (rule,) = rules
            assert rule["from"] == peers, key
            assert rule["ports"] == [{"protocol": "TCP", "port": helm_chart.default_values["httpPort"]}], key
        else:
            assert rules == [], f"{key} admits {rules}"
        for rule in rules:
            assert rule.get("from"), f"{key}: a rule without `from` admits every source"
    assert len(policies) == len(workloads)


def test_metrics_peers_reach_every_role_and_api_peers_only_the_api(helm_chart: Any) -> None:
    prometheus = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    gateway = [{"podSelector": {"matchLabels": {"app": "gateway"}}}]
    rendered = helm_chart.render({"networkPolicy": {"apiFrom": gateway, "metricsFrom": prometheus}})
    for policy in rendered.of_kind("NetworkPolicy"):
        role = policy["metadata"]["labels"]["app.kubernetes.io/component"]
        peers = [peer for rule in policy["spec"]["ingress"] for peer in rule["from"]]
        expected = {"migrate": [], "ingest": gateway + prometheus, "query": gateway + prometheus,
                    "render": gateway + prometheus}.get(role, prometheus)
        if role == "broker":
            peers = [p for p in peers if "podSelector" not in p or p in gateway]   # its callers: above
        assert peers == expected, (policy["metadata"]["name"], peers)
    assert not helm_chart.render({"networkPolicy": {"enabled": False}}).of_kind("NetworkPolicy")


def _monitor_selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, and matchExpressions with In/NotIn) against labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for rule in selector.get("matchExpressions", []):
        inside = labels.get(rule["key"]) in rule["values"]
        if inside != (rule["operator"] == "In"):
            return False
    return True


def test_servicemonitor_scrapes_every_role(helm_chart: Any) -> None:
    rendered = helm_chart.named("production")
    monitors = {m["metadata"]["name"]: m for m in rendered.of_kind("ServiceMonitor")}
    assert set(monitors) == {"noetl", "noetl-broker"}
    scraped: dict[str, str] = {}
    for name, monitor in monitors.items():
        assert monitor["apiVersion"] == CUSTOM_KINDS["ServiceMonitor"]
        assert monitor["metadata"]["labels"]["release"] == "prometheus"
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["noetl"]}
        for service in rendered.of_kind("Service"):
            if _monitor_selects(monitor["spec"]["selector"], service["metadata"]["labels"]):
                assert service["metadata"]["name"] not in scraped, "scraped twice"
                scraped[service["metadata"]["name"]] = name
    assert set(scraped) == {d["metadata"]["name"] for d in rendered.of_kind("Deployment")}
    assert scraped["noetl-broker"] == "noetl-broker"
    (endpoint,) = monitors["noetl"]["spec"]["endpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    # the API roles' /metrics takes a token: Prometheus sends the one in the Secret production names
    assert endpoint["authorization"] == {"type": "Bearer",
                                         "credentials": {"name": "noetl-metrics-token", "key": "token"}}
    # the broker's takes the broker token, from the Secret the broker reads it from
    (endpoint,) = monitors["noetl-broker"]["spec"]["endpoints"]
    (broker,) = [d for d in rendered.of_kind("Deployment") if d["metadata"]["name"] == "noetl-broker"]
    env = {e["name"]: e for e in broker["spec"]["template"]["spec"]["containers"][0]["env"]}
    ref = env["NOETL_BROKER_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": {"name": ref["name"], "key": ref["key"]}}
    assert not helm_chart.named("default").of_kind("ServiceMonitor")


def test_notes_tell_the_operator_what_was_installed(rendered: Any) -> None:
    notes = rendered.notes
    for name in ("noetl-ingest", "noetl-query", "noetl-render", "noetl-broker", "noetl-worker-default"):
        assert name in notes


# --------------------------------------------------------------------------- values refused at install
def test_broker_replicas_above_partitions_are_refused(helm_chart: Any) -> None:
    with pytest.raises(helm_chart.helm.HelmRenderError) as caught:
        helm_chart.render({"broker": {"replicas": 7}, "topics": {"partitions": 6}})
    assert "broker.replicas (7) must be <= topics.partitions (6)" in message(caught.value)
    # (`helm lint` renders in lint mode, where `fail` only logs: install, upgrade and template refuse.)
    # the boundary is allowed, and more partitions allow more brokers
    helm_chart.render({"broker": {"replicas": 6}, "topics": {"partitions": 6}})
    helm_chart.render({"broker": {"replicas": 7}, "topics": {"partitions": 12}})


SCHEMA_REFUSALS = [
    ({"ingest": {"replicas": -1}}, ["/ingest/replicas", "minimum"]),
    ({"broker": {"replicas": -1}}, ["/broker/replicas", "minimum"]),
    ({"workers": [{"name": "gpu", "replica": 2}]}, ["/workers/0", "additional properties 'replica' not allowed"]),
    ({"workers": [{"replicas": 2}]}, ["/workers/0", "missing property 'name'"]),
    ({"workers": {"default": {"replicas": 1}}}, ["/workers", "want array"]),
    ({"workers": []}, ["/workers", "minItems"]),
    ({"workers": [{"name": "GPU_pool"}]}, ["/workers/0/name", "does not match pattern"]),
    ({"workers": [{"name": "default", "replicas": -1}]}, ["/workers/0/replicas", "minimum"]),
    ({"workers": [{"name": "default", "concurrency": 0}]}, ["/workers/0/concurrency", "minimum"]),
    ({"worker": [{"name": "default"}]}, ["additional properties 'worker' not allowed"]),
    ({"httpPort": 80}, ["/httpPort", "minimum"]),
    ({"securityContext": {"readOnlyRootFilesystem": False}}, ["/securityContext/readOnlyRootFilesystem"]),
    ({"podSecurityContext": {"runAsNonRoot": False}}, ["/podSecurityContext/runAsNonRoot"]),
    ({"secrets": {"secretKey": "not-a-fernet-key"}}, ["/secrets/secretKey", "does not match pattern"]),
    ({"externalKafka": {"bootstrap": "kafka"}}, ["/externalKafka/bootstrap", "does not match pattern"]),
    ({"externalKafka": {"securityProtocol": "TLS"}}, ["/externalKafka/securityProtocol"]),
    ({"externalKafka": {"auth": {"enabled": True}}}, ["/externalKafka/auth", "additional properties 'enabled'"]),
    ({"config": {"logLevel": "verbose"}}, ["/config/logLevel"]),
    ({"topics": {"partitions": 0}}, ["/topics/partitions", "minimum"]),
    ({"ingress": {"paths": [{"path": "/api", "pathType": "Prefix", "service": "worker"}]}},
     ["/ingress/paths/0/service"]),
    ({"ingest": {"autoscaling": {"enabled": True, "maxReplicas": 0}}}, ["/ingest/autoscaling/maxReplicas"]),
    # no Ingress for every host or without TLS
    ({"ingress": {"enabled": True}}, ["/ingress/host", "/ingress/tls"]),
    ({"ingress": {"enabled": True, "host": HOST}}, ["/ingress/tls", "minItems"]),
    ({"ingress": {**EXPOSED, "host": ""}}, ["/ingress/host", "minLength"]),
    ({"ingress": {**EXPOSED, "tls": [{"hosts": [HOST]}]}}, ["/ingress/tls/0", "secretName"]),
    ({"networkPolicy": {"apiFrom": [{}]}}, ["/networkPolicy/apiFrom/0", "minProperties"]),
    ({"networkPolicy": {"metricsFrom": [{"namespace": "monitoring"}]}},
     ["/networkPolicy/metricsFrom/0", "additional properties 'namespace'"]),
]


@pytest.mark.parametrize("values,expected", SCHEMA_REFUSALS,
                         ids=[next(iter(v)) + "-" + str(i) for i, (v, _) in enumerate(SCHEMA_REFUSALS)])
def test_bad_values_fail_the_schema_with_a_clear_message(helm_chart: Any, values: dict[str, Any],
                                                         expected: list[str]) -> None:
    with pytest.raises(helm_chart.helm.HelmValuesError) as caught:
        helm_chart.render(values)
    text = message(caught.value)
    assert "values don't meet the specifications of the schema" in text
    for fragment in expected:
        assert fragment in text, f"{fragment!r} not in: {text}"


TEMPLATE_REFUSALS = [
    ({"workers": [{"name": "a"}, {"name": "a"}]}, 'workers[1].name "a" is used twice'),
    ({"workers": [{"name": "default", "autoscaling": {"enabled": True, "maxReplicas": 10}}]},
     "workers[0] (default): 10 replicas (replicas, or autoscaling.maxReplicas) but noetl.commands.default has "
     "topics.partitions (6) partitions"),
    ({"workers": [{"name": "default", "replicas": 7}]}, "workers[0] (default): 7 replicas"),
    ({"workers": [{"name": "default", "autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}}]},
     "autoscaling.minReplicas (5) must be <= autoscaling.maxReplicas (3)"),
    ({"ingest": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 3}}},
     "ingest.autoscaling.minReplicas (5) must be <= ingest.autoscaling.maxReplicas (3)"),
    ({"secrets": {"existingSecret": "mine", "secretKey": FERNET}}, "secrets.existingSecret is set"),
    ({"postgresql": {"enabled": True}}, "postgresql.auth.password is required"),
    ({"externalKafka": {"bootstrap": ""}}, "externalKafka.bootstrap is required"),
    ({"httpRoute": {"enabled": True}}, "httpRoute.enabled needs httpRoute.parentRefs"),
    ({"externalKafka": {"securityProtocol": "SASL_PLAINTEXT"}}, "externalKafka.auth.username is required"),
    ({"externalKafka": {"securityProtocol": "SASL_SSL", "auth": {"username": "u"}}},
     "externalKafka.auth.password is required"),
    ({"externalKafka": {"tls": {"caSecret": "kafka-ca"}}},
     "externalKafka.tls.caSecret is set but externalKafka.securityProtocol is PLAINTEXT"),
    ({"ingress": {**EXPOSED, "tls": [{"secretName": "other", "hosts": ["other.example.com"]}]}},
     'ingress.enabled needs TLS for ingress.host ("noetl.example.com")'),
    ({"ingest": {"extraEnv": [{"name": "NOETL_AUTH", "value": "off"}]}}, "ingest.extraEnv sets NOETL_AUTH=off"),
    ({"workers": [{"name": "default", "extraEnv": [{"name": "NOETL_AUTH", "value": "OFF"}]}]},
     "workers[0].extraEnv sets NOETL_AUTH=off"),
]


@pytest.mark.parametrize("values,expected", TEMPLATE_REFUSALS,
                         ids=[next(iter(v)) + "-" + str(i) for i, (v, _) in enumerate(TEMPLATE_REFUSALS)])
def test_inconsistent_values_fail_the_render_with_a_clear_message(helm_chart: Any, values: dict[str, Any],
                                                                  expected: str) -> None:
    with pytest.raises(helm_chart.helm.HelmRenderError) as caught:
        helm_chart.render(values)
    assert expected in message(caught.value)


def test_a_pool_needs_only_its_name(helm_chart: Any) -> None:
    rendered = helm_chart.render({"workers": [{"name": "default"}, {"name": "io", "concurrency": 200}]})
    io = rendered.get("Deployment", "noetl-worker-io")
    env, _ = rendered.container_env(io)
    assert env["NOETL_WORKER_CONCURRENCY"].value == "200"
    assert env["NOETL_WORKER_PYTHON_PROCESSES"].value == str(helm_chart.default_values["workerDefaults"]["pythonProcesses"])
    assert io["spec"]["replicas"] == helm_chart.default_values["workerDefaults"]["replicas"]


# ------------------------------------------------------------------------------------------ the image
def test_the_image_matches_the_chart(helm_chart: Any) -> None:
    """The Dockerfile builds what the chart runs: every role's module installed by `pip install .`, the
    user the pods run as, the port, the working directory."""
    import tomllib

    dockerfile = (ROOT / "Dockerfile").read_text()
    instructions = [line.strip() for line in re.sub(r"\\\n", " ", dockerfile).splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    froms = [i.split()[1] for i in instructions if i.startswith("FROM ")]
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in instructions and froms[-1] == "${PYTHON_IMAGE}"
    assert any('pip install ".[server,kafka]"' in i for i in instructions)
    values = helm_chart.default_values
    pod = values["podSecurityContext"]
    (user,) = [i.split()[1] for i in instructions if i.startswith("USER ")]
    assert user == f"{pod['runAsUser']}:{pod['runAsGroup']}"          # numeric: runAsNonRoot can verify it
    # BuildKit would fetch the dockerfile frontend image for a `# syntax=` line: the build must work offline
    assert not re.match(r"#\s*syntax\s*=", dockerfile, re.IGNORECASE)
    # the step user (issue 9): its own uid and group, neither the engine's
    users = {}
    for command in " ".join(instructions).split("&&"):
        words = command.split()
        if "useradd" in words:
            users[words[-1]] = (words[words.index("--uid") + 1], words[words.index("--gid") + 1])
    assert users["noetl"] == (str(pod["runAsUser"]), str(pod["runAsGroup"])), users
    assert set(users) == {"noetl", "noetl-step"} and users["noetl-step"] == ("10002", "10002"), users
    assert re.search(r"^ENV .*\bNOETL_STEP_USER=noetl-step\b", "\n".join(instructions), re.MULTILINE)
    (expose,) = [i.split()[1] for i in instructions if i.startswith("EXPOSE ")]
    assert int(expose) == values["httpPort"]
    workdir = [i.split()[1] for i in instructions if i.startswith("WORKDIR ")][-1]
    deployment = helm_chart.named("default").get("Deployment", "noetl-broker")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["workingDir"] == workdir
    # `pip install .` (not editable) installs only the packages setuptools finds: every role's must be there.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    where = set(pyproject["tool"]["setuptools"]["packages"]["find"]["where"])
    for role, module in MODULES.items():
        package = module.split(".")[0]
        homes = [d for d in ("libs/common", "libs/runtime", *(f"services/{r}" for r in ROLES_DIRS))
                 if (ROOT / d / package).is_dir()]
        assert homes and homes[0] in where, (
            f"{package} ({role}) is in {homes}, which pyproject.toml's packages.find.where {sorted(where)} "
            "does not list: the image would not contain it")
    # ... and so must every package they import (the frontend, the embedded runtime the CLI imports, ...)
    homes_of_all = {str(init.parent.parent.relative_to(ROOT)) for init in ROOT.glob("*/*/noetl_*/__init__.py")}
    assert homes_of_all <= where, f"not installed by `pip install .`: {sorted(homes_of_all - where)}"
    for extra in ("server", "kafka"):
        assert extra in pyproject["project"]["optional-dependencies"]
    ignored = (ROOT / ".dockerignore").read_text().split()
    for needed in ("libs", "services", "pyproject.toml", "README.md"):
        assert needed not in ignored


ROLES_DIRS = ("frontend", "ingest", "query", "render", "broker", "worker", "embedded", "cli")
