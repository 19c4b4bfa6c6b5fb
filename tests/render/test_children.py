"""Golden files for `kubetune render` of every example, plus the properties that must hold.

Regenerate the golden files after an intended change with
`KUBETUNE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/render`; review the diff.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.cli.documents import load_files
from kubetune.cli.render import run_render
from tests.cases import CLUSTER_EXAMPLES, LOCAL_EXAMPLES

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"
EXAMPLES = CLUSTER_EXAMPLES


def _render(example: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run_render(load_files([str(example)]), out, err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_golden(example: Path) -> None:
    code, out, err = _render(example)
    assert code == 0, err
    golden = GOLDEN / f"{example.stem}.yaml"
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(out)
    assert out == golden.read_text(), f"render of {example.name} changed; see the module docstring"


def _children(example: str) -> dict[str, dict[str, Any]]:
    code, out, err = _render(ROOT / "examples" / example)
    assert code == 0, err
    return {doc["kind"]: doc for doc in yaml.safe_load_all(out)}


def _pod(workload: dict[str, Any], replica: str | None = "Master") -> dict[str, Any]:
    spec = workload["spec"]
    template = spec["pytorchReplicaSpecs"][replica]["template"] if replica else spec["template"]
    pod: dict[str, Any] = template["spec"]
    return pod


def test_pytorchjob_shape() -> None:
    children = _children("01-lora-sft.yaml")
    job = children["PyTorchJob"]
    assert job["apiVersion"] == "kubeflow.org/v1"
    assert job["spec"]["nprocPerNode"] == "8"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 1)
    pod = _pod(job)
    [container] = pod["containers"]
    assert container["name"] == "pytorch"
    assert container["command"][:3] == ["torchrun", "-m", "kubetune_trainer"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    assert job["spec"]["runPolicy"]["suspend"] is False


def test_single_node_job_has_no_workers() -> None:
    job = _children("03-distillation.yaml")["PyTorchJob"]
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    mounts = {m["name"]: m for m in _pod(job)["containers"][0]["volumeMounts"]}
    assert mounts["teacher"]["mountPath"] == "/models/teacher"


def test_unsloth_is_a_batch_job_with_one_gpu() -> None:
    children = _children("02-qlora-unsloth.yaml")
    job = children["Job"]
    assert job["apiVersion"] == "batch/v1" and "PyTorchJob" not in children
    assert (job["spec"]["completions"], job["spec"]["parallelism"]) == (1, 1)
    [container] = _pod(job, None)["containers"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert container["command"][:3] == ["python", "-m", "kubetune_trainer"]


@pytest.mark.parametrize("example", [p.name for p in EXAMPLES])
def test_every_child_is_owned_and_pods_are_locked_down(example: str) -> None:
    children = _children(example)
    for child in children.values():
        [owner] = child["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["controller"], owner["blockOwnerDeletion"]) == ("CustomizationJob", True, True)
    workload = children.get("PyTorchJob") or children["Job"]
    pod = _pod(workload, "Master" if "PyTorchJob" in children else None)
    assert pod["securityContext"]["runAsNonRoot"] is True
    security = pod["containers"][0]["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    writable = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/output", "/tmp", "/cache", "/dev/shm"}


def test_the_trainer_may_patch_only_its_own_status() -> None:
    role = _children("01-lora-sft.yaml")["Role"]
    assert role["rules"] == [
        {
            "apiGroups": ["kubetune.io"],
            "resources": ["customizationjobs/status"],
            "resourceNames": ["qwen-lora"],
            "verbs": ["get", "patch"],
        }
    ]


def test_config_map_holds_the_resolved_job_with_pod_paths() -> None:
    config = yaml.safe_load(_children("01-lora-sft.yaml")["ConfigMap"]["data"]["job.json"])
    assert config["kind"] == "ResolvedJob"
    assert config["paths"] == {
        "model": "/models/base",
        "teacher_model": None,
        "training": "/data/training/training.jsonl",
        "validation": "/data/validation/validation.jsonl",
        "output": "/output",
    }
    assert config["output"] == {"name": "qwen-support-v1", "type": "adapter", "description": None}
    assert config["layout"]["data_parallel_size"] == 8


def test_hub_models_are_not_mounted() -> None:
    children = _children("04-full-weights-shared.yaml")
    config = yaml.safe_load(children["ConfigMap"]["data"]["job.json"])
    assert config["paths"]["model"] == "hf://HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "model" not in {v["name"] for v in _pod(children["PyTorchJob"])["volumes"]}


def test_render_refuses_jobs_whose_references_are_not_in_the_input(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(
        "apiVersion: kubetune.io/v1alpha1\nkind: CustomizationJob\nmetadata: {name: j}\n"
        "spec: {automodel: {model: m, dataset: {training: d}}}\n"
    )
    code, _, err = _render(path)
    assert code == 1 and "Model default/m must be in the input" in err


@pytest.mark.parametrize("example", LOCAL_EXAMPLES, ids=lambda p: p.stem)
def test_local_examples_are_refused_for_a_cluster(example: Path) -> None:
    code, out, err = _render(example)
    assert code == 1 and out == ""
    assert "is relative: in a cluster give an absolute path on the node" in err
