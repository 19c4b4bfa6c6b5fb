"""The e2e control plane is a real one: versions, CRD schemas, GC, namespaces, RBAC."""

from __future__ import annotations

import json
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .controlplane import ControlPlane, crd_files, pinned_version

pytestmark = pytest.mark.e2e

POLL_TIMEOUT_S = 90.0
HTTP_NOT_FOUND = 404


def _ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, f"{res.args}: rc={res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


def _poll(what: str, done: Callable[[], bool], timeout_s: float = POLL_TIMEOUT_S) -> float:
    """Poll until ``done()``; fail after ``timeout_s``. Returns the seconds it took."""
    start = time.monotonic()
    while not done():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)
    return time.monotonic() - start


def _pytorchjob(name: str, namespace: str, replicas: Any = 1) -> dict[str, Any]:
    """A PyTorchJob shaped like what the operator renders (1 master + 1 worker, 2 GPUs each)."""

    def replica(n: Any) -> dict[str, Any]:
        return {
            "replicas": n,
            "restartPolicy": "OnFailure",
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "pytorch",
                            "image": "ghcr.io/example/kubetune-trainer:0.1.0",
                            "command": ["python", "-m", "kubetune.trainer"],
                            "resources": {
                                "limits": {"nvidia.com/gpu": "2", "memory": "32Gi"},
                                "requests": {"cpu": "4"},
                            },
                        }
                    ]
                }
            },
        }

    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "nprocPerNode": "2",
            "runPolicy": {"backoffLimit": 3, "suspend": True, "cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": {"Master": replica(replicas), "Worker": replica(1)},
        },
    }


def test_apiserver_reports_pinned_version(control_plane: ControlPlane) -> None:
    want = pinned_version()  # e.g. v1.37.2, from tools/controlplane/go.mod
    ctx = ssl.create_default_context(cafile=str(control_plane.ca_path))
    req = urllib.request.Request(
        f"{control_plane.server}/version",
        headers={"Authorization": f"Bearer {control_plane.admin_token}"},
    )
    with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
        info = json.load(resp)
    major, minor = want.removeprefix("v").split(".")[:2]
    assert (info["gitVersion"], info["major"], info["minor"]) == (want, major, minor)
    server = json.loads(_ok(control_plane.kubectl("version", "-o", "json")))["serverVersion"]
    assert server["gitVersion"] == want


def test_crds_are_installed_and_established(control_plane: ControlPlane) -> None:
    names = _ok(control_plane.kubectl("get", "crds", "-o", "name")).split()
    assert "customresourcedefinition.apiextensions.k8s.io/pytorchjobs.kubeflow.org" in names
    for f in crd_files():  # crds/*.yaml of the project too, whatever is there
        for obj in _ok(control_plane.kubectl("get", "-f", str(f), "-o", "name")).split():
            if obj.startswith("customresourcedefinition"):
                est = control_plane.kubectl(
                    "get",
                    obj,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type=='Established')].status}",
                )
                assert _ok(est) == "True", obj


def test_operator_shaped_pytorchjob_is_accepted(control_plane: ControlPlane, namespace: str) -> None:
    job = _pytorchjob("ok", namespace)
    _ok(control_plane.kubectl("create", "--validate=false", "-f", "-", stdin=json.dumps(job)))
    got = json.loads(_ok(control_plane.kubectl("get", "pytorchjob", "ok", "-n", namespace, "-o", "json")))
    # Nothing was pruned: the real schema knows every field the operator sets.
    spec = got["spec"]
    assert spec["nprocPerNode"] == "2"
    assert spec["runPolicy"]["suspend"] is True
    assert spec["runPolicy"]["backoffLimit"] == job["spec"]["runPolicy"]["backoffLimit"]
    for role in ("Master", "Worker"):
        rs = spec["pytorchReplicaSpecs"][role]
        assert rs["replicas"] == 1
        (container,) = rs["template"]["spec"]["containers"]
        assert container["name"] == "pytorch"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_invalid_pytorchjob_is_refused_by_the_schema(control_plane: ControlPlane, namespace: str) -> None:
    bad = _pytorchjob("bad", namespace, replicas="one")
    # --validate=false: kubectl checks nothing itself, so the refusal is the apiserver's.
    res = control_plane.kubectl("create", "--validate=false", "-f", "-", stdin=json.dumps(bad))
    assert res.returncode != 0, res.stdout
    assert "spec.pytorchReplicaSpecs.Master.replicas" in res.stderr, res.stderr
    assert "must be of type integer" in res.stderr, res.stderr
    gone = control_plane.kubectl("get", "pytorchjob", "bad", "-n", namespace)
    assert gone.returncode != 0
    assert "NotFound" in gone.stderr, gone.stderr


