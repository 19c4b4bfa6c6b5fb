"""Pipeline parallel: a Hugging Face decoder LM split by decoder layers, run with torch's 1F1B schedule.

Two calls, so that tensor parallel and FSDP2 can be applied to a stage in between:

1. `split_stage(model, stage_index, num_stages)` prunes a causal LM (Llama / Qwen2 / Qwen3 /
   Mistral layout, optionally wrapped by peft) to the decoder layers of one stage: the first
   stage keeps the token embeddings, the last the final norm and the LM head, every stage the
   rotary embedding (it has no weights). The returned `DecoderStage` registers the model's own
   top-level children, so its parameter names (FQNs) are those of the full model and its
   state_dict keys are a subset of the full model's — the stages' keys together cover it.
   Decoder layers move from a `ModuleList` into a `ModuleDict` keyed by their original index,
   which keeps `...layers.<i>...` names while the other layers are freed.
2. `PipelineRunner(stage, group, ...)` wraps it in `torch.distributed.pipelining.PipelineStage`
   and runs one optimizer step's micro batches with `Schedule1F1B` (`ScheduleGPipe` when there
   are fewer micro batches than stages, which 1F1B refuses). Position ids and the padding
   mask go to every stage as keyword arguments, and each stage rebuilds the causal (or, for
   packed rows, block-diagonal) mask and the rotary embeddings from them, as the full
   model's forward does. Only the hidden states travel between stages.

Shapes: PipelineStage sizes its receive buffers once, from the first step, so every micro
batch is padded to `seq_length` columns (masked, label-free columns: the loss is unchanged)
and evaluation batches also to `micro_batch_size` rows (label-free copies of a real row).

Gradients: the caller's loss is a sum over label tokens, multiplied by the caller's `scale`
before backward; the schedule's own division by the number of micro batches is off. Each
stage only holds its own parameters, so gradient-norm clipping must see all stages:
`distributed.clip_gradients` sums the squared norms over the pipeline group
(`DecoderStage.norm_parameters` counts a tied copy once). A trained tied embedding (LM head
= input embeddings, e.g. SmolLM2, Qwen3-0.6B) lives on the first stage as the embedding and
on the last as the head; the runner adds their gradients after each step, so both copies
take the same optimizer update and stay equal, as the one shared weight in a single process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kubetune_trainer.batching import Batch
from kubetune_trainer.data import IGNORE_INDEX

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

StageLoss = Callable[[torch.Tensor, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""(logits of a micro batch, that micro batch) -> (loss summed over label tokens, other sums)."""

FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"


class PipelineSplitError(ValueError):
    """The model cannot be split into pipeline stages (its layout, or more stages than layers)."""


# --------------------------------------------------------------------------- splitting


@dataclass(frozen=True)
class DecoderPaths:
    """Where the parts of a causal LM are, relative to the model handed to `split_stage`."""

    causal_lm: str
    """The `...ForCausalLM` module: "" for a plain model, "base_model.model" under peft."""

    @property
    def decoder(self) -> str:
        return self._join("model")

    @property
    def lm_head(self) -> str:
        return self._join("lm_head")

    def _join(self, name: str) -> str:
        return f"{self.causal_lm}.{name}" if self.causal_lm else name


def find_decoder(model: nn.Module) -> DecoderPaths:
    """Locate the `model.embed_tokens / .layers / .norm / .rotary_emb` and `lm_head` layout."""
    for name, module in model.named_modules():
        decoder = getattr(module, "model", None)
        if isinstance(getattr(module, "lm_head", None), nn.Module) and all(
            isinstance(getattr(decoder, part, None), nn.Module)
            for part in ("embed_tokens", "layers", "norm", "rotary_emb")
        ):
            return DecoderPaths(name)
    raise PipelineSplitError(
        f"{type(model).__name__} does not have the decoder layout pipeline parallel splits "
        "(model.embed_tokens, model.layers, model.norm, model.rotary_emb, lm_head: Llama, Qwen2, Qwen3, Mistral): "
        "use pipeline_parallel_size 1 for this model"
    )


def layers_per_stage(num_layers: int, num_stages: int) -> list[int]:
    """An even split; the first stages take the remainder (the last one also runs the LM head and loss)."""
    if num_stages > num_layers:
        raise PipelineSplitError(
            f"pipeline_parallel_size {num_stages} exceeds the model's {num_layers} decoder layers: "
            f"use at most {num_layers} stages"
        )
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if stage < extra else 0) for stage in range(num_stages)]


def stage_layer_indices(num_layers: int, num_stages: int, stage_index: int) -> range:
    sizes = layers_per_stage(num_layers, num_stages)
    start = sum(sizes[:stage_index])
    return range(start, start + sizes[stage_index])


