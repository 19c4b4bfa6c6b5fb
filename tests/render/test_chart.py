"""The Helm chart, rendered by the real helm: lint, CRD copies, the settings interface, RBAC.

tests/e2e/test_chart.py installs it into the real API server; this file checks what
needs no cluster. The chart's Deployment must set exactly the KUBETUNE_* variables that
kubetune/handlers/settings.py reads, and its ClusterRole must let the operator create
every child that kubetune/render/children.py renders.
"""

from __future__ import annotations

import base64
import io
import subprocess
from operator import attrgetter
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.resources import CustomizationJobSpec, Source
from kubetune.cli.documents import load_files
from kubetune.cli.render import run_render
from kubetune.handlers.peering import DEFAULT_NAME as DEFAULT_PEERING
from kubetune.handlers.settings import SettingsError
from kubetune.planning.layout import compute_layout
from kubetune.render.children import JobInput, render_children
from kubetune.render.crds import crd_file_name, custom_resource_definitions, to_yaml
from tests.cases import CLUSTER_EXAMPLES
from tests.helmchart import CHART, ROOT, container_env, find, helm, settings_env_names, settings_for, template

WEBHOOK = {"webhook": {"enabled": True}, "metrics": {"serviceMonitor": {"enabled": True}}}
NAMESPACED = {"namespaces": ["team-a", "team-b"], "gpuMemoryGiB": 80, "webhook": {"enabled": True}}
CERT_MANAGER = {"webhook": {"enabled": True, "certManager": {"enabled": True}}}
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "webhook+servicemonitor": WEBHOOK,
    "namespaced": NAMESPACED,
    "cert-manager": CERT_MANAGER,
    "no-metrics": {"metrics": {"port": 0}},
}


# --------------------------------------------------------------------------- CRDs


def test_chart_crds_are_the_generated_ones() -> None:
    # Regenerate with: .venv/bin/kubetune crds --out-dir charts/kubetune/crds
    expected = {crd_file_name(crd): to_yaml([crd]) for crd in custom_resource_definitions()}
    chart = {p.name: p.read_text(encoding="utf-8") for p in sorted((CHART / "crds").glob("*.yaml"))}
    repo = {p.name: p.read_text(encoding="utf-8") for p in sorted((ROOT / "crds").glob("*.yaml"))}
    assert chart == expected, "charts/kubetune/crds is stale: run `kubetune crds --out-dir charts/kubetune/crds`"
    assert chart == repo


def test_kopf_peering_crds_match_the_vendored_ones() -> None:
    # The operator e2e tests apply third_party/kopf/peering.yaml; the chart must install the same.
    vendored = yaml.safe_load_all((ROOT / "third_party" / "kopf" / "peering.yaml").read_text(encoding="utf-8"))
    expected = {doc["metadata"]["name"]: doc["spec"] for doc in vendored if doc}
    rendered = {
        obj["metadata"]["name"]: obj["spec"]
        for obj in template()
        if obj["kind"] == "CustomResourceDefinition" and obj["spec"]["group"] == "kopf.dev"
    }
    assert rendered == expected
    without = template({"peering": {"installCRDs": False}})
    assert not [o for o in without if o["kind"] == "CustomResourceDefinition" and o["spec"]["group"] == "kopf.dev"]


# --------------------------------------------------------------------------- lint and objects


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_helm_lint(variant: str) -> None:
    res = helm("lint", "--strict", str(CHART), values=VARIANTS[variant], check=False)
    assert res.returncode == 0, res.stdout + res.stderr


EXPECTED_KINDS = {
    "default": {
        "CustomResourceDefinition": 5,  # 3 kubetune (crds/) + 2 kopf peering
        "ServiceAccount": 1,
        "ClusterRole": 3,  # the operator's, kubetune-edit, kubetune-view
        "ClusterRoleBinding": 1,
        "Service": 1,
        "Deployment": 1,
        "ClusterKopfPeering": 1,
    },
    "webhook+servicemonitor": {
        "CustomResourceDefinition": 5,
        "ServiceAccount": 1,
        "ClusterRole": 3,
        "ClusterRoleBinding": 1,
        "Service": 2,
        "Deployment": 1,
        "ClusterKopfPeering": 1,
        "Secret": 1,
        "ValidatingWebhookConfiguration": 1,
        "ServiceMonitor": 1,
    },
    "namespaced": {
        "CustomResourceDefinition": 5,
        "ServiceAccount": 1,
        "ClusterRole": 3,
        "ClusterRoleBinding": 1,
        "Service": 2,
        "Deployment": 1,
        "KopfPeering": 2,
        "Secret": 1,
        "ValidatingWebhookConfiguration": 1,
    },
    "cert-manager": {
        "CustomResourceDefinition": 5,
        "ServiceAccount": 1,
        "ClusterRole": 3,
        "ClusterRoleBinding": 1,
        "Service": 2,
        "Deployment": 1,
        "ClusterKopfPeering": 1,
        "Issuer": 1,
        "Certificate": 1,
        "ValidatingWebhookConfiguration": 1,
    },
    "no-metrics": {
        "CustomResourceDefinition": 5,
        "ServiceAccount": 1,
        "ClusterRole": 3,
        "ClusterRoleBinding": 1,
        "Deployment": 1,
        "ClusterKopfPeering": 1,
    },
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_kinds(variant: str) -> None:
    kinds: dict[str, int] = {}
    for obj in template(VARIANTS[variant]):
        kinds[obj["kind"]] = kinds.get(obj["kind"], 0) + 1
    assert kinds == EXPECTED_KINDS[variant]


# --------------------------------------------------------------------------- the settings interface


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_deployment_env_is_exactly_what_settings_reads(variant: str) -> None:
    env = container_env(find(template(VARIANTS[variant]), "Deployment"))
    assert set(env) == settings_env_names()
    settings_for(env)  # every value parses


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            {},
            {
                "watch.namespaces": (),
                "cluster.gpu_memory_gib": None,
                "webhook.enabled": False,
                "webhook.host": None,
                "watch.peering": "kubetune",
                "cluster.allowed_host_paths": (),
            },
        ),
        ({"allowedHostPaths": ["/mnt/models", "/data"]}, {"cluster.allowed_host_paths": ("/mnt/models", "/data")}),
        (
            NAMESPACED,
            {
                "watch.namespaces": ("team-a", "team-b"),
                "cluster.gpu_memory_gib": 80.0,
                "webhook.enabled": True,
                "webhook.host": "kt-kubetune-webhook.kubetune-system.svc",
                "endpoints.metrics_port": 8080,
            },
        ),
        (
            {"gpuMemoryGiB": 79.6, "metrics": {"port": 9090}, "webhook": {"enabled": True, "port": 8443}},
            {"cluster.gpu_memory_gib": 79.6, "endpoints.metrics_port": 9090, "webhook.port": 8443},
        ),
        (
            {"peering": {"name": "other"}, "referenceRetrySeconds": 5},
            {"watch.peering": "other", "watch.reference_retry_seconds": 5},
        ),
        (
            {"verbose": True, "peering": {"lifetimeSeconds": 20}},
            {"watch.verbose": True, "watch.peering_lifetime_seconds": 20},
        ),
        (
            WEBHOOK,
            {
                "webhook.cert_file": "/etc/kubetune/webhook/tls.crt",
                "webhook.key_file": "/etc/kubetune/webhook/tls.key",
                "webhook.ca_file": "/etc/kubetune/webhook/ca.crt",
            },
        ),
        (
            {"webhook": {"enabled": True, "tls": {"existingSecret": "mine"}, "caBundle": "PEM"}},
            {"webhook.cert_file": "/etc/kubetune/webhook/tls.crt", "webhook.ca_file": None},
        ),
        ({}, {"webhook.cert_file": None, "webhook.key_file": None, "webhook.ca_file": None}),
    ],
)
def test_values_reach_the_operator_settings(values: dict[str, Any], expected: dict[str, Any]) -> None:
    settings = settings_for(container_env(find(template(values), "Deployment")))
    for key, value in expected.items():
        assert attrgetter(key)(settings) == value, key


@pytest.mark.parametrize(
    ("values", "image", "pull_policy", "gpu", "backoff", "interval", "shm"),
    [
        ({}, "ghcr.io/kubetune/trainer:0.1.0", "IfNotPresent", "nvidia.com/gpu", 3, 10.0, "8Gi"),
        (
            {
                "trainer": {"image": {"repository": "registry.local/trainer", "tag": "dev", "pullPolicy": "Always"}},
                "gpuResource": "amd.com/gpu",
                "backoffLimit": 0,
                "progressInterval": 2.5,
                "shmSize": "32Gi",
            },
            "registry.local/trainer:dev",
            "Always",
            "amd.com/gpu",
            0,
            2.5,
            "32Gi",
        ),
    ],
)
def test_trainer_settings(
    values: dict[str, Any], image: str, pull_policy: str, gpu: str, backoff: int, interval: float, shm: str
) -> None:
    trainer = settings_for(container_env(find(template(values), "Deployment"))).trainer
    assert (trainer.image, trainer.image_pull_policy, trainer.gpu_resource) == (image, pull_policy, gpu)
    assert (trainer.backoff_limit, trainer.progress_interval_seconds, trainer.shm_size) == (backoff, interval, shm)


def test_trainer_resources_reach_every_training_container() -> None:
    values = {"trainer": {"resources": {"requests": {"cpu": 8, "memory": "64Gi"}, "limits": {"memory": "96Gi"}}}}
    trainer = settings_for(container_env(find(template(values), "Deployment"))).trainer
    assert trainer.resources == {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"memory": "96Gi"}}
    spec = CustomizationJobSpec.model_validate({"automodel": {"model": "m", "dataset": {"training": "d"}}})
    assert spec.automodel is not None
    pvc = Source.model_validate({"pvc": {"claimName": "inputs", "path": "x"}})
    job = JobInput("j", "ns", "uid", spec, compute_layout(spec.automodel), {"model": pvc, "training": pvc})
    pytorchjob = next(c for c in render_children(job, trainer) if c["kind"] == "PyTorchJob")
    container = pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert container["resources"] == {
        "requests": {"cpu": "8", "memory": "64Gi"},
        "limits": {"memory": "96Gi", "nvidia.com/gpu": "1"},
    }


@pytest.mark.parametrize("value", ["[1]", '{"limits": 3}', '{"spare": {}}', "{not json"])
def test_malformed_trainer_resources_are_refused(value: str) -> None:
    with pytest.raises(SettingsError, match="KUBETUNE_TRAINER_RESOURCES"):
        settings_for({"KUBETUNE_TRAINER_RESOURCES": value})


def test_chart_defaults_match_the_operator_defaults() -> None:
    # A chart that says nothing must run the operator exactly as its own defaults would, except
    # that it names the peering object it creates (so a missing one is an error, not standalone).
    chart = settings_for(container_env(find(template(), "Deployment")))
    defaults = settings_for({})
    assert chart == defaults.model_copy(
        update={"watch": defaults.watch.model_copy(update={"peering": DEFAULT_PEERING})}
    )


# --------------------------------------------------------------------------- the pod