def test_owned_configmap_is_garbage_collected(control_plane: ControlPlane, namespace: str) -> None:
    conf = client.Configuration(
        host=control_plane.server, api_key={"authorization": f"Bearer {control_plane.admin_token}"}
    )
    conf.ssl_ca_cert = str(control_plane.ca_path)
    api = client.CoreV1Api(client.ApiClient(conf))
    owner = api.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner")))
    assert owner.metadata is not None
    ref = client.V1OwnerReference(api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid)
    api.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(metadata=client.V1ObjectMeta(name="dependent", owner_references=[ref])),
    )
    time.sleep(2)  # the GC must not touch a dependent whose owner exists
    assert api.read_namespaced_config_map("dependent", namespace).metadata is not None

    api.delete_namespaced_config_map("owner", namespace)

    def dependent_gone() -> bool:
        try:
            api.read_namespaced_config_map("dependent", namespace)
        except ApiException as exc:
            if exc.status == HTTP_NOT_FOUND:
                return True
            raise
        return False

    _poll("garbage collection of the dependent ConfigMap", dependent_gone)


def test_namespace_deletion_completes(control_plane: ControlPlane) -> None:
    ns = "e2e-doomed"
    _ok(control_plane.kubectl("create", "namespace", ns))
    _ok(control_plane.kubectl("create", "configmap", "content", "-n", ns, "--from-literal=a=b"))
    # The serviceaccount controller gives every namespace its `default` ServiceAccount.
    _poll(
        "serviceaccount default in the new namespace",
        lambda: control_plane.kubectl("get", "serviceaccount", "default", "-n", ns).returncode == 0,
    )
    _ok(control_plane.kubectl("delete", "namespace", ns, "--wait=false"))

    def gone() -> bool:
        res = control_plane.kubectl("get", "namespace", ns)
        if res.returncode == 0:
            return False
        assert "NotFound" in res.stderr, res.stderr
        return True

    _poll(f"namespace {ns} to be deleted", gone)


def test_unprivileged_user_is_forbidden(control_plane: ControlPlane, namespace: str) -> None:
    whoami = json.loads(_ok(control_plane.user_kubectl("auth", "whoami", "-o", "json")))
    assert whoami["status"]["userInfo"]["username"] == "e2e-user"  # authenticated, not anonymous
    res = control_plane.user_kubectl("get", "configmaps", "-n", namespace)
    assert res.returncode != 0
    assert "Forbidden" in res.stderr, res.stderr
    assert 'User "e2e-user" cannot list resource "configmaps"' in res.stderr, res.stderr
    can_i = control_plane.user_kubectl("auth", "can-i", "create", "pytorchjobs")
    assert (can_i.returncode, can_i.stdout) == (1, "no\n"), can_i  # exit 1 means "no"
    # The admin token can (system:masters): RBAC is what tells them apart.
    _ok(control_plane.kubectl("get", "configmaps", "-n", namespace))


def test_helm_is_built_and_reaches_the_apiserver(control_plane: ControlPlane) -> None:
    helm = str(control_plane.bin_dir / "helm")
    version = subprocess.run([helm, "version", "--short"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("v4."), version.stdout
    res = subprocess.run(
        [
            helm,
            "list",
            "--all-namespaces",
            "-o",
            "json",
            f"--kubeconfig={control_plane.kubeconfig}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == []
