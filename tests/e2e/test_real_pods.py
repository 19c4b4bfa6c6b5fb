"""Jobs that train in real pods: `kubectl apply` → the operator (a pod from the chart, under
the chart's own ServiceAccount) → the PyTorchJob or Job → the training-operator or the job
controller → the kubelet runs the trainer image under the rendered securityContext → the
trainer patches `status.progress` with its own token → `Completed` → the output Model, its
files on the output claim.

Nothing here writes a pod, Job or PyTorchJob status: only the kubelet, the controllers, the
operator and the trainer do. There are no GPUs; the node advertises `nvidia.com/gpu` and the
trainer runs on CPU (gloo) inside the pod.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures import tiny_models

from .addons import claim_for_directory, claim_host_path
from .cluster import Cluster

pytestmark = pytest.mark.e2e

JOB_TIMEOUT_S = 900.0
TERMINAL = {"Completed", "Failed", "Cancelled"}


def _inputs(cluster: Cluster, namespace: str) -> Path:
    """A tiny model and a tiny dataset in a host directory, bound to claim ``inputs`` (the
    way an administrator exposes existing data), readable by the trainer's uid 1000."""
    folder = cluster.workdir / "inputs" / namespace
    tiny_models.build_model(folder / "model")
    tiny_models.write_jsonl(folder / "train.jsonl", tiny_models.task_rows(64))
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    claim_for_directory(cluster.cp, namespace, "inputs", folder)
    return folder


def _references(namespace: str) -> list[dict[str, Any]]:
    meta = {"namespace": namespace}
    return [
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "Model",
            "metadata": {"name": "tiny", **meta},
            "spec": {"source": {"pvc": {"claimName": "inputs", "path": "model"}}, "tokenizer": "tiny-bpe"},
        },
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FileSet",
            "metadata": {"name": "train", **meta},
            "spec": {"source": {"pvc": {"claimName": "inputs", "path": "train.jsonl"}}},
        },
    ]


def _job(namespace: str, name: str, backend: str, section: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "CustomizationJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {backend: section},
    }


def _apply(cluster: Cluster, objects: list[dict[str, Any]]) -> None:
    text = "\n---\n".join(yaml.safe_dump(o) for o in objects)
    res = cluster.kubectl("apply", "-f", "-", stdin=text)
    assert res.returncode == 0, res.stderr


def _get(cluster: Cluster, kind: str, namespace: str, name: str) -> dict[str, Any]:
    res = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json")
    assert res.returncode == 0, res.stderr
    obj: dict[str, Any] = json.loads(res.stdout)
    return obj


def _diagnostics(cluster: Cluster, namespace: str) -> str:
    """What a user would look at when a job does not finish: pods, events, trainer logs."""
    parts = [
        cluster.kubectl("get", "ctj,pytorchjobs,jobs,pods,pvc", "-n", namespace, "-o", "wide").stdout,
        cluster.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp").stdout[-4000:],
        cluster.kubectl("logs", "-n", namespace, "-l", "kubetune.io/job", "--tail=60", "--all-containers").stdout,
        cluster.kubectl("logs", "-n", cluster.operator_namespace, "deployment/kubetune", "--tail=40").stdout,
    ]
    return "\n".join(parts)


