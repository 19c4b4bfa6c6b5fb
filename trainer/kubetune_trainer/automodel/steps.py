"""How one optimizer step's micro batches run forward and backward on this rank.

The engine (`engine.py`) owns the schedule, the optimizer and the bookkeeping; a step
runner owns the forward and backward passes, which differ by layout:

- `MicroBatchLoop`: every micro batch through the whole model in this process — data,
  tensor and context parallel (under context parallel each rank runs its slice of every
  sequence: `context_slice` cuts it);
- a pipeline runner (`parallel.pipeline`): the micro batches flow through the stages with
  a 1F1B schedule; only the last stage computes the loss.

Both call the recipe's `LossFn` on logits and labels aligned with them, and return the
loss sums of this rank (zeros where a rank computes no loss), which the engine reduces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from kubetune_trainer.batching import Batch
from kubetune_trainer.distributed import ParallelModel, World, set_gradient_sync
from kubetune_trainer.losses import shift_labels
from kubetune_trainer.parallel.context import ContextParallel

LossFn = Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""(logits, labels aligned with them — logits[:, t] predicts labels[:, t] —, the model inputs
that gave the logits) -> (loss summed over label tokens, other sums to report)."""

Prepare = Callable[[Batch], tuple[dict[str, Any], torch.Tensor]]
"""A micro batch -> (this rank's model inputs, its aligned labels), on the device."""


class StepRunner(Protocol):
    def train_step(self, micro_batches: Sequence[Batch], scale: float) -> dict[str, float]:
        """Forward and backward of this rank's micro batches, each loss sum multiplied by `scale`
        before its backward; returns the unscaled sums ("loss" and the loss function's extras)."""
        ...

    def evaluate(self, batch: Batch) -> float:
        """The loss sum of one batch, without gradients."""
        ...


def whole_batch(device: torch.device) -> Prepare:
    def prepare(batch: Batch) -> tuple[dict[str, Any], torch.Tensor]:
        return batch.model_inputs(device), shift_labels(batch.labels).to(device)

    return prepare


class MicroBatchLoop:
    """Gradient accumulation over micro batches in this process (see the module doc)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, device: torch.device, prepare: Prepare) -> None:
        self.model, self.loss_fn, self.device, self.prepare = model, loss_fn, device, prepare

    def _loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs, labels = self.prepare(batch)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.model(**inputs).logits
            return self.loss_fn(logits, labels, inputs)

    def train_step(self, micro_batches: Sequence[Batch], scale: float) -> dict[str, float]:
        self.model.train()
        sums: dict[str, float] = {}
        for index, batch in enumerate(micro_batches):
            # FSDP2: reduce-scatter the gradients once, after the last micro batch.
            set_gradient_sync(self.model, index == len(micro_batches) - 1)
            loss_sum, extras = self._loss(batch)
            (loss_sum * scale).backward()  # type: ignore[no-untyped-call]
            for key, value in {"loss": loss_sum, **extras}.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
        return sums

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> float:
        self.model.eval()
        return float(self._loss(batch)[0])


def context_slice(cp: ContextParallel, device: torch.device, pad_id: int) -> Prepare:
    """This rank's slice of each sequence (context parallel); labels shifted before the cut."""

    def prepare(batch: Batch) -> tuple[dict[str, Any], torch.Tensor]:
        shard = cp.shard(batch, pad_id)
        return shard.model_inputs(device), shard.labels.to(device)

    return prepare


def make_runner(parallel: ParallelModel, loss_fn: LossFn, world: World, pad_id: int) -> StepRunner:
    """The step runner for this rank's place in the layout."""
    cp = ContextParallel.from_mesh(world.mesh)
    prepare = context_slice(cp, world.device, pad_id) if cp.enabled else whole_batch(world.device)
    return MicroBatchLoop(parallel.module, loss_fn, world.device, prepare)
