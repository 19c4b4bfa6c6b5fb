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

from pathlib import Path
from typing import Any

import torch

from kubetune.planning.resolved import ResolvedJob
from kubetune_trainer.automodel.engine import Engine, lora_settings, save_output, seed_everything, start_run
from kubetune_trainer.automodel.steps import LossFn, make_runner
from kubetune_trainer.automodel.teacher import FrozenTeacher
from kubetune_trainer.checkpoint import Preemption
from kubetune_trainer.config import ConfigError, RunOptions, automodel_section, check_model_split, check_supported
from kubetune_trainer.data import load_splits
from kubetune_trainer.distributed import init_world, parallelize, shutdown
from kubetune_trainer.losses import distillation_sums
from kubetune_trainer.models import (
    DTYPES,
    ModelError,
    add_lora,
    base_weights_dtype,
    count_parameters,
    load_causal_lm,
    load_config,
    load_tokenizer,
    local_model_path,
    pad_id,
    vocabulary_mismatch,
)
from kubetune_trainer.outputs import finished, result_path
from kubetune_trainer.parallel.context import ContextParallel
from kubetune_trainer.parallel.mesh import ParallelDims


def run(job: ResolvedJob, options: RunOptions) -> Path:
    section = automodel_section(job)
    training = section.training
    if job.paths.teacher_model is None:
        raise ConfigError("distillation needs paths.teacher_model (training.teacher_model resolved to a folder)")
    world = init_world(ParallelDims.from_layout(job.layout))
    try:
        check_supported(job, world.size)
        if finished(job.paths.output, job.output.name):
            return result_path(job.paths.output, job.output.name)
        ctx = start_run(job, options, world)
        try:
            with Preemption() as preemption:
                # 1. Load: tokenizers and data first (fail fast), then student and teacher.
                model_path = local_model_path(job.paths.model, world)
                check_model_split(job, load_config(model_path))
                teacher_path = local_model_path(job.paths.teacher_model, world)
                tokenizer = load_tokenizer(model_path)
                teacher_tokenizer = load_tokenizer(teacher_path)
                splits = load_splits(
                    job.paths.training,
                    job.paths.validation,
                    tokenizer,
                    training.max_seq_length,
                    section.dataset.prompt_template,
                    ctx.seed,
                )
                seed_everything(ctx.seed)
                lora = lora_settings(section)
                model = load_causal_lm(model_path, base_weights_dtype(world.device, lora is not None))
                teacher = load_causal_lm(teacher_path, DTYPES[training.teacher_precision])
                mismatch = vocabulary_mismatch((tokenizer, model), (teacher_tokenizer, teacher))
                if mismatch:
                    raise ModelError(
                        f"the teacher {job.paths.teacher_model} cannot teach the student {job.paths.model}: "
                        f"{mismatch}. Pick a teacher of the student's model family (same tokenizer and vocabulary)"
                    )

                # 2. Setup: the student as in SFT; the teacher frozen, on the device or streamed (teacher.py).
                # Under context parallel the teacher sees the same slices as the student (same attention).
                ContextParallel.from_mesh(world.mesh).apply(teacher)
                frozen = FrozenTeacher(teacher, world.device, offload=training.offload_teacher)
                if lora is not None:
                    model = add_lora(model, lora["rank"], lora["alpha"], lora["target_modules"])
                model.config.use_cache = False  # type: ignore[union-attr]
                model.to(world.device)
                parallel = parallelize(model, world)
                loss_fn = _loss(frozen, training.distillation_ratio, training.distillation_temperature)
                runner = make_runner(parallel, loss_fn, world, pad_id(tokenizer), job, ("ce", "kl"))
                engine = Engine(ctx, parallel, runner, splits, pad_id(tokenizer), lora is not None)
                trainable, total = count_parameters(parallel.module)
                for warning in splits.warnings:
                    engine.note(f"warning: {warning}")
                engine.note(f"trainable parameters: {trainable:,} of {total:,}; teacher {training.teacher_precision}")
                engine.resume()

                # 3. Train.
                result = engine.train(preemption)

                # 4. Save.
                first_kl = result.history[0].get("kl") if result.history else None
                last_kl = result.history[-1].get("kl") if result.history else None
                extra = {
                    "teacher_model": training.teacher_model,
                    "distillation": {
                        "ratio": training.distillation_ratio,
                        "temperature": training.distillation_temperature,
                        "first_kl": first_kl,
                        "last_kl": last_kl,
                    },
                }
                folder = save_output(ctx, parallel, tokenizer, result, model_path, extra)
                engine.note(f"result written to {folder}", kind="end")
                return folder
        finally:
            # 5. Cleanup.
            ctx.reporter.close()
    finally:
        shutdown(world)


def _loss(teacher: FrozenTeacher, ratio: float, temperature: float) -> LossFn:
    def loss(logits: torch.Tensor, labels: torch.Tensor, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        teacher_logits = teacher.logits(inputs)  # in teacher_precision, outside the student's autocast
        total, kl, ce = distillation_sums(logits, teacher_logits, labels, ratio, temperature)
        return total, {"kl": kl.detach(), "ce": ce.detach()}

    return loss
