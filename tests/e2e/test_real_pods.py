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

from pathlib import Path
from typing import Any

import pytest

from .addons import claim_host_path, wait_for
from .cluster import Cluster
from .pods import (
    TINY_AUTOMODEL,
    apply_objects,
    diagnostics,
    get_object,
    input_references,
    job_manifest,
    stage_inputs,
    trainer_pods,
    wait_terminal,
)

pytestmark = pytest.mark.e2e


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
    job, phases = wait_terminal(cluster, namespace, name)
    status = job["status"]
    assert status["phase"] == "Completed", f"{status}\n{diagnostics(cluster, namespace)}"
    assert "Running" in phases or "Pending" in phases, phases
    # The trainer patched its own job's status through its ServiceAccount token.
    progress = status["progress"]
    assert progress["step"] == progress["maxSteps"] > 0, progress
    assert progress["trainLoss"] > 0 and progress["percentageDone"] == 100, progress
    # The output Model points at the result that the pod wrote to the output claim.
    assert status["output"]["name"] == output
    model = get_object(cluster, "model", namespace, output)
    source = model["spec"]["source"]["pvc"]
    on_host = claim_host_path(cluster.cp, namespace, source["claimName"]) / source["path"].strip("/")
    written = {p.name for p in on_host.iterdir()} if on_host.is_dir() else set()
    assert files <= written, f"{on_host}: {sorted(written)}"
    for path in on_host.rglob("*"):
        assert path.stat().st_uid == 1000, f"{path} not written by the trainer's uid 1000"
    return job


def test_automodel_lora_job_trains_in_a_pytorchjob_pod(cluster: Cluster, cluster_namespace: str) -> None:
    ns = cluster_namespace
    stage_inputs(cluster, ns)
    section = {**TINY_AUTOMODEL, "output": {"name": "tiny-lora"}}
    apply_objects(cluster, [*input_references(ns), job_manifest(ns, "lora", "automodel", section)])
    job = _assert_completed(cluster, ns, "lora", "tiny-lora", {"adapter_config.json", "adapter_model.safetensors"})
    assert job["status"]["output"]["type"] == "adapter"

    # Kubernetes conventions: `kubectl wait` on the documented condition, the printer
    # columns from the trainer's progress, and the story in `kubectl describe`.
    waited = cluster.kubectl("wait", "--for=condition=Complete", "--timeout=10s", "ctj/lora", "-n", ns)
    assert waited.returncode == 0, waited.stderr
    row = cluster.kubectl("get", "ctj", "lora", "-n", ns, "--no-headers").stdout.split()
    assert row[1:4] == ["automodel", "Completed", "100"], row
    assert float(row[4]) == pytest.approx(job["status"]["progress"]["trainLoss"], rel=1e-6), row

    def story() -> str:  # kopf posts events in batches, shortly after the status patch
        described = cluster.kubectl("describe", "ctj", "lora", "-n", ns).stdout
        events = described[described.find("Events:") :]
        return events if all(r in events for r in ("Launched", "Completed", "output Model tiny-lora")) else ""

    wait_for(story, 30, "Launched and Completed events in `kubectl describe ctj lora`")

    # The training-operator made the pod from the PyTorchJob and gave torchrun its variables.
    pytorchjob = get_object(cluster, "pytorchjob", ns, "lora-train")
    assert any(c["type"] == "Succeeded" and c["status"] == "True" for c in pytorchjob["status"]["conditions"])
    (pod,) = trainer_pods(cluster, ns, "lora")
    assert pod["metadata"]["name"] == "lora-train-master-0"
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["PET_NNODES"] == "1" and env["PET_NPROC_PER_NODE"] == "1"
    assert env["MASTER_ADDR"] == "lora-train-master-0"
    _assert_ran_as_rendered(pod)


def test_unsloth_4bit_job_trains_in_a_batch_job_pod(cluster: Cluster, cluster_namespace: str) -> None:
    ns = cluster_namespace
    stage_inputs(cluster, ns)
    section = {
        "model": {"name": "tiny", "max_seq_length": 64, "load_in_4bit": True, "dtype": "float32"},
        "dataset": {"path": "train"},
        "training": {"finetuning_type": "lora", "lora": {"rank": 8, "alpha": 16}, "use_gradient_checkpointing": False},
        "schedule": {"epochs": 1, "max_steps": 8, "logging_steps": 1, "seed": 1},
        "batch": {"per_device_train_batch_size": 8},
        "optimizer": {"learning_rate": 0.02, "optim": "adamw_torch"},
        "output": {"name": "tiny-qlora", "save_method": "lora"},
    }
    apply_objects(cluster, [*input_references(ns), job_manifest(ns, "qlora", "unsloth", section)])
    _assert_completed(cluster, ns, "qlora", "tiny-qlora", {"adapter_config.json", "adapter_model.safetensors"})
    batch_job = get_object(cluster, "job", ns, "qlora-train")
    assert batch_job["status"].get("succeeded") == 1, batch_job["status"]
    (pod,) = trainer_pods(cluster, ns, "qlora")
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
