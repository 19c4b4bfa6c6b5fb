"""Render a validated CustomizationJob into the child objects the operator creates.

Pure: a `JobInput` (the parsed spec, its layout and the sources of the objects it names)
in, a list of manifests out. Names are deterministic, so creating them again after an
operator restart finds the existing objects instead of duplicating them, and every child
carries an owner reference, so deleting the job garbage-collects them.

Children: a ServiceAccount + Role + RoleBinding that let the trainer patch only its own
job's status (progress), a PersistentVolumeClaim for checkpoints and the result (unless
the job names one), a ConfigMap with the resolved trainer config, and either a Kubeflow
`PyTorchJob` (automodel) or a `batch/v1` Job (unsloth).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from kubetune.api.common import GROUP_VERSION
from kubetune.api.resources import DATA_FILE_SUFFIXES, CustomizationJobSpec, Source
from kubetune.api.unsloth import UnslothSpec
from kubetune.planning.gpus import GPUS_ASSIGNED_BY_NODE, UNSLOTH_GPUS
from kubetune.planning.layout import Layout
from kubetune.planning.names import ChildNames as ChildNames  # the handlers find children by these
from kubetune.planning.resolved import (
    MOUNT_CONFIG,
    MOUNT_MODEL,
    MOUNT_OUTPUT,
    MOUNT_TEACHER,
    MOUNT_TRAINING,
    MOUNT_VALIDATION,
    JobIdentity,
    ResolvedJob,
    ResolvedPaths,
    resolve,
)
from kubetune.planning.tracking import hub_token_env, secret_env

PROGRESS_FILE = "progress.jsonl"
CONTAINER = "pytorch"  # the training-operator finds the training container by this name
RUN_AS_USER = 1000


Quantity = Annotated[str, BeforeValidator(lambda amount: str(amount) if isinstance(amount, int | float) else amount)]
"""A Kubernetes quantity (`4`, `16Gi`, `500m`); JSON numbers are taken as written."""


class TrainerPods(BaseModel):
    """How the operator shapes every trainer pod, whatever the job (the operator's settings,
    from the Helm values; handlers/settings.py reads them from the environment)."""

    model_config = ConfigDict(frozen=True)

    image: str = "ghcr.io/kubetune/trainer:0.1.0"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    gpu_resource: str = "nvidia.com/gpu"
    """The extended resource a node advertises its GPUs as (the device plugin's name)."""
    backoff_limit: int = Field(3, ge=0)
    """Pod restarts before the job fails; each restart resumes from the newest checkpoint."""
    progress_interval_seconds: float = Field(10.0, gt=0)
    """How often the trainer patches status.progress (NeMo throttles to 10 s too)."""
    shm_size: str = "8Gi"
    """/dev/shm for NCCL and data loader workers (the container default of 64 Mi is too small)."""
    resources: dict[Literal["requests", "limits"], dict[str, Quantity]] = {}
    """CPU/memory ``requests`` and ``limits`` of every training container; the GPUs are added per job."""


@dataclass(frozen=True)
class JobInput:
    name: str
    namespace: str
    uid: str
    spec: CustomizationJobSpec
    layout: Layout
    sources: dict[str, Source] = field(default_factory=dict)
    """Source of each resolved reference by role: model, teacher, training, validation."""


# --------------------------------------------------------------------------- mounts


@dataclass(frozen=True)
class Mount:
    role: str
    source: Source
    mount_point: str

    @property
    def is_file(self) -> bool:
        path = self._source_path()
        return path is not None and path.endswith(DATA_FILE_SUFFIXES)

    def _source_path(self) -> str | None:
        if self.source.pvc is not None:
            return self.source.pvc.path
        if self.source.hostPath is not None:
            return self.source.hostPath.path
        return None

    @property
    def local_path(self) -> str:
        """What the trainer reads: the mount point (plus the file name), or the hub URI."""
        if self.source.uri is not None:
            return self.source.uri
        path = self._source_path() or "/"
        return f"{self.mount_point}/{PurePosixPath(path).name}" if self.is_file else self.mount_point

    def volume(self) -> dict[str, Any] | None:
        if self.source.pvc is not None:
            return {
                "name": self.role,
                "persistentVolumeClaim": {"claimName": self.source.pvc.claimName, "readOnly": True},
            }
        if self.source.hostPath is not None:
            return {"name": self.role, "hostPath": {"path": self.source.hostPath.path}}
        return None

    def volume_mount(self) -> dict[str, Any] | None:
        if self.source.uri is not None:
            return None
        mount: dict[str, Any] = {"name": self.role, "mountPath": self.local_path, "readOnly": True}
        if self.source.pvc is not None and self.source.pvc.path.strip("/"):
            mount["subPath"] = self.source.pvc.path.strip("/")
        return mount


_MOUNT_POINTS = {
    "model": MOUNT_MODEL,
    "teacher": MOUNT_TEACHER,
    "training": MOUNT_TRAINING,
    "validation": MOUNT_VALIDATION,
}


def _mounts(job: JobInput) -> list[Mount]:
    return [Mount(role, job.sources[role], point) for role, point in _MOUNT_POINTS.items() if role in job.sources]


# --------------------------------------------------------------------------- children


def resolved_config(job: JobInput) -> ResolvedJob:
    """The trainer's config with in-pod paths."""
    mounts = {mount.role: mount.local_path for mount in _mounts(job)}
    backend = job.spec.backend
    section = job.spec.automodel if backend == "automodel" else job.spec.unsloth
    assert section is not None, "render needs a validated job"
    return resolve(
        section,
        job.layout,
        JobIdentity(name=job.name, namespace=job.namespace, uid=job.uid),
        ResolvedPaths(
            model=mounts["model"],
            teacher_model=mounts.get("teacher"),
            training=mounts["training"],
            validation=mounts.get("validation"),
            output=MOUNT_OUTPUT,
        ),
    )


def render_children(job: JobInput, pods: TrainerPods | None = None) -> list[dict[str, Any]]:
    """Every child object of a job, in creation order."""
    pods = pods or TrainerPods()
    names = ChildNames(job.name)
    config = resolved_config(job)
    children = [
        _service_account(job, names),
        _role(job, names),
        _role_binding(job, names),
    ]
    storage = job.spec.storage
    if storage is None or storage.claimName is None:
        children.append(_output_claim(job, names))
    children.append(_config_map(job, names, config))
    if job.spec.backend == "automodel":
        children.append(_pytorch_job(job, names, pods))
    else:
        children.append(_batch_job(job, names, pods))
    return children


def owner_reference(job: JobInput) -> dict[str, Any]:
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "CustomizationJob",
        "name": job.name,
        "uid": job.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels(job: JobInput) -> dict[str, str]:
    result = {
        "app.kubernetes.io/name": "kubetune-trainer",
        "app.kubernetes.io/managed-by": "kubetune",
        "kubetune.io/job": job.name,
    }
    scheduling = job.spec.scheduling
    if scheduling is not None and scheduling.queueName:
        result["kueue.x-k8s.io/queue-name"] = scheduling.queueName
    return result


def _metadata(job: JobInput, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": job.namespace, "labels": labels(job), "ownerReferences": [owner_reference(job)]}


def _service_account(job: JobInput, names: ChildNames) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _metadata(job, names.service_account)}


def _role(job: JobInput, names: ChildNames) -> dict[str, Any]:
    # The trainer may read and patch the status of its own job, and nothing else.
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(job, names.role),
        "rules": [
            {
                "apiGroups": [GROUP_VERSION.split("/")[0]],
                "resources": ["customizationjobs/status"],
                "resourceNames": [job.name],
                "verbs": ["get", "patch"],
            }
        ],
    }


