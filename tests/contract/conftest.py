"""Fixtures of the contract tests: the Helm chart rendered by the real Helm engine, and what its manifests
mean for the processes they start (the environment of each role, resolved through the ConfigMap and the
Secret the chart renders).

`helm_chart` renders deploy/helm/noetl with helm-python-sdk (Helm v4's Go SDK through a C ABI: no helm
binary, no cluster, no network). `kafka_endpoint` is the integration suite's fixture (a real Kafka
protocol endpoint: KAFKA_BOOTSTRAP_SERVERS, testcontainers or Tansu), shared by import; `contract_pg_dsn`
is NOETL_TEST_PG_DSN, or a throwaway Postgres from scripts/pg-start.sh when that is unset.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "deploy" / "helm" / "noetl"
PRODUCTION_VALUES = ROOT / "deploy" / "helm" / "values-production.yaml"
RELEASE = "noetl"
NAMESPACE = "noetl"
# Each Deployment's app.kubernetes.io/component; worker pools are "worker:<pool>" in the maps below.
ROLES = ("ingest", "query", "render", "broker")


def _load_integration_fixtures() -> Any:
    name = "noetl_integration_fixtures"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "integration" / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module     # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_integration = _load_integration_fixtures()
kafka_endpoint = _integration.kafka_endpoint          # re-exported: a fixture of this directory too
KafkaEndpoint = _integration.KafkaEndpoint


# ------------------------------------------------------------------------------------------ rendering
@dataclass(frozen=True)
class EnvVar:
    """One variable of a container's environment: its value when the chart decides it (literal, the
    chart's ConfigMap or the chart's own Secret), else None and where it comes from."""
    name: str
    value: str | None
    source: str          # "literal" | "configmap:<name>" | "secret:<name>/<key>" | "field:<path>"


@dataclass
class Rendered:
    values: dict[str, Any] | None
    files: dict[str, str]
    docs: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for path, text in sorted(self.files.items()):
            if path.endswith("NOTES.txt"):
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    doc.setdefault("__template__", path)
                    self.docs.append(doc)

    @property
    def notes(self) -> str:
        return next((text for path, text in self.files.items() if path.endswith("NOTES.txt")), "")

    def manifests(self) -> list[dict[str, Any]]:
        """The documents as Kubernetes receives them (without the template path kept for messages)."""
        return [{k: v for k, v in doc.items() if k != "__template__"} for doc in self.docs]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == name]
        assert found, f"no {kind} {name!r}; rendered: {sorted((d['kind'], d['metadata']['name']) for d in self.docs)}"
        return found[0]

    def find(self, kind: str, name: str) -> dict[str, Any] | None:
        return next((d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == name), None)

    def workloads(self) -> dict[str, dict[str, Any]]:
        """Deployments by role ("ingest", ..., "worker:<pool>") and the migration Job as "migrate"."""
        out: dict[str, dict[str, Any]] = {}
        for d in self.of_kind("Deployment"):
            labels = d["spec"]["template"]["metadata"]["labels"]
            role = labels["app.kubernetes.io/component"]
            key = f"worker:{labels['noetl.io/pool']}" if role == "worker" else role
            assert key not in out, f"two Deployments for {key}"
            out[key] = d
        for d in self.of_kind("Job"):
            if d["metadata"]["labels"].get("app.kubernetes.io/component") == "migrate":
                out["migrate"] = d
        return out

    def chart_secret_data(self, name: str) -> dict[str, str] | None:
        """A Secret the chart renders, as clear text; None for a Secret it does not render (existingSecret)."""
        doc = self.find("Secret", name)
        if doc is None:
            return None
        import base64
        data = {k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()}
        data.update(doc.get("stringData") or {})
        return data

    def container_env(self, workload: dict[str, Any], container: int = 0) -> tuple[dict[str, EnvVar], list[str]]:
        """The environment of a workload's container: envFrom first, then env (which wins), as Kubernetes
        builds it. Returns the variables and the envFrom sources the chart cannot see into (a Secret or
        ConfigMap the operator brings)."""
        spec = workload["spec"]["template"]["spec"]["containers"][container]
        env: dict[str, EnvVar] = {}
        opaque: list[str] = []
        for source in spec.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                name = source["configMapRef"]["name"]
                cm = self.find("ConfigMap", name)
                if cm is None:
                    opaque.append(f"configmap:{name}")
                    continue
                for k, v in (cm.get("data") or {}).items():
                    env[prefix + k] = EnvVar(prefix + k, str(v), f"configmap:{name}")
            elif "secretRef" in source:
                name = source["secretRef"]["name"]
                data = self.chart_secret_data(name)
                if data is None:
                    opaque.append(f"secret:{name}")
                    continue
                for k, v in data.items():
                    env[prefix + k] = EnvVar(prefix + k, v, f"secret:{name}")
        for item in spec.get("env") or []:
            name = item["name"]
            if "value" in item:
                env[name] = EnvVar(name, str(item["value"]), "literal")
                continue
            ref = item.get("valueFrom") or {}
            if "secretKeyRef" in ref:
                sref = ref["secretKeyRef"]
                data = self.chart_secret_data(sref["name"])
                value = None
                if data is not None:
                    assert sref["key"] in data, (
                        f"{workload['metadata']['name']}: {name} refers to key {sref['key']!r} that Secret "
                        f"{sref['name']} (rendered by the chart) does not have: {sorted(data)}")
                    value = data[sref["key"]]
                env[name] = EnvVar(name, value, f"secret:{sref['name']}/{sref['key']}")
            elif "configMapKeyRef" in ref:
                cref = ref["configMapKeyRef"]
                cm = self.find("ConfigMap", cref["name"])
                value = None if cm is None else cm["data"][cref["key"]]
                env[name] = EnvVar(name, value, f"configmap:{cref['name']}")
            else:
                env[name] = EnvVar(name, None, "field:" + ",".join(ref))
        return env, opaque


class HelmChart:
    """deploy/helm/noetl through the real Helm engine."""

    def __init__(self) -> None:
        import helm_python

        self.helm = helm_python
        self.dir = CHART_DIR
        self._chart = helm_python.Chart.load(str(CHART_DIR))
        self._cache: dict[str, Rendered] = {}

    @property
    def metadata(self) -> dict[str, Any]:
        return self._chart.metadata

    @property
    def default_values(self) -> dict[str, Any]:
        return self._chart.values

    def render(self, values: dict[str, Any] | None = None, *, is_upgrade: bool = False) -> Rendered:
        """Render like `helm install` (or `helm upgrade`) would; raises HelmValuesError (schema) or
        HelmRenderError (a template `fail`/`required`)."""
        files = self._chart.render(values, name=RELEASE, namespace=NAMESPACE,
                                   is_install=not is_upgrade, is_upgrade=is_upgrade)
        return Rendered(values, files)

    @staticmethod
    def values_of(name: str) -> dict[str, Any] | None:
        """The value sets every structural test runs over: "default" (None: the chart's own) and
        "production" (deploy/helm/values-production.yaml)."""
        return VALUE_SETS[name]()

    def named(self, name: str) -> Rendered:
        if name not in self._cache:
            self._cache[name] = self.render(self.values_of(name))
        return self._cache[name]

    def lint(self, values: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
        return self.helm.lint(str(CHART_DIR), values, namespace=NAMESPACE, **options)


def production_values() -> dict[str, Any]:
    return yaml.safe_load(PRODUCTION_VALUES.read_text())


VALUE_SETS = {"default": lambda: None, "production": production_values}


@pytest.fixture(scope="session")
def helm_chart() -> HelmChart:
    return HelmChart()


# ---------------------------------------------------------------------------------------- Postgres
@pytest.fixture(scope="session")
def contract_pg_dsn() -> Iterator[str]:
    """NOETL_TEST_PG_DSN (CI sets it), else a throwaway Postgres for this session (scripts/pg-start.sh)."""
    dsn = os.environ.get("NOETL_TEST_PG_DSN")
    if dsn:
        yield dsn
        return
    started = subprocess.run(["bash", str(ROOT / "scripts" / "pg-start.sh")], capture_output=True, text=True,
                             timeout=300)
    if started.returncode != 0:
        raise RuntimeError(f"scripts/pg-start.sh failed:\n{started.stderr[-3000:]}")
    exports = dict(re.findall(r"^export (\w+)=(.*)$", started.stdout, re.M))
    try:
        yield exports["NOETL_TEST_PG_DSN"]
    finally:
        subprocess.run(["bash", str(ROOT / "scripts" / "pg-stop.sh"), exports["NOETL_TEST_PG_INFO"]],
                       capture_output=True, timeout=120)
