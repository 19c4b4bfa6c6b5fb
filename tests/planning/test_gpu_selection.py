"""`hardware.gpus` is a selection: CUDA_VISIBLE_DEVICES under `kubetune run`, a count of one in a cluster."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml

from kubetune.cli.documents import load_files
from kubetune.cli.render import run_render
from kubetune.planning.validation import validate_job
from kubetune_trainer.backends.unsloth import arguments
from tests.cases import unsloth

ROOT = Path(__file__).resolve().parents[2]


def _rendered_pod(tmp_path: Path, gpus: str) -> dict[str, object]:
    documents = list(yaml.safe_load_all((ROOT / "examples" / "02-qlora-unsloth.yaml").read_text()))
    job = next(doc for doc in documents if doc["kind"] == "CustomizationJob")
    job["spec"]["unsloth"].setdefault("hardware", {})["gpus"] = gpus
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump_all(documents))
    out, err = io.StringIO(), io.StringIO()
    assert run_render(load_files([str(manifest)]), out, err) == 0, err.getvalue()
    children = {doc["kind"]: doc for doc in yaml.safe_load_all(out.getvalue())}
    container: dict[str, object] = children["Job"]["spec"]["template"]["spec"]["containers"][0]
    return container


@pytest.mark.parametrize("gpus", ["2,3", "0,1", "5"])
def test_a_cluster_pod_requests_one_gpu_and_leaves_the_selection_to_the_node(tmp_path: Path, gpus: str) -> None:
    container = _rendered_pod(tmp_path, gpus)
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}  # type: ignore[index]
    env = {e["name"]: e.get("value") for e in container["env"]}  # type: ignore[attr-defined]
    assert env["KUBETUNE_GPUS_ASSIGNED_BY_NODE"] == "1"
    # In that pod the trainer leaves CUDA_VISIBLE_DEVICES alone (the GPU it got is device 0 there).
    pod_env = {"KUBETUNE_GPUS_ASSIGNED_BY_NODE": "1"}
    assert arguments.select_gpus(gpus, pod_env) is None and "CUDA_VISIBLE_DEVICES" not in pod_env


def test_kubetune_run_sets_the_visible_devices() -> None:
    env: dict[str, str] = {}
    assert arguments.select_gpus("2,3", env) == "2,3" and env["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_validation_warns_that_the_node_assigns_and_unsloth_uses_one_gpu() -> None:
    report = validate_job(unsloth(hardware={"gpus": "0,1"}))
    assert report.valid
    reasons = {w.reason: w for w in report.warnings}
    assert set(reasons) == {"GpuIndicesAssignedByNode", "UnslothUsesOneGpu"}
    assert all(w.path == "spec.unsloth.hardware.gpus" for w in report.warnings)
    assert "only GPU 0 is used" in reasons["UnslothUsesOneGpu"].message
    assert "the node assigns the pod's GPU" in reasons["GpuIndicesAssignedByNode"].message
    assert [w.reason for w in validate_job(unsloth(hardware={"gpus": "1"})).warnings] == ["GpuIndicesAssignedByNode"]
    assert validate_job(unsloth()).warnings == []
