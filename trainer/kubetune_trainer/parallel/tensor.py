"""Tensor parallel with the model's own plan, LoRA adapters included.

transformers ships a tensor-parallel plan with every decoder family it supports
(`config.base_model_tp_plan`: q/k/v and gate/up projections "colwise", o and down
projections "rowwise", Qwen3's q/k norms "replicated_with_grad_allreduce"). Those are the
Megatron pairs: a colwise linear splits its output features over the TP ranks, the rowwise
linear after it takes the split input and all-reduces its output, so each block costs one
all-reduce forward and one backward. This module applies that plan with torch's DTensor
(`parallelize_module`), as NeMo AutoModel and torchtitan do, and extends it to peft LoRA:

- colwise base layer: lora_A stays whole (replicated), lora_B is colwise like the base —
  its input gradient is all-reduced by the colwise input hook, so lora_A's gradient is whole;
- rowwise base layer: lora_A is rowwise like the base (input split, output all-reduced),
  lora_B stays whole on the reduced rank-r activations.

Embeddings, norms and the LM head stay replicated (their inputs are whole, so their
gradients are the same on every TP rank); expert weights of MoE blocks stay replicated too
(shard experts with expert parallel instead). Attention heads are inferred from the local
shard by transformers' attention modules, so TP must divide the query and KV head counts
(`kubetune.planning.layout.architecture_problems`: validation runs it when the Model
declares its head counts, the trainer on the model's config before loading weights).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

SPLIT_STYLES = ("colwise", "rowwise")
PARTIAL_GRAD_STYLE = "replicated_with_grad_allreduce"
"""Replicated weights applied to split activations (per-head norms): gradients summed over TP."""


def model_tp_plan(model: nn.Module) -> dict[str, str]:
    """The plan transformers ships for this model's family ({} when it has none).

    `model` may wrap the transformers model (peft, a pipeline stage): the first submodule
    with a config that has a plan gives it.
    """
    for module in model.modules():
        plan = getattr(getattr(module, "config", None), "base_model_tp_plan", None)
        if plan:
            return {str(key): str(style) for key, style in plan.items()}
    return {}


def _pattern(key: str) -> re.Pattern[str]:
    return re.compile(r"(?:^|\.)" + re.escape(key).replace(r"\*", r"\d+") + "$")


def planned_modules(model: nn.Module, plan: Mapping[str, str]) -> list[tuple[str, nn.Module, str]]:
    """(name, module, style) for every module of `model` the plan names."""
    patterns = [(_pattern(key), style) for key, style in plan.items()]
    found = []
    for name, module in model.named_modules():
        if ".lora_" in name or name.endswith("base_layer") or ".base_layer." in name:
            continue  # inside a peft wrapper: handled with its wrapper
        for pattern, style in patterns:
            if pattern.search(name):
                found.append((name, module, style))
                break
    return found


def _split(module: nn.Module, style: str, mesh: DeviceMesh) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    colwise = style == "colwise"
    base = getattr(module, "base_layer", None)
    if base is None:  # a plain linear layer
        parallelize_module(module, mesh, ColwiseParallel() if colwise else RowwiseParallel())
        return
    parallelize_module(base, mesh, ColwiseParallel() if colwise else RowwiseParallel())
    adapters: Any = module.lora_B if colwise else module.lora_A
    for adapter in adapters.values():
        parallelize_module(adapter, mesh, ColwiseParallel() if colwise else RowwiseParallel())


def _is_linear(module: nn.Module) -> bool:
    return isinstance(getattr(module, "base_layer", module), nn.Linear)


def apply_tensor_parallel(model: nn.Module, mesh: DeviceMesh) -> list[nn.Parameter]:
    """Split the planned linears over `mesh` (1-D, the TP ranks) in place.

    Returns the parameters whose gradients are partial on each TP rank and must be summed
    over the TP group after backward (see `sum_partial_gradients`).
    """
    plan = model_tp_plan(model)
    if not plan:
        raise ValueError(f"{type(model).__name__} has no tensor-parallel plan (config.base_model_tp_plan)")
    partial: list[nn.Parameter] = []
    split = 0
    for _, module, style in planned_modules(model, plan):
        if style in SPLIT_STYLES and _is_linear(module):
            _split(module, style, mesh)
            split += 1
        elif style == PARTIAL_GRAD_STYLE:
            partial.extend(p for p in module.parameters() if p.requires_grad)
        # Other styles (packed or grouped MoE experts, gathered outputs) are left replicated.
    if split == 0:
        raise ValueError(f"the tensor-parallel plan of {type(model).__name__} matched no linear layer")
    return partial


def sum_partial_gradients(params: list[nn.Parameter], group: dist.ProcessGroup | None) -> None:
    """All-reduce (sum) the gradients of `params` over the TP group (after backward)."""
    if group is None:
        return
    for param in params:
        grad = param.grad
        if grad is None:
            continue
        local = grad.to_local() if hasattr(grad, "to_local") else grad
        dist.all_reduce(local, group=group)
