"""The training loop shared by the automodel recipes (`sft.py`, `distill.py`).

A recipe loads its models and data, then hands the engine a model (LoRA-wrapped and/or
FSDP2-sharded) and a loss function; the engine owns the optimizer, the LR schedule, the
step schedule, validation, checkpoints (save, resume, SIGTERM) and progress events.

Schedule: steps per epoch = training sequences // global_batch_size (the last partial
batch is dropped, as Megatron/NeMo do); total steps = epochs × that, capped by
`max_steps`. Validation every `val_check_interval` (≤ 1.0: that fraction of an epoch;
> 1: every N steps; null: once per epoch) and at the end. Optimizer: AdamW, weight decay
on matrices only (not on norms and biases), gradient norm clipped at 1.0; LR: linear
warmup over `warmup_steps`, then cosine decay to 10% of `learning_rate`.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kubetune.api.automodel import AutomodelSpec
from kubetune.planning.resolved import ResolvedJob
from kubetune_trainer.backends.automodel.steps import StepRunner
from kubetune_trainer.batching import StepSchedule, as_sequences, validation_batches
from kubetune_trainer.checkpoint import CheckpointStore, Preempted, Preemption, load_rng, save_rng
from kubetune_trainer.config import RunOptions
from kubetune_trainer.data import DataTooSmall, Splits
from kubetune_trainer.distributed import (
    ParallelModel,
    World,
    all_max,
    all_sum,
    any_rank,
    barrier,
    broadcast_int,
    peak_memory_bytes,
    state_bytes,
    sum_over,
)
from kubetune_trainer.progress import (
    EventKind,
    NullReporter,
    ProgressEvent,
    Reporter,
    Throughput,
)
from kubetune_trainer.reporters import job_reporter

# A single process has no process group; DCP then saves and loads locally, as intended.
warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")

MAX_GRAD_NORM = 1.0
MIN_LR_RATIO = 0.1


@dataclass
class RunContext:
    job: ResolvedJob
    section: AutomodelSpec
    world: World
    options: RunOptions
    seed: int
    store: CheckpointStore
    reporter: Reporter


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def choose_seed(section: AutomodelSpec, store: CheckpointStore, world: World) -> int:
    """The job's seed; else the one a previous attempt recorded; else a fresh one (rank 0's)."""
    if section.schedule.seed is not None:
        return section.schedule.seed
    latest = store.latest()
    seed = int(latest.meta["seed"]) if latest else random.SystemRandom().randrange(2**31)
    return broadcast_int(world, seed)


def make_reporter(job: ResolvedJob, world: World, options: RunOptions) -> Reporter:
    """Rank 0 reports (to the cluster too, when the operator asked for it); other ranks stay quiet."""
    return job_reporter(job, options) if world.is_main else NullReporter()


FUSED_ADAMW = True
"""One fused kernel for the whole AdamW update (False: torch's default per-parameter loop on CPU)."""


def fused_adamw(params: list[torch.nn.Parameter]) -> bool | None:
    """AdamW's implementation: fused over plain CPU/CUDA tensors (one kernel instead of a
    Python loop over hundreds of LoRA matrices), torch's default for sharded (DTensor) ones."""
    from torch.distributed.tensor import DTensor

    plain = all(not isinstance(p, DTensor) and p.device.type in ("cpu", "cuda") for p in params)
    return True if FUSED_ADAMW and plain and params else None


@dataclass
class Plan:
    steps_per_epoch: int
    total_steps: int
    num_epochs: int
    val_every: int
    checkpoint_every: int


def make_plan(section: AutomodelSpec, steps_per_epoch: int, checkpoint_every: int | None) -> Plan:
    schedule = section.schedule
    total = schedule.epochs * steps_per_epoch
    if schedule.max_steps is not None:
        total = min(total, schedule.max_steps)
    interval = schedule.val_check_interval
    if interval is None:
        val_every = steps_per_epoch
    elif interval <= 1.0:
        val_every = max(1, round(interval * steps_per_epoch))
    else:
        val_every = int(interval)
    every = checkpoint_every or (val_every if interval is not None else max(1, math.ceil(total / 10)))
    return Plan(steps_per_epoch, total, math.ceil(total / steps_per_epoch), val_every, every)


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to MIN_LR_RATIO. Not transformers'
    `get_cosine_with_min_lr_schedule_with_warmup`: its warmup factor is step / warmup, so the
    first optimizer step runs at learning rate 0 and changes nothing; here it is (step + 1) / warmup."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass
class TrainResult:
    steps: int
    loss: float | None
    val_loss: float | None
    tokens: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    step_seconds: float = 0.0
    """Time in optimizer steps only (no validation, checkpoints), this attempt."""
    step_tokens: int = 0
    """Tokens trained on in this attempt (all ranks)."""
    memory: dict[str, float] = field(default_factory=dict)
    """Largest rank's memory in GiB: "peak" (CUDA allocator, or the process's RSS on CPU) and
    "states" (its weights, gradients and optimizer states as allocated)."""

    @property
    def tokens_per_second(self) -> float | None:
        return self.step_tokens / self.step_seconds if self.step_seconds else None


class Engine:
    def __init__(
        self,
        ctx: RunContext,
        parallel: ParallelModel,
        runner: StepRunner,
        splits: Splits,
        pad_id: int,
        trainable_only: bool,
    ) -> None:
        self.ctx, self.model, self.runner, self.parallel = ctx, parallel.module, runner, parallel
        model = parallel.module
        self.trainable_only = trainable_only
        section, world = ctx.section, ctx.world
        batch = section.batch
        packing, length = batch.sequence_packing, section.training.max_seq_length
        train_sequences = as_sequences(splits.train, packing, length, ctx.seed)
        if len(train_sequences) < batch.global_batch_size:
            raise DataTooSmall(
                f"the training set has {len(train_sequences)} {'packed sequences' if packing else 'examples'}, "
                f"fewer than batch.global_batch_size {batch.global_batch_size}: add data or lower the batch size"
            )
        # Ranks with the same dp coordinate (TP, CP and PP peers) train on the same sequences.
        layout, dp_rank = ctx.job.layout, world.mesh.data_rank
        dp = layout.data_parallel_size
        self.schedule = StepSchedule(
            train_sequences,
            batch.micro_batch_size,
            layout.gradient_accumulation_steps,
            dp_rank,
            dp,
            ctx.seed,
            pad_id,
            packing,
        )
        val_sequences = as_sequences(splits.validation, packing, length, ctx.seed)
        self.val_batches = validation_batches(val_sequences, batch.micro_batch_size, dp_rank, dp, pad_id, packing)
        self.plan = make_plan(section, self.schedule.steps_per_epoch, ctx.options.checkpoint_every)
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": section.optimizer.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=section.optimizer.learning_rate,
            fused=fused_adamw(decay + no_decay),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(section.optimizer.warmup_steps, self.plan.total_steps)
        )
        self.step = 0
        self.tokens = 0
        self.last_loss: float | None = None
        self.last_val_loss: float | None = None
        self.last_checkpoint: int | None = None
        self.lr: float | None = None
        self.history: list[dict[str, float]] = []

    # ----------------------------------------------------------------- checkpoints

    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(ignore_frozen_params=self.trainable_only)
        return {
            "model": get_model_state_dict(self.model, options=options),
            "optim": get_optimizer_state_dict(self.model, self.optimizer, options=options),
        }

    def save_checkpoint(self) -> Path:
        from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

        store, world = self.ctx.store, self.ctx.world
        partial = store.partial_path(self.step)
        if world.is_main:
            partial.mkdir(parents=True, exist_ok=True)
        barrier(world)
        dcp_save(self._state(), checkpoint_id=str(partial / "state"), no_dist=not world.distributed)
        save_rng(partial, world.rank)
        barrier(world)
        path = store.final_path(self.step)
        if world.is_main:
            path = store.commit(
                self.step,
                {
                    "seed": self.ctx.seed,
                    "world_size": world.size,
                    "tokens": self.tokens,
                    "loss": self.last_loss,
                    "val_loss": self.last_val_loss,
                    "scheduler": self.scheduler.state_dict(),
                    "history": self.history,
                },
            )
        barrier(world)
        self.last_checkpoint = self.step
        self._report("checkpoint", checkpoint_path=str(path))
        return path

    def resume(self) -> bool:
        """Load the newest complete checkpoint, if any; True when resumed."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )
        from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

        if self.ctx.world.is_main:
            self.ctx.store.remove_partial()
        barrier(self.ctx.world)
        latest = self.ctx.store.latest()
        if latest is None:
            return False
        state = self._state()
        dcp_load(state, checkpoint_id=str(latest.path / "state"), no_dist=not self.ctx.world.distributed)
        options = StateDictOptions(ignore_frozen_params=self.trainable_only, strict=not self.trainable_only)
        set_model_state_dict(self.model, state["model"], options=options)
        set_optimizer_state_dict(self.model, self.optimizer, state["optim"], options=options)
        self.scheduler.load_state_dict(latest.meta["scheduler"])
        load_rng(latest.path, self.ctx.world.rank)
        self.step = latest.step
        self.tokens = int(latest.meta["tokens"])
        self.last_loss, self.last_val_loss = latest.meta["loss"], latest.meta["val_loss"]
        self.history = list(latest.meta.get("history", []))
        self.last_checkpoint = latest.step
        self._report("start", message=f"resumed from {latest.path} at step {latest.step}/{self.plan.total_steps}")
        return True

    # ----------------------------------------------------------------- progress

    def _report(self, kind: EventKind, **fields: Any) -> None:
        event = ProgressEvent(
            kind=kind,
            step=self.step,
            max_steps=self.plan.total_steps,
            epoch=self.step / self.plan.steps_per_epoch,
            num_epochs=self.plan.num_epochs,
            loss=self.last_loss,
            val_loss=self.last_val_loss,
            lr=self.lr if self.lr is not None else float(self.scheduler.get_last_lr()[0]),
            **fields,
        )
        self.ctx.reporter.report(event)

    def note(self, message: str, kind: EventKind = "start") -> None:
        self._report(kind, message=message)

    # ----------------------------------------------------------------- train / validate

    def _train_step(self) -> tuple[float, dict[str, float], int]:
        world = self.ctx.world
        micro_batches = self.schedule.micro_batches(self.step)
        # Counts of whole sequences: the same on TP/CP/PP peers, so summed over data parallel only.
        labels, tokens = sum_over(
            world, [sum(b.num_label_tokens for b in micro_batches), sum(b.num_tokens for b in micro_batches)], "dp"
        )
        scale = self.parallel.gradient_divisor / max(labels, 1.0)  # FSDP averages gradients; undo that
        sums = self.runner.train_step(micro_batches, scale)
        self.parallel.reduce_gradients(world)
        self.parallel.clip_gradients(MAX_GRAD_NORM, world)
        self.lr = float(self.scheduler.get_last_lr()[0])  # the rate this step used
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        means = {key: value / max(labels, 1.0) for key, value in self._loss_totals(sums).items()}
        return means.pop("loss"), means, int(tokens)

    def _loss_totals(self, sums: dict[str, float]) -> dict[str, float]:
        """Loss sums of the whole step: every TP peer computed the same sums (count them once)."""
        keys = sorted(sums)
        totals = all_sum(self.ctx.world, [sums[k] for k in keys])
        tp = self.ctx.world.mesh.dims.tp
        return {key: value / tp for key, value in zip(keys, totals, strict=True)}

    @torch.no_grad()
    def validate(self) -> float | None:
        world = self.ctx.world
        if not any_rank(world, bool(self.val_batches)):
            return None
        loss_sum = sum(self.runner.evaluate(batch) for batch in self.val_batches)
        labels = sum(batch.num_label_tokens for batch in self.val_batches)
        total = self._loss_totals({"loss": loss_sum})["loss"]
        count = sum_over(world, [float(labels)], "dp")[0]
        self.last_val_loss = total / count if count else None
        self._report("validation")
        return self.last_val_loss

    def train(self, preemption: Preemption) -> TrainResult:
        plan, world = self.plan, self.ctx.world
        throughput = Throughput()
        start = time.perf_counter()
        step_seconds, step_tokens = 0.0, 0
        if self.step == 0:
            self._report("start", message=self.describe())
        while self.step < plan.total_steps:
            began = time.perf_counter()
            self.last_loss, extras, tokens = self._train_step()
            self.step += 1
            self.tokens += tokens
            elapsed = time.perf_counter() - began
            step_seconds, step_tokens = step_seconds + elapsed, step_tokens + tokens
            throughput.add(elapsed, tokens)
            self.history.append({"step": self.step, "loss": self.last_loss, **extras})
            self._report(
                "step",
                tokens_per_second=throughput.tokens_per_second(),
                eta_seconds=throughput.eta(plan.total_steps - self.step),
                extra=extras,
            )
            done = self.step == plan.total_steps
            if self.step % plan.val_every == 0 or done:
                self.validate()
            if self.step % plan.checkpoint_every == 0 or done:
                self.save_checkpoint()
            if any_rank(world, preemption.requested):
                if self.last_checkpoint != self.step:
                    self.save_checkpoint()
                raise Preempted(f"stopped by SIGTERM at step {self.step}; checkpoint written")
        return TrainResult(
            self.step,
            self.last_loss,
            self.last_val_loss,
            self.tokens,
            time.perf_counter() - start,
            self.history,
            step_seconds,
            step_tokens,
            self.memory_use(),
        )

    def memory_use(self) -> dict[str, float]:
        """What the largest rank used (for the memory pre-flight's benchmark)."""
        held = float(state_bytes(self.model, self.optimizer))
        peak, states = all_max(self.ctx.world, [peak_memory_bytes(self.ctx.world.device), held])
        return {"peak": peak / 2**30, "states": states / 2**30}

    def describe(self) -> str:
        section, plan, layout = self.ctx.section, self.plan, self.ctx.job.layout
        mesh = self.ctx.world.mesh.dims.describe()
        return (
            f"layout {mesh}: "
            f"{section.training.training_type} / {section.training.finetuning_type}: {plan.total_steps} steps "
            f"({plan.steps_per_epoch} per epoch × {plan.num_epochs}), global batch {section.batch.global_batch_size} "
            f"= micro {section.batch.micro_batch_size} × DP {layout.data_parallel_size} × accumulation "
            f"{layout.gradient_accumulation_steps}, {len(self.schedule.sequences)} training sequences, "
            f"{sum(1 for _ in self.val_batches)} validation batches per rank"
        )


# --------------------------------------------------------------------------- run bookends


def start_run(job: ResolvedJob, options: RunOptions, world: World) -> RunContext:
    """Checks, seed and reporter of a run (call after `check_supported`)."""
    section = job.automodel
    assert section is not None
    store = CheckpointStore(Path(job.paths.output) / "checkpoints", options.keep_checkpoints)
    seed = choose_seed(section, store, world)
    return RunContext(job, section, world, options, seed, store, make_reporter(job, world, options))


def lora_settings(section: AutomodelSpec) -> dict[str, Any] | None:
    lora = section.training.lora
    if section.training.finetuning_type == "all_weights" or lora is None:
        return None
    return {"rank": lora.rank, "alpha": lora.alpha, "target_modules": lora.target_modules}


def save_output(
    ctx: RunContext,
    parallel: ParallelModel,
    tokenizer: Any,
    result: TrainResult,
    base_path: str,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Gather the trained weights and write the job's result (rank 0); returns its folder."""
    from kubetune_trainer.distributed import full_state_dict
    from kubetune_trainer.outputs import build_result_model, job_record, result_path, write_result

    job, section, world = ctx.job, ctx.section, ctx.world
    lora = lora_settings(section)
    trained = full_state_dict(parallel, world, trainable_only=lora is not None)
    folder = result_path(job.paths.output, job.output.name)
    if world.is_main:
        result_model = build_result_model(base_path, trained, lora, merge=job.output.type == "model")
        info = {
            **job_record(job),
            "lora": lora,
            "seed": ctx.seed,
            "metrics": {
                "steps": result.steps,
                "train_loss": result.loss,
                "val_loss": result.val_loss,
                "tokens": result.tokens,
                "train_seconds": round(result.seconds, 3),
                "tokens_per_second": round(result.tokens_per_second or 0.0, 1),
                **{f"{key}_memory_gib_per_rank": round(value, 4) for key, value in result.memory.items()},
            },
            **(extra or {}),
        }
        folder = write_result(result_model, tokenizer, job.paths.output, job.output.name, info)
    barrier(world)
    return folder
