"""What a one-node cluster needs besides its node to run kubetune: cluster DNS (CoreDNS),
storage for PersistentVolumeClaims, the Kubeflow training-operator, and kubetune itself
installed by its Helm chart.

Each is the real component, run as pods from its own (or, for CoreDNS, the usual)
manifests, with images imported into the node's containerd (``images.py``).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from .controlplane import REPO_ROOT, ClusterNetwork, ControlPlane
from .images import Image, static_image_archive
from .node import SANDBOX_IMAGE
from .procs import ControlPlaneError

COREDNS_VERSION = "v1.14.7"  # keep in step with tools/node/build.sh
TRAINING_OPERATOR_VERSION = "v1.9.3"
READY_TIMEOUT_S = 300.0
STORAGE_CLASS = "kubetune-local"
CHART = REPO_ROOT / "charts" / "kubetune"


def apply(cp: ControlPlane, objects: list[dict[str, Any]] | str) -> None:
    """Server-side apply (big CRDs exceed client-side apply's annotation limit)."""
    text = objects if isinstance(objects, str) else "\n---\n".join(yaml.safe_dump(o) for o in objects)
    res = cp.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=text, timeout=120)
    if res.returncode != 0:
        raise ControlPlaneError(f"kubectl apply failed: {res.stderr.strip()}")


def wait_rollout(cp: ControlPlane, namespace: str, deployment: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Wait until the Deployment's pods are ready; on timeout say what its pods are doing."""
    res = cp.kubectl(
        "rollout", "status", f"deployment/{deployment}", "-n", namespace, f"--timeout={int(timeout_s)}s",
        timeout=timeout_s + 30,
    )  # fmt: skip
    if res.returncode != 0:
        pods = cp.kubectl("get", "pods", "-n", namespace, "-o", "wide").stdout
        events = cp.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp").stdout
        logs = cp.kubectl("logs", "-n", namespace, f"deployment/{deployment}", "--tail=30").stdout
        raise ControlPlaneError(
            f"deployment {namespace}/{deployment} not ready: {res.stderr.strip()}\n{pods}\n{events[-3000:]}\n{logs}"
        )


# --------------------------------------------------------------------------- images


BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static
# The worker init container's template (the training-operator reads it from
# /etc/config/initContainer.yaml): upstream's, plus the securityContext that Pod Security
# `restricted` requires, and success is an answer in any search domain (busybox 1.35's
# nslookup exits 1 when one search domain has no answer even after another had it).
INIT_CONTAINER_TEMPLATE = REPO_ROOT / "docs" / "training-operator-init-container.yaml"
"""The worker init container's template, as docs/security-and-names.md gives it to cluster admins."""


def node_images(node_bin: Path, out_dir: Path) -> dict[str, Image]:
    """The pause, CoreDNS and training-operator images, each one static binary, and the
    training-operator's worker init container (busybox: `sh`, `nslookup` until the master's
    Service resolves; upstream pulls alpine for it)."""
    if not BUSYBOX.is_file():
        raise ControlPlaneError(f"{BUSYBOX} is missing: apt-get install busybox-static (scripts/system-deps.sh)")
    applets = ("sh", "seq", "sleep", "echo", "grep")
    return {
        "pause": static_image_archive(
            SANDBOX_IMAGE.rsplit(":", 1)[0], SANDBOX_IMAGE.rsplit(":", 1)[1], node_bin / "pause", out_dir,
            entrypoint=["/pause"], user="65535:65535",
        ),
        "coredns": static_image_archive(
            "localhost/kubetune/coredns", COREDNS_VERSION, node_bin / "coredns", out_dir, entrypoint=["/coredns"],
        ),
        # The upstream image is distroless `nonroot` with the binary at /manager.
        "training-operator": static_image_archive(
            "localhost/kubetune/training-operator", TRAINING_OPERATOR_VERSION, node_bin / "training-operator",
            out_dir, entrypoint=["/manager"], user="65532:65532",
        ),
        "pytorch-init": static_image_archive(
            "localhost/kubetune/pytorch-init", "busybox-1.35", BUSYBOX, out_dir, entrypoint=["/bin/busybox"],
            links={f"/bin/{applet}": "busybox" for applet in applets},
        ),
    }  # fmt: skip


# --------------------------------------------------------------------------- DNS


def install_coredns(cp: ControlPlane, network: ClusterNetwork, image: str) -> None:
    """CoreDNS behind the Service address the kubelet gives pods as their nameserver."""
    corefile = f"""\
.:53 {{
    errors
    health {{
        lameduck 5s
    }}
    ready
    kubernetes {network.cluster_domain} in-addr.arpa ip6.arpa {{
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 30
    }}
    forward . /etc/resolv.conf
    cache 30
}}
"""
    labels = {"k8s-app": "kube-dns"}
    meta = {"name": "coredns", "namespace": "kube-system"}
    apply(
        cp,
        [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": "system:coredns"},
                "rules": [
                    {
                        "apiGroups": [""],
                        "resources": ["endpoints", "services", "pods", "namespaces"],
                        "verbs": ["list", "watch"],
                    },
                    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
                ],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": "system:coredns"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
                "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}],
            },
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"Corefile": corefile}},
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": meta,
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {
                            "serviceAccountName": "coredns",
                            "dnsPolicy": "Default",  # resolve upstream names with the node's resolver
                            "containers": [
                                {
                                    "name": "coredns",
                                    "image": image,
                                    "imagePullPolicy": "Never",
                                    "args": ["-conf", "/etc/coredns/Corefile"],
                                    "ports": [
                                        {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                                        {"name": "dns-tcp", "containerPort": 53, "protocol": "TCP"},
                                    ],
                                    "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 2},
                                    "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns"}],
                                    "securityContext": {
                                        "allowPrivilegeEscalation": False,
                                        "readOnlyRootFilesystem": True,
                                        "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
                                    },
                                }
                            ],
                            "volumes": [{"name": "config", "configMap": {"name": "coredns"}}],
                        },
                    },
                },
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": labels},
                "spec": {
                    "clusterIP": network.dns_ip,
                    "selector": labels,
                    "ports": [
                        {"name": "dns", "port": 53, "protocol": "UDP"},
                        {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                    ],
                },
            },
        ],
    )
    wait_rollout(cp, "kube-system", "coredns")


