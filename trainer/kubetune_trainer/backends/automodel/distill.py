"""Logit distillation, automodel backend: load → setup → train → save → cleanup.

Features:
- a frozen teacher at `teacher_precision` (bf16, fp16, fp32) teaches the student with
  loss = ratio × KL(teacher/T ‖ student/T)·T² + (1 − ratio) × CE on completion tokens
  (`kubetune_trainer.losses.distillation_sums`); `distillation_ratio` 0 = CE only, 1 = KD only;
- the student trains as in SFT: LoRA, merged LoRA or full weights, any layout, checkpoints
  and resume; the teacher (`teacher.py`) computes in its own precision, outside the
  student's autocast, is not sharded (each rank keeps a full copy for inference; under
  context parallel it runs on the rank's slices, under pipeline parallel on the last stage)
  and, with `offload_teacher`, stays in CPU memory and is streamed to the device one layer
  at a time;
- the step history records `kl` and `ce` next to the loss; `val_loss` is the same
  combined loss on the validation data.

Raises: as `sft.py`, plus `ModelError` when student and teacher vocabularies differ
(checked on the tokenizers and the output layers, before training starts).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch

from kubetune.planning.resolved import ResolvedJob
from kubetune_trainer.backends.automodel.engine import Engine, RunContext, save_output
from kubetune_trainer.backends.automodel.recipe import load_student, note_start, run_recipe, setup_student
from kubetune_trainer.backends.automodel.steps import LossFn, make_runner
from kubetune_trainer.backends.automodel.teacher import FrozenTeacher
from kubetune_trainer.checkpoint import Preemption
from kubetune_trainer.config import ConfigError, RunOptions
from kubetune_trainer.losses import distillation_sums
from kubetune_trainer.models import (
    DTYPES,
    ModelError,
    load_causal_lm,
    load_tokenizer,
    local_model_path,
    pad_id,
    vocabulary_mismatch,
)
from kubetune_trainer.parallel.context import ContextParallel


def run(job: ResolvedJob, options: RunOptions) -> Path:
    if job.paths.teacher_model is None:
        raise ConfigError("distillation needs paths.teacher_model (training.teacher_model resolved to a folder)")
    return run_recipe(job, options, partial(_distill, teacher_source=job.paths.teacher_model))


def _distill(ctx: RunContext, preemption: Preemption, teacher_source: str) -> Path:
    job, training, world = ctx.job, ctx.section.training, ctx.world
    # 1. Load: the student as in SFT (tokenizer and data first: fail fast), then the teacher.
    student = load_student(ctx)
    teacher_path = local_model_path(teacher_source, world)
    teacher = load_causal_lm(teacher_path, DTYPES[training.teacher_precision])
    mismatch = vocabulary_mismatch((student.tokenizer, student.model), (load_tokenizer(teacher_path), teacher))
    if mismatch:
        raise ModelError(
            f"the teacher {teacher_source} cannot teach the student {job.paths.model}: "
            f"{mismatch}. Pick a teacher of the student's model family (same tokenizer and vocabulary)"
        )

    # 2. Setup: the student as in SFT; the teacher frozen, on the device or streamed (teacher.py).
    # Under context parallel the teacher sees the same slices as the student (same attention).
    ContextParallel.from_mesh(world.mesh).apply(teacher)
    frozen = FrozenTeacher(teacher, world.device, offload=training.offload_teacher)
    parallel = setup_student(student, world)
    pad = pad_id(student.tokenizer)
    loss_fn = _loss(frozen, training.distillation_ratio, training.distillation_temperature)
    runner = make_runner(parallel, loss_fn, world, pad, job, ("ce", "kl"))
    engine = Engine(ctx, parallel, runner, student.splits, pad, student.lora is not None)
    note_start(engine, student, parallel, f"; teacher {training.teacher_precision}")
    engine.resume()

    # 3. Train.
    result = engine.train(preemption)

    # 4. Save: as SFT, plus the distillation settings and the first and last KL.
    history = result.history
    extra = {
        "teacher_model": training.teacher_model,
        "distillation": {
            "ratio": training.distillation_ratio,
            "temperature": training.distillation_temperature,
            "first_kl": history[0].get("kl") if history else None,
            "last_kl": history[-1].get("kl") if history else None,
        },
    }
    folder = save_output(ctx, parallel, student.tokenizer, result, student.path, extra)
    engine.note(f"result written to {folder}", kind="end")
    return folder


def _loss(teacher: FrozenTeacher, ratio: float, temperature: float) -> LossFn:
    def loss(logits: torch.Tensor, labels: torch.Tensor, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        teacher_logits = teacher.logits(inputs)  # in teacher_precision, outside the student's autocast
        total, kl, ce = distillation_sums(logits, teacher_logits, labels, ratio, temperature)
        return total, {"kl": kl.detach(), "ce": ce.detach()}

    return loss
