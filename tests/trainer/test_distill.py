"""Logit distillation: the student moves toward the teacher; mismatched vocabularies are refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer.__main__ import run_job
from kubetune_trainer.config import RunOptions
from kubetune_trainer.models import ModelError
from kubetune_trainer.outputs import read_result
from kubetune_trainer.progress import read_events

DISTILL = {
    "training": {
        "training_type": "distillation",
        "finetuning_type": "all_weights",
        "teacher_precision": "fp32",
        "distillation_ratio": 0.7,
        "distillation_temperature": 2.0,
    },
    "schedule": {"epochs": 2},
    "optimizer": {"learning_rate": 0.003},
}


@pytest.fixture(scope="module")
def taught_teacher(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path, task_data: Path) -> Path:
    """A teacher that knows the tasks (full SFT of the tiny teacher), so there is something to distil."""
    from conftest import make_job

    job, _ = make_job(
        tmp_path_factory.mktemp("teacher") / "out",
        tiny_teacher,
        task_data,
        {
            "training": {"finetuning_type": "all_weights"},
            "schedule": {"epochs": 3},
            "optimizer": {"learning_rate": 0.003},
        },
    )
    return run_job(job, RunOptions(progress_bar=False))


def test_kl_to_the_teacher_falls(
    job_factory: Callable[..., Any], tiny_model: Path, taught_teacher: Path, task_data: Path, tmp_path: Path
) -> None:
    job, _ = job_factory(tiny_model, task_data, spec=DISTILL, teacher=taught_teacher)
    progress = tmp_path / "progress.jsonl"
    folder = run_job(job, RunOptions(progress_bar=False, progress_file=str(progress)))
    steps = [e for e in read_events(progress) if e.kind == "step"]
    kl = [e.extra["kl"] for e in steps]
    ce = [e.extra["ce"] for e in steps]
    assert len(kl) == 36
    assert sum(kl[-5:]) / 5 < 0.6 * sum(kl[:5]) / 5, kl
    assert sum(ce[-5:]) / 5 < sum(ce[:5]) / 5
    # loss = 0.7·KL·T² + 0.3·CE (the reported kl already includes T²)
    assert steps[-1].loss == pytest.approx(0.7 * kl[-1] + 0.3 * ce[-1], rel=1e-6)
    info = read_result(folder)
    assert (
        info["training_type"] == "distillation" and info["distillation"]["last_kl"] < info["distillation"]["first_kl"]
    )
    assert (folder / "model.safetensors").is_file()


def test_student_and_teacher_vocabularies_must_match(
    job_factory: Callable[..., Any], tiny_model: Path, other_vocab_model: Path, task_data: Path
) -> None:
    job, _ = job_factory(tiny_model, task_data, spec=DISTILL, teacher=other_vocab_model)
    with pytest.raises(ModelError, match=r"cannot teach the student.*same tokenizer and vocabulary"):
        run_job(job, RunOptions(progress_bar=False))
