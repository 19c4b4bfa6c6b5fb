"""Helpers for the tests that run jobs in real pods (``cluster`` fixture): inputs on a
claim, manifests, waiting for a terminal phase, and what to print when a job hangs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures import tiny_models

from .addons import claim_for_directory
from .cluster import Cluster

JOB_TIMEOUT_S = 900.0
TERMINAL = {"Completed", "Failed", "Cancelled"}


def stage_inputs(cluster: Cluster, namespace: str) -> Path:
    """A tiny model and a tiny dataset in a host directory, bound to claim ``inputs`` (the
    way an administrator exposes existing data), readable by the trainer's uid 1000."""
    folder = cluster.workdir / "inputs" / namespace
    tiny_models.build_model(folder / "model")
    tiny_models.write_jsonl(folder / "train.jsonl", tiny_models.task_rows(64))
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    claim_for_directory(cluster.cp, namespace, "inputs", folder)
    return folder


def input_references(namespace: str) -> list[dict[str, Any]]:
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


def job_manifest(namespace: str, name: str, backend: str, section: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "CustomizationJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {backend: section},
    }


def apply_objects(cluster: Cluster, objects: list[dict[str, Any]]) -> None:
    text = "\n---\n".join(yaml.safe_dump(o) for o in objects)
    res = cluster.kubectl("apply", "-f", "-", stdin=text)
    assert res.returncode == 0, res.stderr


def get_object(cluster: Cluster, kind: str, namespace: str, name: str) -> dict[str, Any]:
    res = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json")
    assert res.returncode == 0, res.stderr
    obj: dict[str, Any] = json.loads(res.stdout)
    return obj


def diagnostics(cluster: Cluster, namespace: str) -> str:
    """What a user would look at when a job does not finish: pods, events, trainer logs."""
    parts = [
        cluster.kubectl("get", "ctj,pytorchjobs,jobs,pods,pvc", "-n", namespace, "-o", "wide").stdout,
        cluster.kubectl("get", "events", "-n", namespace, "--sort-by=.lastTimestamp").stdout[-4000:],
        cluster.kubectl("logs", "-n", namespace, "-l", "kubetune.io/job", "--tail=60", "--all-containers").stdout,
        cluster.kubectl("logs", "-n", cluster.operator_namespace, "deployment/kubetune", "--tail=40").stdout,
    ]
    return "\n".join(parts)


def wait_terminal(cluster: Cluster, namespace: str, name: str) -> tuple[dict[str, Any], list[str]]:
    """Wait for a terminal phase; also return every phase seen on the way."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    phases: list[str] = []
    while True:
        job = get_object(cluster, "customizationjob", namespace, name)
        phase = (job.get("status") or {}).get("phase", "")
        if phase and (not phases or phases[-1] != phase):
            phases.append(phase)
        if phase in TERMINAL:
            return job, phases
        if time.monotonic() > deadline:
            pytest.fail(f"job {name} still {phase or 'without status'} after {JOB_TIMEOUT_S:.0f} s\n"
                        f"{diagnostics(cluster, namespace)}")  # fmt: skip
        time.sleep(2)


def trainer_pods(cluster: Cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    res = cluster.kubectl("get", "pods", "-n", namespace, "-l", f"kubetune.io/job={name}", "-o", "json")
    assert res.returncode == 0, res.stderr
    pods: list[dict[str, Any]] = json.loads(res.stdout)["items"]
    return pods


def progress_losses(folder: Path) -> dict[int, float]:
    """Step -> training loss from the ``progress.jsonl`` a trainer wrote on its output claim."""
    losses: dict[int, float] = {}
    for line in (folder / "progress.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["kind"] == "step" and event["loss"] is not None:
            losses[event["step"]] = event["loss"]
    return losses


TINY_AUTOMODEL: dict[str, Any] = {
    **tiny_models.TINY_AUTOMODEL_SPEC,
    "parallelism": {"num_nodes": 1, "num_gpus_per_node": 1},
}
"""A LoRA job on the tiny model and dataset of `stage_inputs`: 8 steps, seconds in a pod."""


def job_condition(cluster: Cluster, namespace: str, name: str, kind: str) -> dict[str, Any] | None:
    status = get_object(cluster, "customizationjob", namespace, name).get("status") or {}
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), None)


def wait_training(cluster: Cluster, namespace: str, name: str, timeout_s: float = 300) -> None:
    """Until the trainer of job ``name`` has reported a step past the first."""

    def step() -> int:
        status = get_object(cluster, "customizationjob", namespace, name).get("status") or {}
        return int((status.get("progress") or {}).get("step", 0))

    deadline = time.monotonic() + timeout_s
    while step() <= 1:
        if time.monotonic() > deadline:
            pytest.fail(f"job {name} did not train in {timeout_s:.0f} s\n{diagnostics(cluster, namespace)}")
        time.sleep(0.5)
