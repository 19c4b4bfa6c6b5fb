"""Context parallel: each rank of the cp group holds a slice of every sequence; attention is exact.

torch's own `context_parallel` runs only on GPU (on CPU its SDPA has no sharding strategy),
so this is a small exact scheme that runs on gloo (CPU) and NCCL (GPU) alike:

- Sharding (`ContextParallel.shard`): the row width is padded to a multiple of 2·cp and cut
  into 2·cp chunks; rank i keeps chunks i and 2·cp−1−i, so that under the causal mask every
  rank does the same attention work (load balancing). Labels are shifted BEFORE sharding
  (each token keeps the label of its global next token), so the loss needs no neighbour's
  token: `kubetune_trainer.losses` takes such aligned labels. Position ids travel with their tokens (RoPE sees
  global positions).
- Attention (`context_parallel_attention`, registered with transformers' AttentionInterface
  as `CP_ATTENTION`): each layer all-gathers K and V over the cp group with a differentiable
  collective (its backward sums the K/V gradients back to the rank that owns the tokens)
  and runs `F.scaled_dot_product_attention` of the local queries against all keys with a
  boolean mask built once per micro batch from global token indices: causal by global
  index, block-diagonal between packed examples (segment ids), padding masked.
- cp = 1 changes nothing: the model keeps its attention and `shard` returns the whole batch.

The mask is materialised: (batch, 1, width/cp, width) booleans per micro batch, and SDPA
with a mask uses the math / memory-efficient kernels, not flash. That is exact everywhere
and fine for moderate lengths; for very long sequences on GPU, torch's ring attention is the
faster path. Parameter gradients of the cp ranks are partial sums: they must be SUMMED over
the cp group (FSDP2 sharding over dp × cp does that reduction).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from kubetune_trainer.batching import model_inputs
from kubetune_trainer.data import IGNORE_INDEX
from kubetune_trainer.losses import shift_labels

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from kubetune_trainer.batching import Batch
    from kubetune_trainer.parallel.mesh import ParallelMesh

CP_ATTENTION = "kubetune_context_parallel"
"""The name of the attention function in transformers' AttentionInterface."""

# torch 2.14 marks this differentiable all-gather deprecated in favour of functional collectives
# whose backward needs reduce-scatter, which gloo lacks; it is the one that runs on CPU and GPU.
warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather is deprecated", FutureWarning)

_GROUP: list[ProcessGroup] = []
"""The cp group the attention function gathers over (one per process: set by `apply`)."""


# --------------------------------------------------------------------------- sharding


