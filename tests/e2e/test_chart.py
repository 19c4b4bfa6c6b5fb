"""The Helm chart against the real API server: `helm install` it, then prove what it grants.

Two real installs, each in a fresh namespace with its own release and peering names (so
nothing clashes with other tests): the defaults (cluster-wide), and the webhook on with
the operator restricted to one namespace. For each: every object is stored, and a strict
server-side dry run of `helm template` finds no unknown field. For the defaults, the
operator's ServiceAccount is checked with `kubectl auth can-i` and by really creating,
as that ServiceAccount, the per-job Role and RoleBinding the operator renders (RBAC lets
it grant only what it holds), while a Role granting more is refused.

No kubelet runs here: pods are stored, never started, so the operator itself is not
running; tests/e2e/test_operator.py covers its behaviour.
"""

from __future__ import annotations

import io
import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from kubetune.cli.documents import load_files
from kubetune.cli.render import run_render
from tests.helmchart import CHART, ROOT, helm

from .controlplane import ControlPlane
from .operator_process import wait_for

pytestmark = pytest.mark.e2e

EXAMPLE = ROOT / "examples" / "02-qlora-unsloth.yaml"
JOB: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "CustomizationJob",
    "metadata": {"name": "chart-e2e"},
    "spec": {"unsloth": {"model": {"name": "base"}, "dataset": {"path": "train"}}},
}


@dataclass(frozen=True)
class Install:
    release: str
    namespace: str
    values: dict[str, Any]
    objects: list[dict[str, Any]]
    """What helm created: the release's manifest and its hooks."""

    @property
    def service_account(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.release}-kubetune"


def _ok(res: Any) -> str:
    assert res.returncode == 0, f"rc={res.returncode}\nstdout: {res.stdout}\nstderr: {res.stderr}"
    out: str = res.stdout
    return out


def _crd_exists(cp: ControlPlane, name: str) -> bool:
    return cp.kubectl("get", "crd", name).returncode == 0


VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    # kubetune-edit and kubetune-view are cluster-wide names: one release in a cluster ships them.
    "webhook-namespaced": {"webhook": {"enabled": True}, "gpuMemoryGiB": 80, "userRoles": {"enabled": False}},
}


@contextmanager
def _installed(cp: ControlPlane, variant: str) -> Iterator[Install]:
    token = secrets.token_hex(3)
    release, namespace = f"kt-{token}", f"e2e-chart-{token}"
    values = {
        **VARIANTS[variant],
        "peering": {
            "name": f"e2e-{token}",
            # kopf's CRDs may already be there (an earlier install keeps them; the operator
            # tests apply them with kubectl): helm must not try to own them then.
            "installCRDs": not _crd_exists(cp, "clusterkopfpeerings.kopf.dev"),
        },
    }
    if values.get("webhook"):
        values["namespaces"] = [f"{namespace}-watched"]
    created = [namespace, *values.get("namespaces", [])]
    kubeconfig = f"--kubeconfig={cp.kubeconfig}"
    try:
        for name in created:
            _ok(cp.kubectl("create", "namespace", name))
        # The session's CRDs were applied server-side by kubectl; helm 4 applies crds/ server-side
        # too, so it must force the (identical, tests/render/test_chart.py) field ownership.
        helm("install", release, str(CHART), "--namespace", namespace, kubeconfig, "--force-conflicts", values=values)
        manifest = helm("get", "manifest", release, "--namespace", namespace, kubeconfig).stdout
        hooks = helm("get", "hooks", release, "--namespace", namespace, kubeconfig).stdout
        objects = [doc for doc in yaml.safe_load_all(manifest + "\n---\n" + hooks) if doc]
        yield Install(release, namespace, values, objects)
    finally:
        helm("uninstall", release, "--namespace", namespace, kubeconfig, check=False)
        # Hooks (the peering objects) outlive the release.
        cp.kubectl("delete", "clusterkopfpeering", f"e2e-{token}", "--ignore-not-found")
        for name in created:
            cp.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")


