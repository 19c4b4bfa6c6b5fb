"""Supervised fine-tuning, automodel backend: load → setup → train → save → cleanup.

Features:
- `finetuning_type`: `lora` (peft adapter; `target_modules: null` = every linear layer but
  the LM head), `lora_merged` (or `lora.merge: true`: the adapter merged into full
  weights at the end), `all_weights` (every parameter trained);
- data: see `kubetune_trainer.data` (formats, completion-only loss, truncation) and
  `kubetune_trainer.batching` (packing, the step schedule);
- any layout the planner accepts, under torchrun (gloo on CPU, NCCL on GPUs): data
  parallel with FSDP2, tensor, pipeline, context and expert parallel on one device mesh
  (`distributed.parallelize`, docs/parallelism.md); fp32 on CPU, bf16 compute on GPUs
  (where a LoRA job stores its frozen base in bf16: `models.base_weights_dtype`);
- checkpoints every N steps, at the end and on SIGTERM; resume from the newest one;
- the result as a PEFT adapter or a safetensors model, plus `kubetune.json`.

Raises:
- `ConfigError`: a job this trainer cannot run (a layout the model cannot be split into,
  world size differing from the layout, a missing integration package);
- `DataError`: a missing file or malformed row (with file and line), before any model loads;
- `ModelError`: a missing model folder, an unreachable `hf://` URI, bad `target_modules`;
- `DataTooSmall`: fewer training sequences than the global batch;
- `Preempted`: SIGTERM arrived; a checkpoint was written (exit 143, resume on restart).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kubetune.planning.resolved import ResolvedJob
from kubetune_trainer.backends.automodel.engine import Engine, RunContext, save_output
from kubetune_trainer.backends.automodel.recipe import load_student, note_start, run_recipe, setup_student
from kubetune_trainer.backends.automodel.steps import make_runner
from kubetune_trainer.checkpoint import Preemption
from kubetune_trainer.config import RunOptions
from kubetune_trainer.losses import cross_entropy_sum, linear_cross_entropy_sum
from kubetune_trainer.models import pad_id


def run(job: ResolvedJob, options: RunOptions) -> Path:
    return run_recipe(job, options, _sft)


def _sft(ctx: RunContext, preemption: Preemption) -> Path:
    # 1. Load: tokenizer and every data row first, so bad data fails before the model loads.
    student = load_student(ctx)

    # 2. Setup: adapter or full weights, device, FSDP2, optimizer; resume if a checkpoint exists.
    parallel = setup_student(student, ctx.world)
    pad = pad_id(student.tokenizer)
    runner = make_runner(parallel, _loss, ctx.world, pad, ctx.job, head_loss=_head_loss)
    engine = Engine(ctx, parallel, runner, student.splits, pad, student.lora is not None)
    note_start(engine, student, parallel)
    engine.resume()

    # 3. Train.
    result = engine.train(preemption)

    # 4. Save: gather the weights, write adapter or model + tokenizer + kubetune.json.
    folder = save_output(ctx, parallel, student.tokenizer, result, student.path)
    engine.note(f"result written to {folder}", kind="end")
    return folder


def _loss(logits: torch.Tensor, labels: torch.Tensor, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    return cross_entropy_sum(logits, labels), {}


def _head_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, inputs: dict[str, Any]
) -> tuple[torch.Tensor, dict[str, Any]]:
    return linear_cross_entropy_sum(hidden, weight, labels), {}