def _wait_terminal(cluster: Cluster, namespace: str, name: str) -> tuple[dict[str, Any], list[str]]:
    """Wait for a terminal phase; also return every phase seen on the way."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    phases: list[str] = []
    while True:
        job = _get(cluster, "customizationjob", namespace, name)
        phase = (job.get("status") or {}).get("phase", "")
        if phase and (not phases or phases[-1] != phase):
            phases.append(phase)
        if phase in TERMINAL:
            return job, phases
        if time.monotonic() > deadline:
            pytest.fail(f"job {name} still {phase or 'without status'} after {JOB_TIMEOUT_S:.0f} s\n"
                        f"{_diagnostics(cluster, namespace)}")  # fmt: skip
        time.sleep(2)


def _trainer_pods(cluster: Cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    res = cluster.kubectl("get", "pods", "-n", namespace, "-l", f"kubetune.io/job={name}", "-o", "json")
    assert res.returncode == 0, res.stderr
    pods: list[dict[str, Any]] = json.loads(res.stdout)["items"]
    return pods


def _assert_ran_as_rendered(pod: dict[str, Any]) -> None:
    """The kubelet ran the container as rendered: non-root uid 1000, read-only root."""
    assert pod["status"]["phase"] == "Succeeded", pod["status"]
    spec = pod["spec"]
    assert spec["securityContext"]["runAsUser"] == 1000
    container = spec["containers"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0 and terminated["reason"] == "Completed"


def _assert_completed(cluster: Cluster, namespace: str, name: str, output: str, files: set[str]) -> dict[str, Any]:
    job, phases = _wait_terminal(cluster, namespace, name)
    status = job["status"]
    assert status["phase"] == "Completed", f"{status}\n{_diagnostics(cluster, namespace)}"
    assert "Running" in phases or "Pending" in phases, phases
    # The trainer patched its own job's status through its ServiceAccount token.
    progress = status["progress"]
    assert progress["step"] == progress["maxSteps"] > 0, progress
    assert progress["trainLoss"] > 0 and progress["percentageDone"] == 100, progress
    # The output Model points at the result that the pod wrote to the output claim.
    assert status["output"]["name"] == output
    model = _get(cluster, "model", namespace, output)
    source = model["spec"]["source"]["pvc"]
    on_host = claim_host_path(cluster.cp, namespace, source["claimName"]) / source["path"].strip("/")
    written = {p.name for p in on_host.iterdir()} if on_host.is_dir() else set()
    assert files <= written, f"{on_host}: {sorted(written)}"
    for path in on_host.rglob("*"):
        assert path.stat().st_uid == 1000, f"{path} not written by the trainer's uid 1000"
    return job


def test_automodel_lora_job_trains_in_a_pytorchjob_pod(cluster: Cluster, cluster_namespace: str) -> None:
    ns = cluster_namespace
    _inputs(cluster, ns)
    section = {
        "model": "tiny",
        "dataset": {"training": "train"},
        "training": {"finetuning_type": "lora", "lora": {"rank": 8, "alpha": 16}, "max_seq_length": 64},
        "schedule": {"epochs": 1, "seed": 1},
        "batch": {"global_batch_size": 8, "micro_batch_size": 4},
        "optimizer": {"learning_rate": 0.01, "weight_decay": 0.0},
        "parallelism": {"num_nodes": 1, "num_gpus_per_node": 1},
        "output": {"name": "tiny-lora"},
    }
    _apply(cluster, [*_references(ns), _job(ns, "lora", "automodel", section)])
    job = _assert_completed(cluster, ns, "lora", "tiny-lora", {"adapter_config.json", "adapter_model.safetensors"})
    assert job["status"]["output"]["type"] == "adapter"

    # The training-operator made the pod from the PyTorchJob and gave torchrun its variables.
    pytorchjob = _get(cluster, "pytorchjob", ns, "lora-train")
    assert any(c["type"] == "Succeeded" and c["status"] == "True" for c in pytorchjob["status"]["conditions"])
    (pod,) = _trainer_pods(cluster, ns, "lora")
    assert pod["metadata"]["name"] == "lora-train-master-0"
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["PET_NNODES"] == "1" and env["PET_NPROC_PER_NODE"] == "1"
    assert env["MASTER_ADDR"] == "lora-train-master-0"
    _assert_ran_as_rendered(pod)


def test_unsloth_4bit_job_trains_in_a_batch_job_pod(cluster: Cluster, cluster_namespace: str) -> None:
    ns = cluster_namespace
    _inputs(cluster, ns)
    section = {
        "model": {"name": "tiny", "max_seq_length": 64, "load_in_4bit": True, "dtype": "float32"},
        "dataset": {"path": "train"},
        "training": {"finetuning_type": "lora", "lora": {"rank": 8, "alpha": 16}, "use_gradient_checkpointing": False},
        "schedule": {"epochs": 1, "max_steps": 8, "logging_steps": 1, "seed": 1},
        "batch": {"per_device_train_batch_size": 8},
        "optimizer": {"learning_rate": 0.02, "optim": "adamw_torch"},
        "output": {"name": "tiny-qlora", "save_method": "lora"},
    }
    _apply(cluster, [*_references(ns), _job(ns, "qlora", "unsloth", section)])
    _assert_completed(cluster, ns, "qlora", "tiny-qlora", {"adapter_config.json", "adapter_model.safetensors"})
    batch_job = _get(cluster, "job", ns, "qlora-train")
    assert batch_job["status"].get("succeeded") == 1, batch_job["status"]
    (pod,) = _trainer_pods(cluster, ns, "qlora")
    _assert_ran_as_rendered(pod)


def test_the_cluster_quickstart_trains_smollm2_in_a_pod(cluster: Cluster) -> None:
    """README's "On a cluster" path, verbatim: `kubectl apply -f examples/cluster-quickstart.yaml`
    on the claims that `scripts/cluster.sh up` binds (the real SmolLM2-135M-Instruct)."""
    example = Path(__file__).resolve().parents[2] / "examples" / "cluster-quickstart.yaml"
    res = cluster.kubectl("apply", "-f", str(example))
    assert res.returncode == 0, res.stderr
    job = _assert_completed(
        cluster, "default", "quickstart", "smollm2-k8s-names", {"adapter_config.json", "adapter_model.safetensors"}
    )
    progress = job["status"]["progress"]
    assert progress["valLoss"] < 1.0, progress  # it learned the task (a fresh adapter starts near 2)
