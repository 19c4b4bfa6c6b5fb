"""Processes, devices, the device mesh and FSDP2: the distributed plumbing of automodel.

Under torchrun the environment names this process's rank; alone, the world is one
process and no process group is created (nothing to synchronise). The backend is NCCL on
GPUs and gloo on CPU. The job's layout becomes one device mesh (`parallel.mesh`); a model
is first split over the tensor-parallel ranks (`parallel.tensor`), then sharded with
FSDP2 (`fully_shard`) over the data × context parallel ranks: each decoder layer is one
unit, the root holds the rest.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from kubetune_trainer.parallel.mesh import Dim, ParallelDims, ParallelMesh, build_mesh

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device
    mesh: ParallelMesh = field(default=None)  # type: ignore[assignment]
    """This rank's place in the job's layout (pure data parallel when no layout is given)."""

    def __post_init__(self) -> None:
        if self.mesh is None:  # a plain world (tests, tools): every rank is a data-parallel rank
            object.__setattr__(self, "mesh", ParallelMesh(ParallelDims(dp=self.size), self.rank, self.device, None))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(dims: ParallelDims | None = None) -> World:
    """Read torchrun's environment; create the process group and the mesh of `dims`
    (default: every rank data parallel) when there are several ranks."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(minutes=int(os.environ.get("KUBETUNE_DIST_TIMEOUT_MINUTES", "30"))),
        )
    dims = dims or ParallelDims(dp=size)
    if dims.world_size != size:
        return World(rank=rank, local_rank=local_rank, size=size, device=device)  # check_supported reports it
    return World(rank, local_rank, size, device, build_mesh(dims, rank, size, device))


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_sum(world: World, values: list[float], group: dist.ProcessGroup | None = None) -> list[float]:
    """Sum a few scalars over all ranks, or over `group` (float64 on the process group's device)."""
    if not world.distributed:
        return list(values)
    device = world.device if world.device.type == "cuda" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, group=group)
    return [float(v) for v in tensor.tolist()]


def any_rank(world: World, flag: bool) -> bool:
    """True if `flag` is set on any rank (e.g. one rank received SIGTERM)."""
    return all_sum(world, [1.0 if flag else 0.0])[0] > 0


def broadcast_int(world: World, value: int) -> int:
    if not world.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, found by the class names transformers marks as unsplittable."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return [module for module in model.modules() if type(module).__name__ in names]


@dataclass
class ParallelModel:
    """A model split and sharded for this rank's place in the mesh."""

    module: nn.Module
    partial_grad_params: list[nn.Parameter]
    """Replicated over TP but fed split activations: gradients summed over TP after backward."""
    gradient_divisor: int
    """What FSDP2 divides the reduced gradients by (the data × context parallel size, or 1)."""


def parallelize(model: nn.Module, world: World) -> ParallelModel:
    """Context-parallel attention over "cp", tensor parallel over "tp" (the model's own
    plan), then FSDP2 over "dp" × "cp"."""
    from kubetune_trainer.parallel.context import ContextParallel
    from kubetune_trainer.parallel.tensor import apply_tensor_parallel

    mesh = world.mesh
    ContextParallel.from_mesh(mesh).apply(model)
    partial: list[nn.Parameter] = []
    tp_mesh = mesh.submesh("tp")
    if tp_mesh is not None:
        partial = apply_tensor_parallel(model, tp_mesh)
    fsdp_mesh = mesh.submesh("dp", "cp")
    if fsdp_mesh is None:
        return ParallelModel(model, partial, 1)
    return ParallelModel(shard(model, fsdp_mesh, world.device), partial, fsdp_mesh.size())


def shard(model: nn.Module, mesh: DeviceMesh, device: torch.device) -> nn.Module:
    """FSDP2 over `mesh`: one unit per decoder layer plus the root (parameters sharded on dim 0)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # On GPUs compute in bf16 and reduce gradients in fp32; on CPU everything stays fp32.
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if device.type == "cuda"
        else MixedPrecisionPolicy()
    )
    layers = decoder_layers(model)
    if not layers:
        raise RuntimeError(f"cannot find the decoder layers of {type(model).__name__} to shard with FSDP2")
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def sum_over(world: World, values: list[float], *dims: Dim) -> list[float]:
    """Sum a few scalars over the ranks that differ only in `dims` (no-op when those have size 1)."""
    group = world.mesh.group(*dims)
    return list(values) if group is None else all_sum(world, values, group)


def clip_gradients(params: list[nn.Parameter], max_norm: float, world: World) -> float:
    """Clip the global gradient norm of parameters that may be DTensors on different meshes.

    torch's `clip_grad_norm_` needs all gradients on one mesh; here TP-split, FSDP-sharded
    and replicated parameters mix, and pipeline stages hold different parameters.
    """
    grads = [p.grad for p in params if p.grad is not None]
    # One norm per (mesh, placements) group: one collective per group, not per parameter.
    groups: dict[object, list[torch.Tensor]] = {}
    for grad in grads:
        spec = getattr(grad, "_spec", None)
        key = (id(spec.mesh), spec.placements) if spec is not None else None
        groups.setdefault(key, []).append(grad.detach())
    total = 0.0
    for members in groups.values():
        group_norm = torch.nn.utils.get_total_norm(members, norm_type=2.0)
        full = getattr(group_norm, "full_tensor", None)
        total += float(full() if full is not None else group_norm) ** 2
    squared = sum_over(world, [total], "pp")[0]
    norm = math.sqrt(squared)
    coefficient = max_norm / (norm + 1e-6)
    if coefficient < 1.0:
        for grad in grads:
            grad.detach().mul_(coefficient)
    return norm


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip the reduce-scatter on all but the last micro batch of a step (FSDP2 only)."""
    setter: Any = getattr(model, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(enabled)


def full_state_dict(model: nn.Module, world: World, trainable_only: bool) -> dict[str, Any]:
    """The unsharded state dict on CPU (every rank must call this; rank 0 gets the tensors)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    state: dict[str, Any] = get_model_state_dict(model, options=options)
    return state