# --------------------------------------------------------------------------- storage


def install_storage(cp: ControlPlane, volumes_dir: Path, count: int) -> None:
    """A default StorageClass backed by ``count`` pre-made host-directory PersistentVolumes.

    Binding is real (the controller manager's PV binder matches claims to volumes once a
    pod is scheduled, ``WaitForFirstConsumer``); provisioning is done ahead, here. hostPath
    volumes do not get the pod's fsGroup, so each directory is world-writable, as a
    local-path provisioner makes them.
    """
    objects: list[dict[str, Any]] = [
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": STORAGE_CLASS,
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
            },
            "provisioner": "kubernetes.io/no-provisioner",
            "volumeBindingMode": "WaitForFirstConsumer",
            "reclaimPolicy": "Retain",
        }
    ]
    for i in range(count):
        path = volumes_dir / f"pv-{i:03d}"
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o777)
        objects.append(_host_volume(f"kubetune-pv-{i:03d}", path, STORAGE_CLASS))
    apply(cp, objects)


def _host_volume(name: str, path: Path, storage_class: str, claim: tuple[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        # hostPath does not enforce a size; this is the most any claim here asks for.
        "capacity": {"storage": "1Ti"},
        "accessModes": ["ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany"],
        "persistentVolumeReclaimPolicy": "Retain",
        "storageClassName": storage_class,
        "hostPath": {"path": str(path), "type": "Directory"},
    }
    if claim is not None:
        spec["claimRef"] = {"namespace": claim[0], "name": claim[1]}
    return {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name}, "spec": spec}


def claim_for_directory(cp: ControlPlane, namespace: str, claim: str, path: Path) -> None:
    """A claim bound to a volume on ``path`` (pre-filled data: a model, a dataset), the
    way an administrator binds an existing volume: the PV's claimRef names the claim."""
    volume = f"{namespace}-{claim}"[:63].rstrip("-")
    apply(
        cp,
        [
            _host_volume(volume, path, "", claim=(namespace, claim)),
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim, "namespace": namespace},
                "spec": {
                    "storageClassName": "",
                    "volumeName": volume,
                    "accessModes": ["ReadOnlyMany"],
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            },
        ],
    )


def claim_host_path(cp: ControlPlane, namespace: str, claim: str) -> Path:
    """The host directory behind a bound claim (to check what a pod wrote there)."""
    pvc = json.loads(cp.kubectl("get", "pvc", claim, "-n", namespace, "-o", "json", check=True).stdout)
    volume = pvc["spec"].get("volumeName")
    if not volume:
        raise AssertionError(f"claim {namespace}/{claim} is not bound: {pvc.get('status')}")
    pv = json.loads(cp.kubectl("get", "pv", volume, "-o", "json", check=True).stdout)
    return Path(pv["spec"]["hostPath"]["path"])


# --------------------------------------------------------------------------- training-operator


