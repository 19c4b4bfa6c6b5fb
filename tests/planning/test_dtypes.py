"""dtype rules up front: precision vs model.dtype (a rule, CEL too) and bf16 vs the cluster's GPU type."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml

from kubetune.cli.documents import load_files
from kubetune.cli.validate import EXIT_INVALID, EXIT_VALID, run_validate
from kubetune.planning.dtypes import supports_bf16
from kubetune.planning.validation import validate_job
from tests.cases import automodel, unsloth


@pytest.mark.parametrize("gpu", ["T4", "Tesla-T4", "Tesla-V100-SXM2-16GB", "NVIDIA GeForce RTX 2080 Ti", "P100"])
def test_pre_ampere_gpus_have_no_bf16(gpu: str) -> None:
    assert supports_bf16(gpu) is False


@pytest.mark.parametrize("gpu", ["A100", "NVIDIA-A100-SXM4-80GB", "H100", "L4", "A10G", "RTX 4090", "something-new"])
def test_ampere_and_unknown_gpus_are_not_refused(gpu: str) -> None:
    assert supports_bf16(gpu) is None


def test_bf16_on_a_t4_cluster_is_refused_naming_the_fields() -> None:
    report = validate_job(unsloth(model={"dtype": "bfloat16"}), gpu_type="Tesla-T4")
    assert {e.path for e in report.errors} == {"spec.unsloth.hardware.precision", "spec.unsloth.model.dtype"}
    assert all("no bf16 support" in e.message for e in report.errors)
    assert validate_job(unsloth(hardware={"precision": "fp16"}), gpu_type="Tesla-T4").valid
    assert validate_job(unsloth(model={"dtype": "bfloat16"}), gpu_type="A100").valid
    assert validate_job(unsloth(model={"dtype": "bfloat16"})).valid  # GPU type unknown: nothing to refuse on


def test_automodel_on_a_t4_cluster_is_refused_and_so_is_a_bf16_teacher() -> None:
    teacher = {"training_type": "distillation", "teacher_model": "big"}
    report = validate_job(automodel(training=teacher), gpu_type="T4")
    assert [e.path for e in report.errors] == ["spec.automodel", "spec.automodel.training.teacher_precision"]
    report = validate_job(automodel(training={**teacher, "teacher_precision": "fp16"}), gpu_type="T4")
    assert [e.path for e in report.errors] == ["spec.automodel"]
    assert "computes in bf16 on GPUs" in report.errors[0].message
    assert validate_job(automodel(training=teacher), gpu_type="A100").valid


def test_kubetune_validate_refuses_dtype_conflicts_with_both_field_paths(tmp_path: Path) -> None:
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(unsloth(model={"dtype": "float16"})))
    out = io.StringIO()
    assert run_validate(load_files([str(manifest)]), "json", out) == EXIT_INVALID
    [error] = json.loads(out.getvalue())[0]["errors"]
    assert error["path"] == "spec.unsloth.hardware.precision"
    assert "spec.unsloth.model.dtype" in error["message"] and "spec.unsloth.hardware.precision" in error["message"]

    manifest.write_text(yaml.safe_dump(unsloth()))
    assert run_validate(load_files([str(manifest)]), "text", io.StringIO()) == EXIT_VALID
    out = io.StringIO()
    assert run_validate(load_files([str(manifest)]), "text", out, gpu_type="V100") == EXIT_INVALID
    assert "spec.unsloth.hardware.precision: is bf16, but the cluster's GPUs (V100)" in out.getvalue()
