"""Expert parallel for the MoE models transformers ships (Qwen3-MoE, Mixtral, and the like).

transformers 5.x stores the experts of a MoE block as one module with two fused 3-D
parameters, `gate_up_proj` (experts, 2 × intermediate, hidden) and `down_proj` (experts,
hidden, intermediate), called as `experts(hidden_states, top_k_index, top_k_weights)` by
the block after its router. Expert parallel swaps that module for `ExpertParallelExperts`:

- each of the `ep` ranks keeps `num_experts / ep` consecutive experts (rank r owns experts
  [r·L, (r+1)·L)); the parameters keep their names and become DTensors `Shard(0)` on the
  ep mesh, so `torch.distributed.checkpoint` saves and loads them under any ep size;
- the router (`mlp.gate`) is untouched and replicated: every rank routes its own tokens
  exactly as the model does (same top-k, same normalisation, same jitter);
- the token copies (one per chosen expert) are sorted by expert, the per-expert counts are
  exchanged, and a differentiable all-to-all sends each copy to the rank that owns its
  expert; that rank runs its experts and a second all-to-all brings the results home,
  where they are weighted by the routing weights and summed per token, as the model's
  own eager forward does. The backward runs the two all-to-alls in reverse, so an expert's
  gradient holds the contributions of the tokens of every rank of the ep group.

Gradients: expert parameters see every token of their ep group, so they are reduced over
the expert-data-parallel group only (`ParallelMesh.expert_mesh["edp"]`); all other
parameters see this rank's tokens and are reduced over dp × cp as usual.
`expert_parameter_names` tells them apart; `distributed.clip_gradients` counts every expert
shard once in the global gradient norm (torch's `clip_grad_norm_` refuses DTensors on
several meshes next to plain tensors).

The Switch-Transformer load-balancing loss the models add when `output_router_logits` is on
is a product of batch means, so a rank's own tokens do not give the whole batch's value;
`load_balancing_loss` all-reduces its statistics over the data-parallel group.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils.parametrize import is_parametrized

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

    from kubetune_trainer.parallel.mesh import ParallelMesh

EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")
"""Config fields holding the number of routed experts: Mixtral / GPT-OSS `num_local_experts`,
Qwen2/3-MoE / OLMoE `num_experts`, DeepSeek-V3 `n_routed_experts` (first one present wins)."""


def expert_count(config: Any) -> int | None:
    """The number of routed experts a model config declares; None for a dense model."""
    for field in EXPERT_COUNT_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_expert_parallel(num_experts: int | None, ep: int, tp: int = 1) -> None:
    """Raise ValueError, saying what to change, when `ep` cannot shard this model's experts."""
    if ep == 1:
        return
    if num_experts is None:
        raise ValueError(f"expert_parallel_size {ep} needs a mixture-of-experts model; this model has no experts")
    if num_experts % ep:
        raise ValueError(
            f"expert_parallel_size {ep} must divide the model's {num_experts} experts; use a divisor of {num_experts}"
        )
    if tp != 1:
        raise ValueError(f"expert_parallel_size {ep} needs tensor_parallel_size 1 (got {tp})")