def padded_width(width: int, cp_size: int) -> int:
    """The smallest multiple of 2·cp at least `width`."""
    step = 2 * cp_size
    return -(-width // step) * step


def shard_indices(width: int, cp_rank: int, cp_size: int) -> torch.Tensor:
    """Global token indices rank `cp_rank` holds: chunks cp_rank and 2·cp−1−cp_rank of 2·cp."""
    if width % (2 * cp_size):
        raise ValueError(f"width {width} is not a multiple of 2 × context parallel size {cp_size}")
    chunk = width // (2 * cp_size)
    first = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    mirror = 2 * cp_size - 1 - cp_rank
    return torch.cat([first, torch.arange(mirror * chunk, (mirror + 1) * chunk)])


def gathered_indices(width: int, cp_size: int) -> torch.Tensor:
    """Global token index of each key after the all-gather (rank 0's shard, then rank 1's, ...)."""
    return torch.cat([shard_indices(width, rank, cp_size) for rank in range(cp_size)])


def attention_mask_for(
    segment_ids: torch.Tensor, valid: torch.Tensor, query_index: torch.Tensor, key_index: torch.Tensor
) -> torch.Tensor:
    """(batch, 1, queries, keys) booleans, True where a query may attend to a key.

    `segment_ids` and `valid` are (batch, width) in global token order; a query sees keys at
    or before its own global index, of its own example, that are not padding. Every query
    also sees itself, so that padding queries have one key and SDPA gives no NaN (their
    outputs carry no label and no real token attends to them).
    """
    causal = key_index[None, :] <= query_index[:, None]
    same_segment = segment_ids[:, query_index, None] == segment_ids[:, None, key_index]
    allowed = causal[None] & same_segment & valid[:, None, key_index]
    allowed |= (key_index[None, :] == query_index[:, None])[None]
    return allowed[:, None]


@dataclass
class ContextShard:
    """This rank's slice of a micro batch; `labels` are already shifted (see the module doc)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None
    """4-D boolean (batch, 1, local, width) under cp > 1; the batch's own mask under cp = 1."""
    num_label_tokens: int
    """Label tokens in this shard (the shards of a micro batch add up to the batch's count)."""

    def model_inputs(self, device: torch.device) -> dict[str, Any]:
        return model_inputs(self.input_ids, self.position_ids, self.attention_mask, device)


def shard_batch(batch: Batch, cp_rank: int, cp_size: int, pad_id: int = 0) -> ContextShard:
    """This rank's load-balanced slice of `batch` (every rank of the cp group gets the same batch)."""
    labels = shift_labels(batch.labels)
    if cp_size == 1:
        count = int((labels != IGNORE_INDEX).sum())
        return ContextShard(batch.input_ids, batch.position_ids, labels, batch.attention_mask, count)
    width = batch.input_ids.shape[1]
    extra = padded_width(width, cp_size) - width

    def pad(tensor: torch.Tensor, value: int) -> torch.Tensor:
        return F.pad(tensor, (0, extra), value=value)

    segments = pad(batch.segment_ids, -1)
    valid = segments >= 0
    if batch.attention_mask is not None:
        valid &= pad(batch.attention_mask, 0).bool()
    local = shard_indices(width + extra, cp_rank, cp_size)
    keys = gathered_indices(width + extra, cp_size)
    shard_labels = pad(labels, IGNORE_INDEX)[:, local]
    return ContextShard(
        input_ids=pad(batch.input_ids, pad_id)[:, local],
        # Padding positions are 0: in range for any position embedding, and masked anyway.
        position_ids=pad(batch.position_ids, 0)[:, local],
        labels=shard_labels,
        attention_mask=attention_mask_for(segments, valid, local, keys),
        num_label_tokens=int((shard_labels != IGNORE_INDEX).sum()),
    )


# --------------------------------------------------------------------------- loss


# --------------------------------------------------------------------------- attention


def context_parallel_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Local queries (batch, heads, local, dim) against the K/V of the whole cp group."""
    from torch.distributed.nn.functional import all_gather
    from transformers.integrations.sdpa_attention import repeat_kv

    if not _GROUP:
        raise RuntimeError("context parallel attention is set but no cp group is: call ContextParallel.apply(model)")
    if attention_mask is None or attention_mask.dim() != 4 or attention_mask.dtype != torch.bool:
        raise RuntimeError(
            "context parallel attention needs the 4-D boolean mask of ContextParallel.shard(batch): "
            "feed the model shard.model_inputs(device)"
        )
    group = _GROUP[0]
    keys = torch.cat(all_gather(key, group=group), dim=2)  # type: ignore[no-untyped-call]
    values = torch.cat(all_gather(value, group=group), dim=2)  # type: ignore[no-untyped-call]
    if attention_mask.shape[-1] != keys.shape[2]:
        raise RuntimeError(f"the mask covers {attention_mask.shape[-1]} keys but the cp group holds {keys.shape[2]}")
    repeats = int(getattr(module, "num_key_value_groups", 1))  # GQA: K/V heads shared by query heads
    keys, values = repeat_kv(keys, repeats), repeat_kv(values, repeats)
    output = F.scaled_dot_product_attention(
        query, keys, values, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
    )
    return output.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(CP_ATTENTION, context_parallel_attention)


def pretrained_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    base: nn.Module = get_base() if callable(get_base) else model
    return base


def check_supported(model: nn.Module) -> None:
    """Refuse models whose attention this mask does not describe (sliding windows)."""
    config = getattr(pretrained_model(model), "config", None)
    if config is None:
        raise ValueError(f"context parallel needs a transformers model, got {type(model).__name__}")
    layer_types = getattr(config, "layer_types", None) or []
    sliding = any(kind != "full_attention" for kind in layer_types)
    if not layer_types and getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        sliding = True
    if sliding:
        raise ValueError(
            f"context parallel supports full causal attention only; {config.model_type} uses sliding-window "
            "layers: set context_parallel_size: 1 for this model"
        )


# --------------------------------------------------------------------------- the cp group of a run


@dataclass(frozen=True)
class ContextParallel:
    """This rank's place in the cp group; size 1 (no group) leaves everything as it is."""

    group: ProcessGroup | None
    rank: int = 0
    size: int = 1

    @staticmethod
    def from_mesh(mesh: ParallelMesh) -> ContextParallel:
        return ContextParallel(mesh.group("cp"), mesh.coordinate("cp"), mesh.dims.cp)

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def apply(self, model: nn.Module) -> nn.Module:
        """Switch the model (peft-wrapped or not) to context parallel attention; cp = 1: untouched."""
        if not self.enabled:
            return model
        if self.group is None:
            raise ValueError(f"context parallel size {self.size} needs a process group")
        check_supported(model)
        register_attention()
        _GROUP[:] = [self.group]
        target = pretrained_model(model)
        target.set_attn_implementation(CP_ATTENTION)  # type: ignore[operator]
        if target.config._attn_implementation != CP_ATTENTION:  # type: ignore[union-attr]
            raise ValueError(
                f"{type(target).__name__} cannot switch its attention function (it does not use transformers' "
                "AttentionInterface): set context_parallel_size: 1 for this model"
            )
        return model

    def shard(self, batch: Batch, pad_id: int = 0) -> ContextShard:
        return shard_batch(batch, self.rank, self.size, pad_id)
