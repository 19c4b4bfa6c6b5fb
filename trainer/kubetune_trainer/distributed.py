"""Processes, devices and FSDP2: the data-parallel plumbing of the automodel backend.

Under torchrun the environment names this process's rank; alone, the world is one
process and no process group is created (nothing to synchronise). The backend is NCCL on
GPUs and gloo on CPU. Models with more than one process are sharded with FSDP2
(`fully_shard`): each decoder layer is one unit, the root holds the rest.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world() -> World:
    """Read torchrun's environment; create the process group when there are several ranks."""
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
    return World(rank=rank, local_rank=local_rank, size=size, device=device)


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_sum(world: World, values: list[float]) -> list[float]:
    """Sum a few scalars over all ranks (float64 on the process group's device)."""
    if not world.distributed:
        return list(values)
    device = world.device if world.device.type == "cuda" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
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


def shard(model: nn.Module, world: World) -> nn.Module:
    """FSDP2: one unit per decoder layer plus the root (parameters sharded on dim 0)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(world.device.type, (world.size,), mesh_dim_names=("dp",))
    # On GPUs compute in bf16 and reduce gradients in fp32; on CPU everything stays fp32.
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if world.device.type == "cuda"
        else MixedPrecisionPolicy()
    )
    layers = decoder_layers(model)
    if not layers:
        raise RuntimeError(f"cannot find the decoder layers of {type(model).__name__} to shard with FSDP2")
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


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
