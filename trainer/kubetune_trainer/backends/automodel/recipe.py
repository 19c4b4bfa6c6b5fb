"""The frame every automodel recipe runs in, and the student every recipe trains.

A recipe (`sft.py`, `distill.py`) reads top to bottom: load → setup → train → save →
cleanup. What is the same in every one lives here: the process group and its teardown, the
finished-result check of a restart after success, the run context (seed, reporter) and
SIGTERM (`run_recipe`); loading the student with its tokenizer and data (`load_student`) and
setting it up for training (`setup_student`). Each recipe keeps what is its own: the loss,
a teacher, what it records in the result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from kubetune.planning.resolved import ResolvedJob
from kubetune_trainer.backends.automodel.engine import Engine, RunContext, lora_settings, seed_everything, start_run
from kubetune_trainer.checkpoint import Preemption
from kubetune_trainer.config import RunOptions, check_model_split, check_supported
from kubetune_trainer.data import Splits, load_splits
from kubetune_trainer.distributed import ParallelModel, World, init_world, parallelize, shutdown
from kubetune_trainer.models import (
    add_lora,
    base_weights_dtype,
    count_parameters,
    load_causal_lm,
    load_config,
    load_tokenizer,
    local_model_path,
)
from kubetune_trainer.outputs import finished, result_path
from kubetune_trainer.parallel.mesh import ParallelDims

Recipe = Callable[[RunContext, Preemption], Path]
"""A recipe's own steps, given the run context and SIGTERM; returns the result folder."""


def run_recipe(job: ResolvedJob, options: RunOptions, recipe: Recipe) -> Path:
    """Run `recipe` in this rank's process group; a result already written is returned as is."""
    world = init_world(ParallelDims.from_layout(job.layout))
    try:
        check_supported(job, world.size)
        if finished(job.paths.output, job.output.name):  # a restart after success: nothing to do
            return result_path(job.paths.output, job.output.name)
        ctx = start_run(job, options, world)
        try:
            with Preemption() as preemption:
                return recipe(ctx, preemption)
        finally:
            ctx.reporter.close()
    finally:
        shutdown(world)


@dataclass
class Student:
    """The model being trained, before setup: its folder, tokenizer, data and LoRA settings."""

    path: str
    tokenizer: Any
    splits: Splits
    lora: dict[str, Any] | None
    model: nn.Module


def load_student(ctx: RunContext) -> Student:
    """Tokenizer and every data row first, so that bad data fails before the model loads; then
    the seed (the same on every rank: identical LoRA init before sharding) and the weights."""
    job, section, world = ctx.job, ctx.section, ctx.world
    path = local_model_path(job.paths.model, world)
    check_model_split(job, load_config(path))
    tokenizer = load_tokenizer(path)
    splits = load_splits(
        job.paths.training,
        job.paths.validation,
        tokenizer,
        section.training.max_seq_length,
        section.dataset.prompt_template,
        ctx.seed,
    )
    seed_everything(ctx.seed)
    lora = lora_settings(section)
    model = load_causal_lm(path, base_weights_dtype(world.device, lora is not None))
    return Student(path, tokenizer, splits, lora, model)


def setup_student(student: Student, world: World) -> ParallelModel:
    """The adapter (or every weight) made trainable, the model on its device and split over the
    layout (`distributed.parallelize`)."""
    model = student.model
    if student.lora is not None:
        lora = student.lora
        model = add_lora(model, lora["rank"], lora["alpha"], lora["target_modules"])
    model.config.use_cache = False  # type: ignore[union-attr]
    model.to(world.device)
    return parallelize(model, world)


def note_start(engine: Engine, student: Student, parallel: ParallelModel, extra: str = "") -> None:
    """The run log's first notes: data warnings and what trains."""
    trainable, total = count_parameters(parallel.module)
    for warning in student.splits.warnings:
        engine.note(f"warning: {warning}")
    engine.note(f"trainable parameters: {trainable:,} of {total:,}{extra}")
