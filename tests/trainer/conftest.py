"""Shared fixtures of the trainer tests: tiny models (built once per session) and job files."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))

import tiny_models
from tests.cases import deep_merge

from kubetune.planning.resolved import JobIdentity, ResolvedJob, ResolvedPaths, resolve
from kubetune.planning.validation import validate_job

# Keep test runs small and reproducible on the 2-core machines.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(models_dir: Path) -> Path:
    """Student: hidden 64, 2 layers, ~0.1 M parameters, ChatML template."""
    return tiny_models.build_model(models_dir / "student")


@pytest.fixture(scope="session")
def tiny_moe_model(models_dir: Path) -> Path:
    """A Qwen3-MoE student with the tiny tokenizer: 4 experts, top 2, 2 layers."""
    return tiny_models.build_moe_model(models_dir / "moe")


@pytest.fixture(scope="session")
def tiny_teacher(models_dir: Path) -> Path:
    """Teacher with the student's tokenizer: hidden 128, 2 layers."""
    return tiny_models.build_model(models_dir / "teacher", hidden=128, heads=4, kv_heads=2, seed=1)


@pytest.fixture(scope="session")
def other_vocab_model(models_dir: Path) -> Path:
    """A model whose tokenizer differs from the student's (for the vocabulary check)."""
    return tiny_models.build_model(models_dir / "other", vocab_size=400, tokenizer_seed=7)


@pytest.fixture(scope="session")
def task_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """160 prompt/completion rows of four small tasks."""
    return tiny_models.write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", tiny_models.task_rows(160))


BASE_SPEC: dict[str, Any] = tiny_models.TINY_AUTOMODEL_SPEC


merge = deep_merge  # one deep-merge helper for every test table (tests/cases.py)


def make_job(
    output: Path,
    model: Path,
    training: Path,
    spec: dict[str, Any] | None = None,
    validation: Path | None = None,
    teacher: Path | None = None,
    name: str = "tiny-job",
) -> tuple[ResolvedJob, Path]:
    """Validate a CustomizationJob like the operator does, resolve it, write job.json."""
    automodel = merge(BASE_SPEC, spec or {})
    if automodel["training"].get("finetuning_type") == "all_weights":
        automodel["training"].pop("lora", None)  # a LoRA block with full weights is a validation error
    if teacher is not None:
        automodel["training"].setdefault("teacher_model", "teacher")
    manifest = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "CustomizationJob",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"automodel": automodel},
    }
    report = validate_job(manifest)
    assert report.valid, report.errors
    assert report.section is not None and report.layout is not None
    paths = ResolvedPaths(
        model=str(model),
        teacher_model=str(teacher) if teacher else None,
        training=str(training),
        validation=str(validation) if validation else None,
        output=str(output),
    )
    job = resolve(report.section, report.layout, JobIdentity(name=name, uid="test"), paths)
    output.mkdir(parents=True, exist_ok=True)
    config = output.parent / f"{output.name}-job.json"
    config.write_text(job.model_dump_json(indent=2), encoding="utf-8")
    return job, config


@pytest.fixture
def job_factory(tmp_path: Path) -> Callable[..., tuple[ResolvedJob, Path]]:
    def factory(model: Path, training: Path, output: str = "out", **kwargs: Any) -> tuple[ResolvedJob, Path]:
        return make_job(tmp_path / output, model, training, **kwargs)

    return factory


@pytest.fixture
def in_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment of a trainer pod the operator launched (service account in tmp_path)."""
    from kubetune_trainer import kube_status

    (tmp_path / "token").write_text("t")
    (tmp_path / "ca.crt").write_text("")
    monkeypatch.setattr(kube_status, "SERVICE_ACCOUNT", tmp_path)
    monkeypatch.setattr(kube_status.ssl, "create_default_context", lambda **_: None)
    for key, value in {
        "KUBETUNE_PROGRESS": "kubernetes",
        "KUBETUNE_JOB_NAMESPACE": "ns",
        "KUBETUNE_JOB_NAME": "j",
        "KUBERNETES_SERVICE_HOST": "10.0.0.1",
    }.items():
        monkeypatch.setenv(key, value)
