"""The distillation teacher as configured: its own precision, and layer streaming when offloaded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune.api.automodel import AutomodelSpec
from kubetune.planning.layout import compute_layout
from kubetune.planning.memory.estimate import estimate, memory_inputs
from kubetune_trainer.__main__ import run_job
from kubetune_trainer.backends.automodel.teacher import FrozenTeacher
from kubetune_trainer.config import RunOptions
from kubetune_trainer.models import load_causal_lm
from kubetune_trainer.progress import read_events

CPU = torch.device("cpu")


def _inputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    ids = torch.randint(0, 400, (2, 24))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_teacher_computes_in_its_precision_under_the_students_autocast(tiny_teacher: Path) -> None:
    """On a GPU the student's step runs under bf16 autocast; an fp32 teacher must not follow it."""
    teacher = FrozenTeacher(load_causal_lm(str(tiny_teacher), torch.float32), CPU, offload=False)
    inputs = _inputs()
    plain = teacher.logits(inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = teacher.logits(inputs)
        leaked = teacher.model(**inputs).logits  # what a forward inside the student's autocast computes
    assert inside.dtype == torch.float32 and torch.equal(inside, plain)
    assert leaked.dtype == torch.bfloat16  # the autocast would have changed the teacher's numerics
    fp16 = FrozenTeacher(load_causal_lm(str(tiny_teacher), torch.bfloat16), CPU, offload=False)
    assert fp16.logits(inputs).dtype == torch.bfloat16


def test_offloaded_teacher_streams_one_unit_at_a_time(tiny_teacher: Path) -> None:
    whole = FrozenTeacher(load_causal_lm(str(tiny_teacher), torch.float32), CPU, offload=False)
    streamed = FrozenTeacher(load_causal_lm(str(tiny_teacher), torch.float32), CPU, offload=True)
    inputs = _inputs()
    assert torch.equal(streamed.logits(inputs), whole.logits(inputs))
    streamer = streamed.streamer
    assert streamer is not None
    layers = streamed.model.model.layers  # type: ignore[union-attr]
    assert all(layer in streamer.units for layer in layers)
    total = sum(p.numel() * p.element_size() for p in streamed.model.parameters())
    largest = max(sum(p.numel() * p.element_size() for p in unit.parameters()) for unit in streamer.units)
    assert streamer.peak_units == 1 and streamer.peak_bytes == largest < total / 2
    assert streamer.resident_bytes == 0  # every unit went back home after its forward


def test_offloaded_distillation_trains(
    job_factory: Callable[..., Any], tiny_model: Path, tiny_teacher: Path, task_data: Path, tmp_path: Path
) -> None:
    spec = {
        "training": {
            "training_type": "distillation",
            "teacher_precision": "fp32",
            "offload_teacher": True,
        },
        "schedule": {"max_steps": 2},
    }
    job, _ = job_factory(tiny_model, task_data, spec=spec, teacher=tiny_teacher)
    progress = tmp_path / "progress.jsonl"
    run_job(job, RunOptions(progress_bar=False, progress_file=str(progress)))
    steps = [e for e in read_events(progress) if e.kind == "step"]
    assert len(steps) == 2 and all(e.extra["kl"] >= 0 for e in steps)


def test_preflight_teacher_term_is_not_divided_by_the_world_size(tiny_teacher: Path) -> None:
    """Not offloaded, every rank holds the whole teacher (FrozenTeacher moves it all to its device):
    the estimate's teacher term per GPU is the same at 1 and 8 GPUs (it used to be divided by the
    world size, as if the teacher were sharded), and offloading shrinks it."""
    model = load_causal_lm(str(tiny_teacher), torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())

    def teacher_term(gpus: int, offload: bool) -> float:
        section = AutomodelSpec.model_validate(
            {
                "model": "s",
                "dataset": {"training": "d"},
                "training": {"training_type": "distillation", "teacher_model": "t", "offload_teacher": offload},
                "parallelism": {"num_gpus_per_node": gpus},
                "batch": {"global_batch_size": 8},
            }
        )
        return estimate(memory_inputs(section, 1000, params * 10_000), compute_layout(section)).teacher

    assert teacher_term(8, False) == pytest.approx(teacher_term(1, False))
    assert teacher_term(8, True) < teacher_term(8, False)


@pytest.fixture(scope="module")
def llama_shaped_teacher(models_dir: Path) -> Path:
    """A teacher shaped like the dense Llama the pre-flight assumes (hidden 240 → 2 layers of 12·h²)."""
    import tiny_models

    return tiny_models.build_model(
        models_dir / "llama-shaped-teacher", hidden=240, layers=2, heads=4, kv_heads=4, intermediate=640
    )


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("offload", [False, True], ids=["on-device", "offloaded"])
def test_preflight_teacher_weights_match_the_measured_peak(
    llama_shaped_teacher: Path, precision: str, offload: bool
) -> None:
    """The pre-flight's teacher weight term against the teacher bytes measured on the device during a
    real forward (the streamer's peak when offloaded; all of them otherwise), within 25%."""
    from kubetune.planning.memory.estimate import teacher_weight_bytes
    from kubetune_trainer.models import DTYPES

    model = load_causal_lm(str(llama_shaped_teacher), DTYPES[precision])
    params = sum(p.numel() for p in model.parameters())
    teacher = FrozenTeacher(model, CPU, offload=offload)
    teacher.logits(_inputs())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    measured = teacher.streamer.peak_bytes if teacher.streamer is not None else total
    section = AutomodelSpec.model_validate(
        {
            "model": "s",
            "dataset": {"training": "d"},
            "training": {
                "training_type": "distillation",
                "teacher_model": "t",
                "teacher_precision": precision,
                "offload_teacher": offload,
            },
        }
    )
    estimated = teacher_weight_bytes(memory_inputs(section, 1000, params))
    assert abs(estimated - measured) <= 0.25 * measured, (estimated, measured)
    if offload:
        assert measured < 0.6 * total