@pytest.fixture(scope="module")
def defaults(control_plane: ControlPlane) -> Iterator[Install]:
    with _installed(control_plane, "defaults") as install:
        yield install


@pytest.fixture(scope="module")
def webhook(control_plane: ControlPlane) -> Iterator[Install]:
    with _installed(control_plane, "webhook-namespaced") as install:
        yield install


@pytest.fixture(params=["defaults", "webhook"])
def install(request: pytest.FixtureRequest) -> Install:
    result: Install = request.getfixturevalue(request.param)
    return result


def test_every_object_is_stored(install: Install, control_plane: ControlPlane) -> None:
    kinds = {obj["kind"] for obj in install.objects}
    assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service"} <= kinds
    if install.values.get("webhook"):
        assert {"ValidatingWebhookConfiguration", "Secret", "KopfPeering"} <= kinds
    else:
        assert "ClusterKopfPeering" in kinds
    for obj in install.objects:
        meta = obj["metadata"]
        args = ["get", f"{obj['kind']}.{obj['apiVersion'].split('/')[0]}", meta["name"], "-o", "name"]
        if obj["apiVersion"] == "v1":
            args[1] = obj["kind"]
        if "namespace" in meta:
            args += ["--namespace", meta["namespace"]]
        _ok(control_plane.kubectl(*args))
    for crd in sorted((CHART / "crds").glob("*.yaml")):
        assert _crd_exists(control_plane, crd.stem)


def test_strict_server_side_dry_run(install: Install, control_plane: ControlPlane) -> None:
    # helm does not refuse unknown fields; a strict server-side apply does (and checks every
    # object against the live schemas once more, CRDs included).
    rendered = helm(
        "template", install.release, str(CHART), "--namespace", install.namespace, "--include-crds",
        values=install.values,
    ).stdout  # fmt: skip
    res = control_plane.kubectl(
        "apply", "--server-side", "--dry-run=server", "--validate=strict", "--force-conflicts",
        "--field-manager=e2e-chart", "-f", "-", stdin=rendered,
    )  # fmt: skip
    _ok(res)
    assert res.stdout.count("(server dry run)") == len([d for d in yaml.safe_load_all(rendered) if d])


# --------------------------------------------------------------------------- RBAC (defaults)


CAN_I = [
    # (verb, resource, subresource, in a job namespace, expected)
    ("patch", "customizationjobs.kubetune.io", "status", True),
    ("get", "customizationjobs.kubetune.io", "status", True),
    ("update", "customizationjobs.kubetune.io", "finalizers", True),
    ("watch", "customizationjobs.kubetune.io", "", True),
    ("create", "models.kubetune.io", "", True),
    ("create", "pytorchjobs.kubeflow.org", "", True),
    ("create", "jobs.batch", "", True),
    ("create", "roles.rbac.authorization.k8s.io", "", True),
    ("create", "rolebindings.rbac.authorization.k8s.io", "", True),
    ("create", "persistentvolumeclaims", "", True),
    ("get", "pods", "log", True),
    ("patch", "clusterkopfpeerings.kopf.dev", "", True),
    ("list", "customresourcedefinitions.apiextensions.k8s.io", "", True),
    ("get", "secrets", "", False),
    ("create", "pods", "", False),
    ("delete", "customizationjobs.kubetune.io", "", False),
    ("create", "filesets.kubetune.io", "", False),
    ("bind", "roles.rbac.authorization.k8s.io", "", False),
    ("escalate", "roles.rbac.authorization.k8s.io", "", False),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", "", False),
    ("list", "nodes", "", False),
]


@pytest.mark.parametrize("row", CAN_I, ids=lambda r: f"{r[0]}-{r[1]}{'/' + r[2] if r[2] else ''}")
def test_operator_can_i(
    row: tuple[str, str, str, bool], defaults: Install, control_plane: ControlPlane, namespace: str
) -> None:
    verb, resource, subresource, expected = row
    args = ["auth", "can-i", verb, resource, f"--as={defaults.service_account}", "--namespace", namespace]
    if subresource:
        args.append(f"--subresource={subresource}")
    res = control_plane.kubectl(*args)
    assert res.stdout.strip() == ("yes" if expected else "no"), res.stdout + res.stderr


