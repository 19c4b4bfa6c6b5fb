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
from kubetune_trainer.automodel.engine import Engine, lora_settings, save_output, seed_everything, start_run
from kubetune_trainer.automodel.steps import make_runner
from kubetune_trainer.checkpoint import Preemption
from kubetune_trainer.config import RunOptions, automodel_section, check_model_split, check_supported
from kubetune_trainer.data import load_splits
from kubetune_trainer.distributed import init_world, parallelize, shutdown
from kubetune_trainer.losses import cross_entropy_sum, linear_cross_entropy_sum
from kubetune_trainer.models import (
    add_lora,
    base_weights_dtype,
    count_parameters,
    load_causal_lm,
    load_config,
    load_tokenizer,
    local_model_path,
    pad_id,
)
from kubetune_trainer.outputs import finished, result_path
from kubetune_trainer.parallel.mesh import ParallelDims


def run(job: ResolvedJob, options: RunOptions) -> Path:
    section = automodel_section(job)
    world = init_world(ParallelDims.from_layout(job.layout))
    try:
        check_supported(job, world.size)
        if finished(job.paths.output, job.output.name):  # a restart after success: nothing to do
            return result_path(job.paths.output, job.output.name)
        ctx = start_run(job, options, world)
        try:
            with Preemption() as preemption:
                # 1. Load: tokenizer and every data row first, so bad data fails before the model loads.
                model_path = local_model_path(job.paths.model, world)
                check_model_split(job, load_config(model_path))
                tokenizer = load_tokenizer(model_path)
                splits = load_splits(
                    job.paths.training,
                    job.paths.validation,
                    tokenizer,
                    section.training.max_seq_length,
                    section.dataset.prompt_template,
                    ctx.seed,
                )
                seed_everything(ctx.seed)  # same seed on every rank: identical LoRA init before sharding
                lora = lora_settings(section)
                model = load_causal_lm(model_path, base_weights_dtype(world.device, lora is not None))

                # 2. Setup: adapter or full weights, device, FSDP2, optimizer; resume if a checkpoint exists.
                if lora is not None:
                    model = add_lora(model, lora["rank"], lora["alpha"], lora["target_modules"])
                model.config.use_cache = False  # type: ignore[union-attr]
                model.to(world.device)
                parallel = parallelize(model, world)
                runner = make_runner(parallel, _loss, world, pad_id(tokenizer), job, head_loss=_head_loss)
                engine = Engine(ctx, parallel, runner, splits, pad_id(tokenizer), lora is not None)
                trainable, total = count_parameters(parallel.module)
                for warning in splits.warnings:
                    engine.note(f"warning: {warning}")
                engine.note(f"trainable parameters: {trainable:,} of {total:,}")
                engine.resume()

                # 3. Train.
                result = engine.train(preemption)

                # 4. Save: gather the weights, write adapter or model + tokenizer + kubetune.json.
                folder = save_output(ctx, parallel, tokenizer, result, model_path)
                engine.note(f"result written to {folder}", kind="end")
                return folder
        finally:
            # 5. Cleanup.
            ctx.reporter.close()
    finally:
        shutdown(world)


def _loss(logits: torch.Tensor, labels: torch.Tensor, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    return cross_entropy_sum(logits, labels), {}


def _head_loss(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, inputs: dict[str, Any]
) -> tuple[torch.Tensor, dict[str, Any]]:
    return linear_cross_entropy_sum(hidden, weight, labels), {}