def layer_attention_types(config: Any) -> list[str]:
    """Full or sliding-window attention per layer, as the models' own forward picks masks."""
    count = int(config.num_hidden_layers)
    types = getattr(config, "layer_types", None)
    if types:
        return [str(kind) for kind in types[:count]]
    sliding = getattr(config, "sliding_window", None) is not None  # Mistral: every layer slides
    return [SLIDING_ATTENTION if sliding else FULL_ATTENTION] * count


class DecoderStage(nn.Module):
    """One pipeline stage of a decoder LM, with the full model's parameter names.

    forward(inputs, position_ids, attention_mask=None): `inputs` are token ids on the first
    stage and the previous stage's hidden states elsewhere; returns hidden states, or the
    logits on the last stage.
    """

    def __init__(
        self,
        model: nn.Module,
        paths: DecoderPaths,
        stage_index: int,
        num_stages: int,
        layer_indices: range,
        autocast_dtype: torch.dtype | None,
        trains_tied_embedding: bool = False,
    ) -> None:
        super().__init__()
        if any(True for _ in model.parameters(recurse=False)) or any(True for _ in model.buffers(recurse=False)):
            raise PipelineSplitError(f"{type(model).__name__} holds tensors outside its submodules")
        for name, child in model.named_children():
            self.add_module(name, child)  # same objects, same names: the FQNs do not change
        self.paths = paths
        self.stage_index, self.num_stages = stage_index, num_stages
        self.layer_indices = layer_indices
        self.autocast_dtype = autocast_dtype
        self.trains_tied_embedding = trains_tied_embedding
        self.attention_types = layer_attention_types(self.decoder.config)

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    @property
    def tied_weight(self) -> nn.Parameter | None:
        """This stage's copy of a trained weight shared by the embeddings and the LM head.

        The first stage holds it as the embedding, the last as the LM head; their gradients
        are summed after each step (`PipelineRunner`), so both copies take the same update,
        as the one shared weight does in a single process.
        """
        if not self.trains_tied_embedding or not (self.is_first or self.is_last):
            return None
        part: Any = self.decoder.embed_tokens if self.is_first else self.get_submodule(self.paths.lm_head)
        weight: nn.Parameter = part.weight
        return weight

    def norm_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters counted in the gradient norm: the last stage's tied copy is not."""
        skip = self.tied_weight if self.is_last else None
        return [p for p in self.parameters() if p.requires_grad and p is not skip]

    @property
    def decoder(self) -> Any:
        """The transformers `...Model` (typed Any: its parts are looked up by name)."""
        return self.get_submodule(self.paths.decoder)

    def _masks(
        self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> dict[str, Any]:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        arguments: dict[str, Any] = {
            "config": self.decoder.config,
            "inputs_embeds": hidden,
            "attention_mask": attention_mask,
            "past_key_values": None,
            "position_ids": position_ids,
        }
        needed = {self.attention_types[i] for i in self.layer_indices}
        masks: dict[str, Any] = {}
        if FULL_ATTENTION in needed:
            masks[FULL_ATTENTION] = create_causal_mask(**arguments)
        if SLIDING_ATTENTION in needed:
            masks[SLIDING_ATTENTION] = create_sliding_window_causal_mask(**arguments)
        return masks

    def forward(
        self, inputs: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        device_type = inputs.device.type
        context = (
            torch.autocast(device_type, dtype=self.autocast_dtype) if self.autocast_dtype is not None else nullcontext()
        )
        decoder = self.decoder
        with context:
            hidden = decoder.embed_tokens(inputs) if self.is_first else inputs
            masks = self._masks(hidden, position_ids, attention_mask)
            position_embeddings = decoder.rotary_emb(hidden, position_ids)
            for index, layer in decoder.layers.items():
                hidden = layer(
                    hidden,
                    attention_mask=masks[self.attention_types[int(index)]],
                    position_embeddings=position_embeddings,
                    position_ids=position_ids,
                    past_key_values=None,
                    use_cache=False,
                )
            if not self.is_last:
                return hidden
            logits: torch.Tensor = self.get_submodule(self.paths.lm_head)(decoder.norm(hidden))
            return logits


def split_stage(
    model: nn.Module,
    stage_index: int,
    num_stages: int,
    autocast_dtype: torch.dtype | None = None,
) -> DecoderStage:
    """Prune `model` in place to stage `stage_index` of `num_stages` and wrap it (see the module doc).

    `model` is a transformers causal LM or a peft model around one. The layers of other stages
    are dropped (their memory is freed once nothing else refers to them). `autocast_dtype`
    (e.g. bfloat16 on GPUs) runs the stage's forward under autocast.
    """
    if not 0 <= stage_index < num_stages:
        raise PipelineSplitError(f"stage {stage_index} is outside a pipeline of {num_stages} stages")
    paths = find_decoder(model)
    decoder: Any = model.get_submodule(paths.decoder)
    causal_lm: Any = model.get_submodule(paths.causal_lm)
    layers = decoder.layers
    if not isinstance(layers, nn.ModuleList):
        raise PipelineSplitError(f"{type(decoder).__name__}.layers is a {type(layers).__name__}, not a ModuleList")
    head_weight = getattr(causal_lm.lm_head, "weight", None)
    tied = head_weight is not None and head_weight is getattr(decoder.embed_tokens, "weight", None)
    mine = stage_layer_indices(len(layers), num_stages, stage_index)
    decoder.layers = nn.ModuleDict({str(i): layers[i] for i in mine})
    if stage_index != 0:
        decoder.register_module("embed_tokens", None)
    if stage_index != num_stages - 1:
        decoder.register_module("norm", None)
        causal_lm.register_module("lm_head", None)
    trained_tied = tied and num_stages > 1 and head_weight is not None and bool(head_weight.requires_grad)
    return DecoderStage(model, paths, stage_index, num_stages, mine, autocast_dtype, trained_tied)


# --------------------------------------------------------------------------- padding


def pad_batch(batch: Batch, width: int, rows: int, pad_id: int) -> Batch:
    """`batch` widened to `width` columns and grown to `rows` rows, without changing its loss.

    New columns are padding (pad tokens, no label, masked out; packed rows get them as a block
    of their own, positions from 0). New rows copy the first row with every label masked, so
    attention never sees an all-masked row.
    """
    current_rows, current_width = batch.input_ids.shape
    if current_width > width or current_rows > rows:
        raise ValueError(
            f"a micro batch of {current_rows} × {current_width} tokens does not fit the pipeline's "
            f"{rows} × {width}: raise the runner's seq_length (training.max_seq_length)"
        )
    extra = width - current_width

    def widen(tensor: torch.Tensor, fill: int | torch.Tensor) -> torch.Tensor:
        if extra == 0:
            return tensor
        if isinstance(fill, torch.Tensor):
            tail = fill.expand(current_rows, extra)
        else:
            tail = torch.full((current_rows, extra), fill, dtype=tensor.dtype)
        return torch.cat([tensor, tail.to(tensor.dtype)], dim=1)

    def grow(tensor: torch.Tensor, first_row: torch.Tensor) -> torch.Tensor:
        if rows == current_rows:
            return tensor
        return torch.cat([tensor, first_row.unsqueeze(0).expand(rows - current_rows, -1)], dim=0)

    input_ids = widen(batch.input_ids, pad_id)
    labels = widen(batch.labels, IGNORE_INDEX)
    position_ids = widen(batch.position_ids, torch.arange(extra))
    segment_ids = widen(batch.segment_ids, -1)
    mask = None if batch.attention_mask is None else widen(batch.attention_mask, 0)
    return replace(
        batch,
        input_ids=grow(input_ids, input_ids[0]),
        labels=grow(labels, torch.full_like(labels[0], IGNORE_INDEX)),
        position_ids=grow(position_ids, position_ids[0]),
        attention_mask=None if mask is None else grow(mask, mask[0]),
        segment_ids=grow(segment_ids, segment_ids[0]),
    )


# --------------------------------------------------------------------------- running


@dataclass
class StepSums:
    """Sums over this rank's micro batches: the loss and the loss function's extras.

    Real values on the last stage, zeros on the others, so a sum over all ranks is the total.
    """

    loss: float
    extras: dict[str, float]


class PipelineRunner:
    """Runs one optimizer step (forward + backward) or one evaluation batch through the pipeline.

    `group` is the pipeline group of this rank (`mesh.group("pp")`); `stage.stage_index` must be
    this rank's pp coordinate. Every rank of the group passes the same micro batches (its data
    parallel shard). `extra_keys` names what the loss function returns besides the loss, so
    that every stage returns the same keys.
    """

    def __init__(
        self,
        stage: DecoderStage,
        group: ProcessGroup | None,
        device: torch.device,
        n_microbatches: int,
        micro_batch_size: int,
        seq_length: int,
        loss_fn: StageLoss,
        pad_id: int,
        extra_keys: Sequence[str] = (),
    ) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        if stage.num_stages < 2:
            raise ValueError("a pipeline needs at least 2 stages; run a single stage as a normal model")
        self.stage, self.group = stage, group
        self.is_first, self.is_last = stage.is_first, stage.is_last
        self.device, self.n_microbatches = device, n_microbatches
        self.micro_batch_size, self.seq_length, self.pad_id = micro_batch_size, seq_length, pad_id
        self.loss_fn, self.extra_keys = loss_fn, tuple(sorted(extra_keys))
        index, count = stage.stage_index, stage.num_stages
        self.train_stage = PipelineStage(stage, index, count, device, group=group)
        # 1F1B keeps at most `stages` micro batches of activations alive; it needs that many to fill the pipe.
        schedule_type = Schedule1F1B if n_microbatches >= count else ScheduleGPipe
        self.schedule = schedule_type(self.train_stage, n_microbatches, loss_fn=self._train_loss, scale_grads=False)
        # Evaluation has its own stage: buffers sized for one micro batch, and no gradients.
        self.eval_stage = PipelineStage(stage, index, count, device, group=group)
        self.eval_schedule = ScheduleGPipe(self.eval_stage, 1, loss_fn=self._eval_loss, scale_grads=False)
        self._batches: list[Batch] = []
        self._scale = 1.0
        self._sums: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}

    @property
    def schedule_name(self) -> str:
        return type(self.schedule).__name__

    def _record(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        index = int(target[0])  # the target is the micro batch's index (see _inputs)
        loss_sum, extras = self.loss_fn(logits, self._batches[index])
        if tuple(sorted(extras)) != self.extra_keys:
            raise ValueError(f"the loss returned extras {sorted(extras)}, the runner expects {list(self.extra_keys)}")
        # The schedule's shape inference calls this once with placeholder activations for
        # micro batch 0; the real call for micro batch 0 comes later and replaces it.
        self._sums[index] = (loss_sum.detach(), {key: value.detach() for key, value in extras.items()})
        return loss_sum

    def _train_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._record(logits, target) * self._scale

    def _eval_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._record(logits, target)

    def _inputs(self, batches: list[Batch]) -> dict[str, Any]:
        self._batches, self._sums = batches, {}
        arg_mbs: list[tuple[torch.Tensor, ...]] = []
        kwarg_mbs: list[dict[str, torch.Tensor]] = []
        for batch in batches:
            arg_mbs.append((batch.input_ids.to(self.device),) if self.is_first else ())
            kwargs = {"position_ids": batch.position_ids.to(self.device)}
            if batch.attention_mask is not None:
                kwargs["attention_mask"] = batch.attention_mask.to(self.device)
            kwarg_mbs.append(kwargs)
        targets = [torch.tensor([index], device=self.device) for index in range(len(batches))]
        return {"arg_mbs": arg_mbs, "kwarg_mbs": kwarg_mbs, "target_mbs": targets if self.is_last else None}

    def _sum(self, count: int) -> StepSums:
        if not self.is_last:
            return StepSums(0.0, dict.fromkeys(self.extra_keys, 0.0))
        loss = sum(float(self._sums[i][0]) for i in range(count))
        extras = {key: sum(float(self._sums[i][1][key]) for i in range(count)) for key in self.extra_keys}
        return StepSums(loss, extras)

    def train_step(self, micro_batches: Sequence[Batch], scale: float) -> StepSums:
        """Forward and backward of this rank's micro batches; gradients accumulate into .grad.

        Each micro batch's loss sum is multiplied by `scale` before its backward (e.g.
        1 / global label tokens, times the data-parallel size FSDP divides by).
        """
        if len(micro_batches) != self.n_microbatches:
            raise ValueError(
                f"the pipeline runs {self.n_microbatches} micro batches per step, got {len(micro_batches)}"
            )
        self._scale = scale
        padded = [pad_batch(b, self.seq_length, self.micro_batch_size, self.pad_id) for b in micro_batches]
        self.stage.train()
        self.schedule.step(**self._inputs(padded), return_outputs=False)
        self._sum_tied_gradients()
        return self._sum(len(padded))

    def _sum_tied_gradients(self) -> None:
        """First and last stage swap their gradients of a tied embedding and both add them up."""
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        weight = self.stage.tied_weight
        if weight is None:
            return
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        grad = weight.grad
        local = grad.to_local() if isinstance(grad, DTensor) else grad  # both ends shard it alike (dim 0)
        peer_stage = self.stage.num_stages - 1 if self.stage.is_first else 0
        peer = peer_stage if self.group is None else dist.get_global_rank(self.group, peer_stage)
        received = torch.empty_like(local)
        ops = [
            dist.P2POp(dist.isend, local.clone(), peer, self.group),
            dist.P2POp(dist.irecv, received, peer, self.group),
        ]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        local.add_(received)

    @torch.no_grad()
    def evaluate(self, batch: Batch) -> float:
        """The loss sum of one batch (validation), on the last stage; 0.0 on the others."""
        padded = pad_batch(batch, self.seq_length, self.micro_batch_size, self.pad_id)
        self.stage.eval()
        self.eval_schedule.eval(**self._inputs([padded]))
        return self._sum(1).loss
