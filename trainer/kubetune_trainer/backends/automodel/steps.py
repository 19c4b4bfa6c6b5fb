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

A recipe may also give a `HeadLossFn` (the final hidden states and the LM head's weight
instead of the logits: SFT's chunked cross-entropy, `losses.linear_cross_entropy_sum`,
which never builds the full-vocabulary logits). `MicroBatchLoop` uses it where the model
is whole in this process (`output_head`: no FSDP2, tensor or pipeline split; a plain
bias-free `nn.Linear` head); elsewhere the logits path runs, with the same result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from kubetune_trainer.batching import Batch
from kubetune_trainer.distributed import ParallelModel, World, set_gradient_sync
from kubetune_trainer.losses import shift_labels
from kubetune_trainer.parallel.context import ContextParallel
from kubetune_trainer.parallel.mesh import ParallelDims

if TYPE_CHECKING:
    from kubetune.planning.resolved import ResolvedJob
    from kubetune_trainer.parallel.pipeline import PipelineRunner

LossFn = Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""(logits, labels aligned with them — logits[:, t] predicts labels[:, t] —, the model inputs
that gave the logits) -> (loss summed over label tokens, other sums to report)."""

HeadLossFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor]]
]
"""(final hidden states, the LM head's weight, aligned labels, the model inputs) -> as `LossFn`."""

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


PLAIN_HEAD_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral"})
"""Model types whose causal-LM forward is just `lm_head(decoder(...))` when no labels are passed
(others scale or soft-cap the logits there, e.g. Gemma 2, Cohere, Granite)."""


def output_head(parallel: ParallelModel, dims: ParallelDims) -> tuple[nn.Module, nn.Linear] | None:
    """(the decoder, the LM head) when the whole model runs in this process as plain modules:
    the decoder can then run alone and the head's weight be used as it is."""
    if parallel.stage is not None or parallel.gradient_divisor != 1 or dims.tp > 1 or dims.cp > 1:
        return None
    model = parallel.module
    if getattr(getattr(model, "config", None), "model_type", None) not in PLAIN_HEAD_MODELS:
        return None
    get_decoder, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    decoder, head = get_decoder(), get_head()
    if type(head) is not nn.Linear or head.bias is not None or not isinstance(decoder, nn.Module):
        return None  # e.g. a LoRA-wrapped head: its own forward must run
    return decoder, head


class MicroBatchLoop:
    """Gradient accumulation over micro batches in this process (see the module doc)."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        device: torch.device,
        prepare: Prepare,
        head_loss: tuple[HeadLossFn, nn.Module, nn.Linear] | None = None,
    ) -> None:
        self.model, self.loss_fn, self.device, self.prepare = model, loss_fn, device, prepare
        self.head_loss = head_loss

    def _loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs, labels = self.prepare(batch)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            if self.head_loss is not None:
                head_loss, decoder, head = self.head_loss
                hidden = decoder(**inputs).last_hidden_state
                return head_loss(hidden, head.weight, labels, inputs)
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


class PipelineSteps:
    """The pipeline runner (`parallel.pipeline`) behind the `StepRunner` interface."""

    def __init__(self, runner: PipelineRunner) -> None:
        self.runner = runner

    def train_step(self, micro_batches: Sequence[Batch], scale: float) -> dict[str, float]:
        sums = self.runner.train_step(micro_batches, scale)
        return {"loss": sums.loss, **sums.extras}

    def evaluate(self, batch: Batch) -> float:
        return self.runner.evaluate(batch)


def make_runner(
    parallel: ParallelModel,
    loss_fn: LossFn,
    world: World,
    pad_id: int,
    job: ResolvedJob,
    extra_keys: Sequence[str] = (),
    head_loss: HeadLossFn | None = None,
) -> StepRunner:
    """The step runner for this rank's place in the layout; `extra_keys` are the loss's extras;
    `head_loss`, where given, replaces `loss_fn` where the layout allows (see `output_head`)."""
    device = world.device
    if parallel.stage is not None:
        from kubetune_trainer.parallel.pipeline import PipelineRunner

        def stage_loss(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            inputs, labels = whole_batch(device)(batch)
            return loss_fn(logits, labels, inputs)

        section = job.automodel
        assert section is not None
        runner = PipelineRunner(
            parallel.stage,
            world.mesh.group("pp"),
            device,
            n_microbatches=job.layout.gradient_accumulation_steps,
            micro_batch_size=section.batch.micro_batch_size,
            seq_length=section.training.max_seq_length,
            loss_fn=stage_loss,
            pad_id=pad_id,
            extra_keys=extra_keys,
        )
        return PipelineSteps(runner)
    cp = ContextParallel.from_mesh(world.mesh)
    prepare = context_slice(cp, device, pad_id) if cp.enabled else whole_batch(device)
    head = output_head(parallel, world.mesh.dims) if head_loss is not None else None
    chunked = (head_loss, *head) if head_loss is not None and head is not None else None
    return MicroBatchLoop(parallel.module, loss_fn, device, prepare, chunked)