def _trainer_rbac(namespace: str, uid: str) -> list[dict[str, Any]]:
    """The Role and RoleBinding the operator renders for the example job, owned by `uid`."""
    out, err = io.StringIO(), io.StringIO()
    assert run_render(load_files([str(EXAMPLE)]), out, err) == 0, err.getvalue()
    children = [doc for doc in yaml.safe_load_all(out.getvalue()) if doc]
    rbac = [child for child in children if child["kind"] in ("ServiceAccount", "Role", "RoleBinding")]
    for child in rbac:
        child["metadata"]["namespace"] = namespace
        for owner in child["metadata"]["ownerReferences"]:
            owner["uid"] = uid
        for subject in child.get("subjects", []):
            subject["namespace"] = namespace
    return rbac


def test_operator_creates_the_trainer_role_without_escalate(
    defaults: Install, control_plane: ControlPlane, namespace: str
) -> None:
    # A real job owns the children, as in the operator (blockOwnerDeletion needs the
    # customizationjobs/finalizers permission).
    name = _job_name()
    job = {**JOB, "metadata": {"name": name, "namespace": namespace}}
    created = json.loads(_ok(control_plane.kubectl("create", "-o", "json", "-f", "-", stdin=json.dumps(job))))
    for child in _trainer_rbac(namespace, created["metadata"]["uid"]):
        res = control_plane.kubectl(
            "create", f"--as={defaults.service_account}", "-o", "name", "-f", "-", stdin=json.dumps(child)
        )
        _ok(res)
    role = json.loads(_ok(control_plane.kubectl("get", "role", "--namespace", namespace, "-o", "json")))
    (rule,) = [r for item in role["items"] for r in item["rules"]]
    assert rule["resources"] == ["customizationjobs/status"] and rule["resourceNames"] == [name]


def _job_name() -> str:
    for doc in yaml.safe_load_all(EXAMPLE.read_text()):
        if doc and doc.get("kind") == "CustomizationJob":
            name: str = doc["metadata"]["name"]
            return name
    raise AssertionError(f"{EXAMPLE} has no CustomizationJob")


@pytest.mark.parametrize(
    ("rule", "grantable"),
    [
        ({"apiGroups": ["kubetune.io"], "resources": ["customizationjobs/status"], "verbs": ["get", "patch"]}, True),
        ({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}, False),
        ({"apiGroups": ["kubetune.io"], "resources": ["customizationjobs"], "verbs": ["delete"]}, False),
    ],
)
def test_operator_grants_only_what_it_holds(
    rule: dict[str, Any], grantable: bool, defaults: Install, control_plane: ControlPlane, namespace: str
) -> None:
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "probe", "namespace": namespace},
        "rules": [rule],
    }
    res = control_plane.kubectl("create", f"--as={defaults.service_account}", "-f", "-", stdin=json.dumps(role))
    if grantable:
        _ok(res)
    else:
        assert res.returncode != 0
        assert "attempting to grant RBAC permissions not currently held" in res.stderr, res.stderr


# --------------------------------------------------------------------------- webhook


def test_webhook_intercepts_only_the_watched_namespaces(webhook: Install, control_plane: ControlPlane) -> None:
    install = webhook
    (watched,) = install.values["namespaces"]
    job = json.dumps(JOB)
    # No operator serves the webhook here, and failurePolicy is Fail: a job in a watched
    # namespace is refused by the webhook call, one elsewhere goes through (CRD rules only).
    refused = control_plane.kubectl("create", "--namespace", watched, "-f", "-", stdin=job)
    assert refused.returncode != 0
    assert "validate.customizationjobs.kubetune.io" in refused.stderr, refused.stderr
    _ok(control_plane.kubectl("create", "--namespace", install.namespace, "-f", "-", stdin=job))
    _ok(control_plane.kubectl("delete", "customizationjob", JOB["metadata"]["name"], "--namespace", install.namespace))