def _role_binding(job: JobInput, names: ChildNames) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(job, names.role),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": names.role},
        "subjects": [{"kind": "ServiceAccount", "name": names.service_account, "namespace": job.namespace}],
    }


def _output_claim(job: JobInput, names: ChildNames) -> dict[str, Any]:
    storage = job.spec.storage
    # Every node of a multi-node job writes its shard of each checkpoint.
    multi_node = job.spec.automodel is not None and job.spec.automodel.parallelism.num_nodes > 1
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteMany" if multi_node else "ReadWriteOnce"],
        "resources": {"requests": {"storage": storage.size if storage else "100Gi"}},
    }
    if storage is not None and storage.storageClassName:
        spec["storageClassName"] = storage.storageClassName
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _metadata(job, names.output_claim),
        "spec": spec,
    }


def _config_map(job: JobInput, names: ChildNames, config: ResolvedJob) -> dict[str, Any]:
    body = json.dumps(config.model_dump(mode="json"), indent=2, sort_keys=True)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, names.config_map),
        "data": {PurePosixPath(MOUNT_CONFIG).name: body},
    }


def _pod_template(
    job: JobInput, names: ChildNames, pods: TrainerPods, gpus: int, command: list[str], restart_policy: str
) -> dict[str, Any]:
    storage = job.spec.storage
    output_claim = storage.claimName if storage and storage.claimName else names.output_claim
    output_mount: dict[str, Any] = {"name": "output", "mountPath": MOUNT_OUTPUT}
    if storage is not None and storage.claimName:
        output_mount["subPath"] = f"{job.namespace}/{job.name}"
    mounts = _mounts(job)
    volumes = [
        {"name": "config", "configMap": {"name": names.config_map}},
        {"name": "output", "persistentVolumeClaim": {"claimName": output_claim}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": pods.shm_size}},
        *(v for v in (m.volume() for m in mounts) if v is not None),
    ]
    volume_mounts = [
        {"name": "config", "mountPath": str(PurePosixPath(MOUNT_CONFIG).parent), "readOnly": True},
        output_mount,
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": "/cache"},
        {"name": "dshm", "mountPath": "/dev/shm"},
        *(vm for vm in (m.volume_mount() for m in mounts) if vm is not None),
    ]
    env = [
        {"name": "KUBETUNE_JOB_NAME", "value": job.name},
        {"name": "KUBETUNE_JOB_NAMESPACE", "value": job.namespace},
        {"name": "KUBETUNE_PROGRESS", "value": "kubernetes"},
        {"name": "KUBETUNE_PROGRESS_INTERVAL", "value": str(pods.progress_interval_seconds)},
        # Every progress event, one JSON line each, next to the checkpoints: the loss curve
        # outlives the pod (status.progress holds only the newest values).
        {"name": "KUBETUNE_PROGRESS_FILE", "value": f"{MOUNT_OUTPUT}/{PROGRESS_FILE}"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": "/cache"},
        {"name": "HF_HOME", "value": "/cache/huggingface"},
        {"name": "TRITON_CACHE_DIR", "value": "/cache/triton"},
        {"name": GPUS_ASSIGNED_BY_NODE, "value": "1"},  # hardware.gpus indices do not apply in a pod
        *secret_env(job.spec, job.namespace),
        *hub_token_env(job.sources),  # tracking credentials, never in the ConfigMap
    ]
    resources = {kind: dict(amounts) for kind, amounts in pods.resources.items() if amounts}
    if gpus:
        resources["limits"] = {**resources.get("limits", {}), pods.gpu_resource: str(gpus)}
    pod_spec: dict[str, Any] = {
        "serviceAccountName": names.service_account,
        "restartPolicy": restart_policy,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": CONTAINER,
                "image": pods.image,
                "imagePullPolicy": pods.image_pull_policy,
                "command": command,
                "env": env,
                "resources": resources,
                "volumeMounts": volume_mounts,
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
        ],
        "volumes": volumes,
    }
    scheduling = job.spec.scheduling
    if scheduling is not None:
        if scheduling.nodeSelector:
            pod_spec["nodeSelector"] = dict(scheduling.nodeSelector)
        if scheduling.tolerations:
            pod_spec["tolerations"] = [t.model_dump(exclude_none=True) for t in scheduling.tolerations]
        if scheduling.priorityClassName:
            pod_spec["priorityClassName"] = scheduling.priorityClassName
    return {"metadata": {"labels": labels(job)}, "spec": pod_spec}


def _pytorch_job(job: JobInput, names: ChildNames, pods: TrainerPods) -> dict[str, Any]:
    section = job.spec.automodel
    assert section is not None
    parallelism = section.parallelism
    # torchrun takes --nnodes, --node_rank, --master_addr/port and --nproc_per_node from the
    # PET_* variables the training-operator injects into every replica.
    command = ["torchrun", "-m", "kubetune_trainer", "--config", MOUNT_CONFIG]
    template = _pod_template(job, names, pods, parallelism.num_gpus_per_node, command, "OnFailure")
    replica_specs: dict[str, Any] = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": template}}
    if parallelism.num_nodes > 1:
        replica_specs["Worker"] = {
            "replicas": parallelism.num_nodes - 1,
            "restartPolicy": "OnFailure",
            "template": template,
        }
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _metadata(job, names.workload),
        "spec": {
            "nprocPerNode": str(parallelism.num_gpus_per_node),
            "runPolicy": {
                "backoffLimit": pods.backoff_limit,
                "suspend": job.spec.suspend,
                "cleanPodPolicy": "None",
            },
            "pytorchReplicaSpecs": replica_specs,
        },
    }


def unsloth_gpu_count(section: UnslothSpec) -> int:
    """GPUs to request: one, whatever hardware.gpus lists (kubetune.planning.gpus)."""
    return UNSLOTH_GPUS


def _batch_job(job: JobInput, names: ChildNames, pods: TrainerPods) -> dict[str, Any]:
    section = job.spec.unsloth
    assert section is not None
    command = ["python", "-m", "kubetune_trainer", "--config", MOUNT_CONFIG]
    template = _pod_template(job, names, pods, unsloth_gpu_count(section), command, "Never")
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(job, names.workload),
        "spec": {
            "backoffLimit": pods.backoff_limit,
            "suspend": job.spec.suspend,
            "completions": 1,
            "parallelism": 1,
            "template": template,
        },
    }