def install_training_operator(cp: ControlPlane, node_bin: Path, workdir: Path, image: str, init_image: str) -> None:
    """The Kubeflow training-operator from its own manifests (``overlays/standalone``:
    namespace ``kubeflow``, its webhook and the certificate Secret it rotates itself), with
    the locally built image, the local worker init image and only the PyTorchJob controller."""
    base = workdir / "training-operator"
    shutil.rmtree(base, ignore_errors=True)
    shutil.copytree(node_bin / "training-operator-manifests", base / "manifests")
    overlay = base / "kubetune"
    overlay.mkdir()
    repository, tag = image.rsplit(":", 1)
    (overlay / "initContainer.yaml").write_text(INIT_CONTAINER_TEMPLATE.read_text())
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": "kubeflow",
                "resources": ["../manifests/overlays/standalone"],
                "configMapGenerator": [
                    {
                        "name": "pytorch-init-container",
                        "files": ["initContainer.yaml"],
                        "options": {"disableNameSuffixHash": True},
                    }
                ],
                "images": [
                    {"name": "ghcr.io/kubeflow/training-v1/training-operator", "newName": repository, "newTag": tag}
                ],
                "patches": [
                    {
                        "target": {"kind": "Deployment", "name": "training-operator"},
                        "patch": yaml.safe_dump(
                            [
                                # Only PyTorchJob: the other schemes' CRDs would be waited for.
                                {
                                    "op": "add",
                                    "path": "/spec/template/spec/containers/0/args",
                                    "value": [
                                        "--enable-scheme=pytorchjob",
                                        f"--pytorch-init-container-image={init_image}",
                                    ],
                                },
                                {
                                    "op": "add",
                                    "path": "/spec/template/spec/containers/0/imagePullPolicy",
                                    "value": "Never",
                                },
                                {
                                    "op": "add",
                                    "path": "/spec/template/spec/volumes/-",
                                    "value": {
                                        "name": "init-container",
                                        "configMap": {"name": "pytorch-init-container"},
                                    },
                                },
                                {
                                    "op": "add",
                                    "path": "/spec/template/spec/containers/0/volumeMounts/-",
                                    "value": {"name": "init-container", "mountPath": "/etc/config", "readOnly": True},
                                },
                            ]
                        ),
                    }
                ],
            }
        )
    )
    res = cp.kubectl("kustomize", str(overlay), timeout=120)
    if res.returncode != 0:
        raise ControlPlaneError(f"kubectl kustomize {overlay} failed: {res.stderr.strip()}")
    apply(cp, res.stdout)
    wait_rollout(cp, "kubeflow", "training-operator")


# --------------------------------------------------------------------------- kubetune


def install_kubetune(
    cp: ControlPlane, operator_image: str, trainer_image: str, *, release: str = "kubetune",
    namespace: str = "kubetune-system", extra_values: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    """``helm install`` the chart with the locally built images: the operator runs as a pod
    under the chart's own ServiceAccount and RBAC."""
    op_repo, op_tag = operator_image.rsplit(":", 1)
    tr_repo, tr_tag = trainer_image.rsplit(":", 1)
    values = {
        "image": {"repository": op_repo, "tag": op_tag, "pullPolicy": "Never"},
        "trainer": {"image": {"repository": tr_repo, "tag": tr_tag, "pullPolicy": "Never"}},
        **(extra_values or {}),
    }
    values_file = cp.workdir / f"helm-values-{release}.yaml"
    values_file.write_text(yaml.safe_dump(values))
    res = cp.helm(
        "install", release, str(CHART), "--namespace", namespace, "--create-namespace", "-f", str(values_file)
    )
    if res.returncode != 0:
        raise ControlPlaneError(f"helm install failed: {res.stderr.strip()}")
    deployments = json.loads(cp.kubectl("get", "deployments", "-n", namespace, "-o", "json", check=True).stdout)[
        "items"
    ]
    for deployment in deployments:
        wait_rollout(cp, namespace, deployment["metadata"]["name"])


def wait_for(predicate: Any, timeout_s: float, what: str, interval_s: float = 1.0) -> Any:
    """Poll ``predicate()`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def stage_examples(cp: ControlPlane, namespace: str = "default") -> None:
    """Claims for ``examples/cluster-quickstart.yaml``: ``kubetune-models`` (the SmolLM2
    folder that scripts/setup.sh converted) and ``kubetune-data`` (examples/data), bound
    read-only to those host folders."""
    from tests.fixtures.smollm2 import target_folder

    models = target_folder().parent
    if not models.is_dir():
        raise ControlPlaneError(f"{models} is missing: run scripts/setup.sh (it converts SmolLM2 there)")
    claim_for_directory(cp, namespace, "kubetune-models", models)
    claim_for_directory(cp, namespace, "kubetune-data", REPO_ROOT / "examples" / "data")