def test_operator_pod_is_locked_down() -> None:
    deployment = find(template(), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["kubetune", "operator"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert pod["serviceAccountName"] == find(template(), "ServiceAccount")["metadata"]["name"]


@pytest.mark.parametrize(("port", "probed"), [(8081, True), (9100, True), (0, False)])
def test_probes_ask_kopfs_healthz_on_the_health_port(port: int, probed: bool) -> None:
    deployment = find(template({"health": {"port": port}}), "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert ("livenessProbe" in container) == probed and ("readinessProbe" in container) == probed
    if probed:
        for probe in ("livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
        assert {"name": "health", "containerPort": port, "protocol": "TCP"} in container["ports"]
    assert container_env(deployment)["KUBETUNE_HEALTH_PORT"] == str(port)


@pytest.mark.parametrize("port", [8080, 0])
def test_metrics_port_is_its_own(port: int) -> None:
    deployment = find(template({"metrics": {"port": port}}), "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    metrics = {"name": "metrics", "containerPort": port, "protocol": "TCP"}
    assert (metrics in container["ports"]) == bool(port)
    assert container["livenessProbe"]["httpGet"]["port"] == "health"  # probes do not depend on /metrics


@pytest.mark.parametrize(
    ("values", "key", "expected"),
    [
        ({"replicas": 2}, ("spec", "replicas"), 2),
        ({"nodeSelector": {"pool": "cpu"}}, ("spec", "template", "spec", "nodeSelector"), {"pool": "cpu"}),
        (
            {"tolerations": [{"key": "dedicated", "operator": "Exists"}]},
            ("spec", "template", "spec", "tolerations"),
            [{"key": "dedicated", "operator": "Exists"}],
        ),
        (
            {"image": {"tag": "1.2.3"}},
            ("spec", "template", "spec", "containers", 0, "image"),
            "ghcr.io/kubetune/operator:1.2.3",
        ),
    ],
)
def test_pod_values(values: dict[str, Any], key: tuple[Any, ...], expected: Any) -> None:
    node: Any = find(template(values), "Deployment")
    for part in key:
        node = node[part]
    assert node == expected


# --------------------------------------------------------------------------- metrics and webhook


def test_service_monitor_selects_the_metrics_service() -> None:
    objects = template(WEBHOOK)
    monitor = find(objects, "ServiceMonitor")
    service = find(objects, "Service", "kt-kubetune-metrics")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    webhook_service = find(objects, "Service", "kt-kubetune-webhook")
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= webhook_service["metadata"]["labels"].items()


@pytest.mark.parametrize("variant", ["webhook+servicemonitor", "namespaced"])
def test_webhook_configuration(variant: str, tmp_path: Path) -> None:
    objects = template(VARIANTS[variant])
    config = find(objects, "ValidatingWebhookConfiguration")
    hooks = {hook["rules"][0]["resources"][0]: hook for hook in config["webhooks"]}
    # Jobs get the whole validator; Models and FileSets the hostPath rule. kopf serves each
    # handler at /<handler id> (operator/kubetune/handlers/operator.py).
    paths = {resource: hook["clientConfig"]["service"]["path"] for resource, hook in hooks.items()}
    assert paths == {"customizationjobs": "/validate", "models": "/validate-model", "filesets": "/validate-fileset"}
    for resource, other in hooks.items():
        assert other["rules"] == [
            {
                "apiGroups": ["kubetune.io"],
                "apiVersions": ["v1alpha1"],
                "operations": ["CREATE", "UPDATE"],
                "resources": [resource],
                "scope": "Namespaced",
            }
        ]
        assert other["clientConfig"]["service"]["name"] == hooks["customizationjobs"]["clientConfig"]["service"]["name"]
        assert other.get("namespaceSelector") == hooks["customizationjobs"].get("namespaceSelector")
    hook = hooks["customizationjobs"]
    service = find(objects, "Service", hook["clientConfig"]["service"]["name"])
    assert hook["clientConfig"]["service"]["namespace"] == service["metadata"]["namespace"]
    deployment = find(objects, "Deployment")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert container_env(deployment)["KUBETUNE_WEBHOOK_HOST"] == f"{service['metadata']['name']}.kubetune-system.svc"
    namespaces = VARIANTS[variant].get("namespaces")
    if namespaces:
        (expression,) = hook["namespaceSelector"]["matchExpressions"]
        assert expression == {"key": "kubernetes.io/metadata.name", "operator": "In", "values": namespaces}
    else:
        assert "namespaceSelector" not in hook
    # The generated certificate is signed by the CA the API server is told to trust, for the host.
    secret = find(objects, "Secret")
    files = {name: base64.b64decode(value) for name, value in secret["data"].items()}
    (tmp_path / "ca.pem").write_bytes(base64.b64decode(hook["clientConfig"]["caBundle"]))
    (tmp_path / "tls.crt").write_bytes(files["tls.crt"])
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp_path / "ca.pem"), "-purpose", "sslserver", str(tmp_path / "tls.crt")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    san = subprocess.run(
        ["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(tmp_path / "tls.crt")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"DNS:{container_env(deployment)['KUBETUNE_WEBHOOK_HOST']}" in san
    mounts = deployment["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "webhook-tls", "mountPath": "/etc/kubetune/webhook", "readOnly": True} in mounts


def test_cert_manager_injects_the_ca() -> None:
    objects = template(CERT_MANAGER)
    config = find(objects, "ValidatingWebhookConfiguration")
    certificate = find(objects, "Certificate")
    assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == (
        f"kubetune-system/{certificate['metadata']['name']}"
    )
    assert "caBundle" not in config["webhooks"][0]["clientConfig"]
    volumes = find(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "webhook-tls", "secret": {"secretName": certificate["spec"]["secretName"]}} in volumes


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"webhook": {"enabled": True, "tls": {"crt": "x"}}}, "webhook.tls.key is required"),
        ({"webhook": {"enabled": True, "tls": {"crt": "x", "key": "y"}}}, "webhook.caBundle (PEM) is required"),
        ({"webhook": {"enabled": True, "tls": {"existingSecret": "mine"}}}, "webhook.caBundle (PEM) is required"),
        ({"serviceAccount": {"create": False}}, "serviceAccount.name is required"),
    ],
)
def test_incomplete_values_fail_with_a_message(values: dict[str, Any], message: str) -> None:
    res = helm("template", "kt", str(CHART), values=values, check=False)
    assert res.returncode != 0
    assert message in res.stderr


# --------------------------------------------------------------------------- RBAC


def _rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = find(template(), "ClusterRole", "kt-kubetune")["rules"]  # the operator's
    return rules


def _allows(rules: list[dict[str, Any]], group: str, resource: str, verb: str) -> bool:
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"] for r in rules)


def _children() -> list[dict[str, Any]]:
    children: list[dict[str, Any]] = []
    for example in CLUSTER_EXAMPLES:
        out, err = io.StringIO(), io.StringIO()
        assert run_render(load_files([str(example)]), out, err) == 0, err.getvalue()
        children += [doc for doc in yaml.safe_load_all(out.getvalue()) if doc]
    return children


def test_operator_may_create_every_child_it_renders() -> None:
    rules = _rules()
    kinds = {(child["apiVersion"].rpartition("/")[0], child["kind"]) for child in _children()}
    assert {kind for _, kind in kinds} >= {"PyTorchJob", "Job", "ConfigMap", "Role", "RoleBinding", "ServiceAccount"}
    for group, kind in sorted(kinds):
        for verb in ("create", "get", "list", "watch", "patch", "delete"):
            assert _allows(rules, group, kind.lower() + "s", verb), f"{verb} {kind}"


def test_operator_holds_what_the_trainer_role_grants() -> None:
    # RBAC lets the operator create a Role only with permissions it holds itself.
    rules = _rules()
    roles = [child for child in _children() if child["kind"] == "Role"]
    assert roles
    for role in roles:
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        assert _allows(rules, group, resource, verb), f"{verb} {group}/{resource}"


@pytest.mark.parametrize(
    ("group", "resource", "verb", "allowed"),
    [
        ("kubetune.io", "customizationjobs", "patch", True),
        ("kubetune.io", "customizationjobs/status", "patch", True),
        ("kubetune.io", "customizationjobs/finalizers", "update", True),
        ("kubetune.io", "models", "create", True),
        ("kubetune.io", "models/status", "patch", True),
        ("kubetune.io", "filesets", "create", False),
        ("kubetune.io", "customizationjobs", "create", False),
        ("kubetune.io", "customizationjobs", "delete", False),
        ("", "pods", "get", True),
        ("", "pods/log", "get", True),
        ("", "pods", "create", False),
        ("", "pods", "delete", False),
        ("", "events", "create", True),
        ("", "secrets", "get", False),
        ("", "secrets", "list", False),
        ("", "nodes", "list", False),
        ("", "namespaces", "list", True),
        ("", "namespaces", "create", False),
        ("kopf.dev", "clusterkopfpeerings", "patch", True),
        ("kopf.dev", "kopfpeerings", "patch", True),
        ("apiextensions.k8s.io", "customresourcedefinitions", "list", True),
        ("apiextensions.k8s.io", "customresourcedefinitions", "create", False),
        ("rbac.authorization.k8s.io", "roles", "bind", False),
        ("rbac.authorization.k8s.io", "roles", "escalate", False),
        ("rbac.authorization.k8s.io", "clusterroles", "create", False),
    ],
)
def test_cluster_role(group: str, resource: str, verb: str, allowed: bool) -> None:
    assert _allows(_rules(), group, resource, verb) == allowed


def test_cluster_role_has_no_wildcards() -> None:
    for rule in _rules():
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule


def test_user_roles_aggregate_into_the_built_in_roles() -> None:
    objects = template({})
    edit, view = find(objects, "ClusterRole", "kubetune-edit"), find(objects, "ClusterRole", "kubetune-view")
    edit_labels, view_labels = edit["metadata"]["labels"], view["metadata"]["labels"]
    assert edit_labels["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit_labels["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert view_labels["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    writes = {verb for rule in edit["rules"] if "customizationjobs" in rule["resources"] for verb in rule["verbs"]}
    assert {"create", "delete", "patch"} <= writes
    # Users read status; only the operator and the trainer write it.
    for role in (edit, view):
        for rule in role["rules"]:
            if any(r.endswith("/status") for r in rule["resources"]):
                assert set(rule["verbs"]) <= {"get", "list", "watch"}
    assert {verb for rule in view["rules"] for verb in rule["verbs"]} == {"get", "list", "watch"}
    assert not [o for o in template({"userRoles": {"enabled": False}}) if o["metadata"]["name"].startswith("kubetune-")]