def _is_fused_experts(module: nn.Module) -> bool:
    """transformers' fused experts: 3-D gate_up_proj / down_proj and a num_experts count."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, torch.Tensor)
        and isinstance(down, torch.Tensor)
        and gate_up.dim() == 3
        and down.dim() == 3
        and isinstance(getattr(module, "num_experts", None), int)
    )


def _local_slice(param: torch.Tensor, rank: int, per_rank: int) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    full = param.full_tensor() if isinstance(param, DTensor) else param
    return full.detach()[rank * per_rank : (rank + 1) * per_rank].clone()


class ExpertParallelExperts(nn.Module):
    """The experts of one MoE block, sharded over the ep group; a drop-in for transformers' module."""

    gate_up_proj: nn.Parameter
    down_proj: nn.Parameter

    def __init__(self, experts: nn.Module, mesh: DeviceMesh) -> None:
        super().__init__()
        unsupported = [
            flag
            for flag, needed in (("has_bias", False), ("is_transposed", False), ("has_gate", True))
            if getattr(experts, flag, needed) != needed
        ]
        if unsupported or not getattr(experts, "is_concatenated", True):
            raise ValueError(
                f"{type(experts).__name__}: expert parallel supports fused [gate; up] experts without bias "
                f"in (out, in) layout; this one has {', '.join(unsupported) or 'interleaved gate/up'}"
            )
        from torch.distributed.tensor import DTensor, Shard

        self.num_experts: int = int(experts.num_experts)  # type: ignore[arg-type]
        self.ep_size = mesh.size()
        if self.num_experts % self.ep_size:
            raise ValueError(f"expert parallel size {self.ep_size} must divide the {self.num_experts} experts")
        self.ep_rank = mesh.get_local_rank()
        self.local_experts = self.num_experts // self.ep_size
        self.group: ProcessGroup = mesh.get_group()
        self.act_fn: nn.Module = experts.act_fn  # type: ignore[assignment]
        for name in ("gate_up_proj", "down_proj"):
            full: torch.Tensor = getattr(experts, name)
            local = _local_slice(full, self.ep_rank, self.local_experts)
            sharded = DTensor.from_local(
                local, mesh, [Shard(0)], run_check=False, shape=full.shape, stride=full.stride()
            )
            self.register_parameter(name, nn.Parameter(sharded, requires_grad=full.requires_grad))

    def extra_repr(self) -> str:
        return (
            f"experts {self.ep_rank * self.local_experts}..{(self.ep_rank + 1) * self.local_experts - 1} "
            f"of {self.num_experts} (ep rank {self.ep_rank} of {self.ep_size})"
        )

    def _run_local_experts(self, tokens: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """Each local expert's MLP on its consecutive rows of `tokens` (the model's eager maths)."""
        gate_up = self.gate_up_proj.to_local()  # type: ignore[attr-defined]
        down = self.down_proj.to_local()  # type: ignore[attr-defined]
        outputs = []
        for expert, rows in enumerate(torch.split(tokens, list(counts))):
            gate, up = nn.functional.linear(rows, gate_up[expert]).chunk(2, dim=-1)
            outputs.append(nn.functional.linear(self.act_fn(gate) * up, down[expert]))
        return torch.cat(outputs)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        from torch.distributed import all_to_all_single
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        top_k = top_k_index.shape[-1]
        ranks, local = self.ep_size, self.local_experts
        # One copy of a token per chosen expert, grouped by expert (so also by owning rank).
        chosen = top_k_index.reshape(-1)
        order = torch.argsort(chosen, stable=True)
        token_of_copy = order // top_k
        counts = torch.bincount(chosen, minlength=self.num_experts)
        received_counts = torch.empty_like(counts)
        all_to_all_single(received_counts, counts, group=self.group)
        # received_counts[w, j]: copies rank w sends to this rank's local expert j.
        received_counts = received_counts.view(ranks, local)
        send_splits = counts.view(ranks, local).sum(1).tolist()
        receive_splits = received_counts.sum(1).tolist()
        arrived = all_to_all_single_autograd(hidden_states[token_of_copy], receive_splits, send_splits, self.group)
        # Arrived rows are ordered (source rank, local expert): regroup them by expert.
        expert_of_row = torch.arange(local, device=counts.device).repeat(ranks)
        expert_of_row = expert_of_row.repeat_interleave(received_counts.reshape(-1))
        by_expert = torch.argsort(expert_of_row, stable=True)
        computed = self._run_local_experts(arrived[by_expert], received_counts.sum(0).tolist())
        answers = torch.empty_like(computed).index_copy(0, by_expert, computed)
        returned = all_to_all_single_autograd(answers, send_splits, receive_splits, self.group)
        weighted = returned * top_k_weights.reshape(-1)[order, None]
        final = torch.zeros_like(hidden_states)
        return final.index_add(0, token_of_copy, weighted.to(final.dtype))


def _resolve_ep_mesh(mesh: DeviceMesh | ParallelMesh) -> DeviceMesh | None:
    from kubetune_trainer.parallel.mesh import ParallelMesh

    if isinstance(mesh, ParallelMesh):
        expert_mesh = mesh.expert_mesh
        return None if expert_mesh is None else expert_mesh["ep"]
    if mesh.ndim != 1:
        raise ValueError(f"the expert-parallel mesh must be 1-D (the ep group), got dimensions {mesh.mesh_dim_names}")
    return mesh


def apply_expert_parallel(model: nn.Module, mesh: DeviceMesh | ParallelMesh) -> int:
    """Shard every MoE block's experts over the ep mesh, in place; returns how many blocks.

    `mesh` is the 1-D ep DeviceMesh, or the job's `ParallelMesh` (its `expert_mesh["ep"]` is
    used; with ep 1 nothing changes and 0 is returned). Call it on every rank, before FSDP2 and
    before the optimizer is built, after LoRA adapters are added (it keeps `requires_grad`).
    """
    ep_mesh = _resolve_ep_mesh(mesh)
    if ep_mesh is None:
        return 0
    targets = [(name, module) for name, module in model.named_modules() if _is_fused_experts(module)]
    if not targets:
        raise ValueError(
            f"{type(model).__name__} has no fused experts module (gate_up_proj / down_proj); "
            "expert parallel needs a transformers MoE model such as Qwen3-MoE or Mixtral"
        )
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if is_parametrized(module) or type(parent).__module__.startswith("peft."):
            # peft's LoRA on expert weights wraps the whole 3-D parameter; sharding it would
            # pair each rank's expert slice with the adapter of all experts.
            raise ValueError(
                f"{name}: LoRA on expert weights cannot be combined with expert parallel; "
                "target the attention (or dense MLP) projections only, or set expert_parallel_size to 1"
            )
        setattr(parent, child, ExpertParallelExperts(module, ep_mesh))
    return len(targets)


def expert_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of every expert-sharded parameter, with the full model's names."""
    for module_name, module in model.named_modules():
        if isinstance(module, ExpertParallelExperts):
            for name, param in module.named_parameters(recurse=False):
                yield f"{module_name}.{name}", param


def expert_parameter_names(model: nn.Module) -> frozenset[str]:
    """Names of the expert-sharded parameters: reduce their gradients over edp, the rest over dp × cp.

    Names, not tensors, because FSDP2 later swaps every parameter for a DTensor of its own
    while keeping the names; read this after `apply_expert_parallel` on the same model object.
    """
    return frozenset(name for name, _ in expert_parameters(model))


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
    group: ProcessGroup | None = None,
) -> torch.Tensor:
    """The models' Switch-Transformer auxiliary loss over the whole data-parallel batch.

    Same definition as transformers' `load_balancing_loss_func` (share of top-k assignments
    × mean router probability per expert, summed, × num_experts, over all layers' rows,
    padding excluded by `attention_mask`), with the per-expert sums and the row count
    all-reduced over `group` (the dp × cp ranks; None: this process only). Every rank gets the
    global value; the gradient on each rank holds only its own tokens' share, so summing the
    ranks' gradients (as the loop does for every non-expert parameter) gives the gradient of
    the global loss. Multiply by `config.router_aux_loss_coef` and add it once per rank.
    """
    from torch import distributed as dist

    device = router_logits[0].device
    assignments = torch.zeros(num_experts, dtype=torch.float32, device=device)
    probabilities = torch.zeros(num_experts, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    weights = None if attention_mask is None else attention_mask.reshape(-1).to(device, torch.float32)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = torch.topk(probs, top_k, dim=-1).indices
        row_weights = torch.ones(probs.shape[0], device=device) if weights is None else weights
        assignments = assignments.scatter_add(0, chosen.reshape(-1), row_weights.repeat_interleave(top_k))
        probabilities = probabilities + (probs * row_weights.unsqueeze(-1)).sum(0)
        rows = rows + row_weights.sum()
    if group is not None:
        # Counts carry no gradient; probability sums keep this rank's autograd path only:
        # global = local + (others' sum, a constant here).
        totals = torch.cat([assignments, rows.reshape(1), probabilities.detach()])
        local = totals.clone()
        dist.all_reduce(totals, group=group)
        assignments, rows = totals[:num_experts], totals[num_experts]
        probabilities = probabilities + (totals[num_experts + 1 :] - local[num_experts + 1 :])
    return torch.sum((assignments / rows) * (probabilities / rows)) * num_experts