# --------------------------------------------------------------------------- user roles


def _as(cp: ControlPlane, user: str, *args: str, stdin: str | None = None) -> tuple[int, str]:
    """kubectl as another user (the admin impersonates; RBAC judges the impersonated user)."""
    res = cp.kubectl(f"--as={user}", *args, stdin=stdin)
    return res.returncode, res.stdout + res.stderr


def _aggregated(cp: ControlPlane, role: str) -> bool:
    rules = (json.loads(_ok(cp.kubectl("get", "clusterrole", role, "-o", "json"))).get("rules")) or []
    return any("customizationjobs" in rule.get("resources", []) for rule in rules)


def test_a_namespace_editor_runs_jobs_there_and_nowhere_else(defaults: Install, control_plane: ControlPlane) -> None:
    """kubetune-edit/-view reach the built-in roles (the aggregation controller merges them), so
    a RoleBinding to `edit` in namespace A lets a user create and cancel jobs in A only."""
    cp = control_plane
    wait_for("kubetune-edit in edit/admin", lambda: _aggregated(cp, "edit") and _aggregated(cp, "admin"), 60)
    wait_for("kubetune-view in view", lambda: _aggregated(cp, "view"), 60)
    token = secrets.token_hex(3)
    team_a, team_b = f"e2e-team-a-{token}", f"e2e-team-b-{token}"
    editor, viewer = f"ann-{token}", f"vic-{token}"
    try:
        for namespace in (team_a, team_b):
            _ok(cp.kubectl("create", "namespace", namespace))
        _ok(cp.kubectl("create", "rolebinding", "editors", "--clusterrole=edit", f"--user={editor}", "-n", team_a))
        _ok(cp.kubectl("create", "rolebinding", "viewers", "--clusterrole=view", f"--user={viewer}", "-n", team_a))
        model = {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "Model",
            "metadata": {"name": "base"},
            "spec": {"source": {"pvc": {"claimName": "models"}}},
        }
        _ok(cp.kubectl("apply", "-n", team_b, "-f", "-", stdin=json.dumps(model)))

        # In A: create a job, read it, cancel (delete) it.
        code, out = _as(cp, editor, "create", "-n", team_a, "-f", "-", stdin=json.dumps(JOB))
        assert code == 0, out
        assert _as(cp, editor, "get", "ctj", "chart-e2e", "-n", team_a)[0] == 0
        code, out = _as(cp, editor, "create", "-n", team_a, "-f", "-", stdin=json.dumps({**model}))
        assert code == 0, out
        # Status is the operator's: an editor cannot forge it.
        code, out = _as(
            cp,
            editor,
            "patch",
            "ctj",
            "chart-e2e",
            "-n",
            team_a,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps({"status": {"phase": "Completed"}}),
        )
        assert code != 0 and "forbidden" in out.lower(), out
        code, out = _as(cp, editor, "delete", "ctj", "chart-e2e", "-n", team_a, "--wait=false")
        assert code == 0, out

        # In B: nothing, not even reading B's Model (it is not shared with A, and RBAC says no).
        code, out = _as(cp, editor, "create", "-n", team_b, "-f", "-", stdin=json.dumps(JOB))
        assert code != 0 and "forbidden" in out.lower(), out
        for action in (("get", "model", "base"), ("get", "models"), ("delete", "model", "base")):
            code, out = _as(cp, editor, *action, "-n", team_b)
            assert code != 0 and "forbidden" in out.lower(), (action, out)

        # A viewer of A reads jobs there and changes nothing.
        assert _as(cp, viewer, "get", "ctj", "-n", team_a)[0] == 0
        code, out = _as(cp, viewer, "create", "-n", team_a, "-f", "-", stdin=json.dumps(JOB))
        assert code != 0 and "forbidden" in out.lower(), out
    finally:
        for namespace in (team_a, team_b):
            cp.kubectl("delete", "namespace", namespace, "--wait=false", "--ignore-not-found")
