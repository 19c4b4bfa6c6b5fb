"""Rules that need the Models and FileSets a job names (checked when the objects are known)."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api.resources import Source
from kubetune.cli.bundle import sort_manifests
from kubetune.planning.references import cluster_source_problem
from kubetune.planning.validation import validate_job
from tests.cases import GROUP_VERSION, automodel, unsloth


def model(name: str, namespace: str = "default", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "Model",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"source": {"hostPath": {"path": f"/models/{name}"}}, **spec},
    }


def fileset(name: str, namespace: str = "default", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "FileSet",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"source": {"hostPath": {"path": f"/data/{name}"}}, **spec},
    }


DISTILL = {"training_type": "distillation", "teacher_model": "teacher"}
DATA = fileset("train-data")


@pytest.mark.parametrize(
    ("objects", "job", "path", "reason"),
    [
        ([model("base-model"), DATA], automodel(), None, None),
        (
            [model("base-model", adapter={"baseModel": "x"}), DATA],
            automodel(),
            "spec.automodel.model",
            "ModelIsAdapter",
        ),
        (
            [model("base-model", adapter={"baseModel": "x"}), DATA],
            unsloth(),
            "spec.unsloth.model.name",
            "ModelIsAdapter",
        ),
        (
            [model("base-model", tokenizer="qwen3"), model("teacher", tokenizer="qwen3"), DATA],
            automodel(training=DISTILL),
            None,
            None,
        ),
        (
            [model("base-model", tokenizer="qwen3"), model("teacher", tokenizer="llama3"), DATA],
            automodel(training=DISTILL),
            "spec.automodel.training.teacher_model",
            "TokenizerMismatch",
        ),
        (
            [
                model("base-model", tokenizer="qwen3"),
                model("teacher", tokenizer="qwen3", adapter={"baseModel": "q"}),
                DATA,
            ],
            automodel(training=DISTILL),
            "spec.automodel.training.teacher_model",
            "ModelIsAdapter",
        ),
        (
            [model("base-model", numExperts=8), DATA],
            automodel(parallelism={"num_gpus_per_node": 8, "expert_parallel_size": 4}),
            None,
            None,
        ),
        (
            [model("base-model", numExperts=6), DATA],
            automodel(parallelism={"num_gpus_per_node": 8, "expert_parallel_size": 4}),
            "spec.automodel.parallelism.expert_parallel_size",
            "ExpertParallelDoesNotDivideExperts",
        ),
        (
            [model("base-model", numExperts=0), DATA],
            automodel(parallelism={"num_gpus_per_node": 8, "expert_parallel_size": 4}),
            "spec.automodel.parallelism.expert_parallel_size",
            "ExpertParallelWithoutExperts",
        ),
        (
            [model("base-model", numAttentionHeads=8, numKeyValueHeads=2, numLayers=4), DATA],
            automodel(parallelism={"num_gpus_per_node": 8, "tensor_parallel_size": 2}),
            None,
            None,
        ),
        (
            [model("base-model", numAttentionHeads=8, numKeyValueHeads=2), DATA],
            automodel(parallelism={"num_gpus_per_node": 8, "tensor_parallel_size": 4}),
            "spec.automodel.parallelism.tensor_parallel_size",
            "ModelSplit",
        ),
        (
            [model("base-model", numLayers=2), DATA],
            automodel(parallelism={"num_gpus_per_node": 8, "pipeline_parallel_size": 4}),
            "spec.automodel.parallelism.pipeline_parallel_size",
            "ModelSplit",
        ),
        (
            [model("base-model", "team-a", sharedWith=["default"]), DATA],
            automodel(model="team-a/base-model"),
            None,
            None,
        ),
        (
            [model("base-model", "team-a"), DATA],
            automodel(model="team-a/base-model"),
            "spec.automodel.model",
            "ReferenceNotShared",
        ),
        (
            [model("base-model"), fileset("train-data", "team-b", sharedWith=["team-c"])],
            automodel(dataset={"training": "team-b/train-data"}),
            "spec.automodel.dataset.training",
            "ReferenceNotShared",
        ),
        (
            [{**model("base-model"), "spec": {"source": {}}}, DATA],
            automodel(),
            "spec.automodel.model",
            "ReferenceInvalid",
        ),
    ],
)
def test_reference_rules(
    objects: list[dict[str, Any]], job: dict[str, Any], path: str | None, reason: str | None
) -> None:
    bundle = sort_manifests([*objects, job])
    report = validate_job(job, bundle.catalog)
    if path is None:
        assert report.errors == []
    else:
        assert [(e.path, e.reason) for e in report.errors] == [(path, reason)]


def test_missing_references_are_warnings_in_the_cli() -> None:
    report = validate_job(automodel(), sort_manifests([]).catalog)
    assert report.valid
    assert {w.path for w in report.warnings} == {"spec.automodel.model", "spec.automodel.dataset.training"}
    assert report.references is not None and len(report.references.missing) == 2


def test_unknown_tokenizers_are_a_warning_not_a_pass() -> None:
    bundle = sort_manifests([model("base-model"), model("teacher"), DATA])
    report = validate_job(automodel(training=DISTILL), bundle.catalog)
    assert report.valid
    assert [w.reason for w in report.warnings] == ["TokenizerUnknown"]


@pytest.mark.parametrize(
    ("parallelism", "field"),
    [
        ({"num_gpus_per_node": 2, "tensor_parallel_size": 2}, "numKeyValueHeads"),
        ({"num_gpus_per_node": 2, "pipeline_parallel_size": 2}, "numLayers"),
        ({"num_gpus_per_node": 2, "expert_parallel_size": 2}, "numExperts"),
    ],
)
def test_an_undeclared_architecture_is_a_warning_when_the_job_splits_the_model(
    parallelism: dict[str, int], field: str
) -> None:
    bundle = sort_manifests([model("base-model"), DATA])
    report = validate_job(automodel(parallelism=parallelism), bundle.catalog)
    assert report.valid
    assert [w.reason for w in report.warnings] == ["ModelSplitUnknown"]
    assert f"spec.{field}" in report.warnings[0].message


@pytest.mark.parametrize(
    ("source", "valid"),
    [
        ({"pvc": {"claimName": "models"}}, True),
        ({"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"}, True),
        ({}, False),
        ({"pvc": {"claimName": "models"}, "hostPath": {"path": "/x"}}, False),
        ({"uri": "s3://bucket/model"}, False),
    ],
)
def test_model_source_is_exactly_one(source: dict[str, Any], valid: bool) -> None:
    bundle = sort_manifests([{**model("m"), "spec": {"source": source}}])
    assert (not bundle.objects[0][1].errors) is valid


@pytest.mark.parametrize(
    ("path", "allowed", "ok"),
    [
        ("/mnt/models/llama", ("/mnt/models",), True),
        ("/mnt/models", ("/mnt/models/",), True),
        ("/mnt/models-private/x", ("/mnt/models",), False),  # a prefix of whole path segments only
        ("/mnt/models/../../etc", ("/mnt/models",), False),  # `..` cannot climb out
        ("/", ("/mnt/models",), False),
        ("/var/run/containerd/containerd.sock", (), False),  # nothing is allowed by default
        ("/anything", ("/",), True),
    ],
)
def test_host_paths_need_an_allowed_prefix(path: str, allowed: tuple[str, ...], ok: bool) -> None:
    source = Source.model_validate({"hostPath": {"path": path}})
    problem = cluster_source_problem(source, allowed)
    assert (problem is None) is ok
    if not ok:
        assert "allowedHostPaths" in (problem or "")


def test_relative_host_paths_are_for_kubetune_run() -> None:
    source = Source.model_validate({"hostPath": {"path": "data/train"}})
    assert "is relative" in (cluster_source_problem(source, ("/",)) or "")
    assert cluster_source_problem(Source.model_validate({"pvc": {"claimName": "data"}})) is None
