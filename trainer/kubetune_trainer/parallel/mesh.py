"""One device mesh for a job's layout: pipeline × data × context × tensor parallel.

Ranks are laid out row-major over ("pp", "dp", "cp", "tp"), tensor parallel innermost so
that a TP group is made of neighbouring ranks (the GPUs of one node, where the bandwidth
is), as torchtitan and NeMo AutoModel order them. Rank r has coordinates
(pp, dp, cp, tp) = unravel(r, (PP, DP, CP, TP)).

What each dimension means for the training step:
- dp: ranks with different samples; FSDP2 shards parameters over dp × cp (flattened) and
  reduces their gradients there;
- cp: ranks with different slices of the same sequences (context parallel);
- tp: ranks with the same tokens and different slices of each weight matrix;
- pp: ranks with different decoder layers of the same model replica.
Expert parallel (MoE) is carved out of dp × cp: groups of `ep` consecutive dp × cp ranks
share the experts between them (NeMo AutoModel's layout), see `expert_groups`.

A single process has no process group: every coordinate is 0 and every group is None.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Literal

import torch

from kubetune.api.resources import Layout

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

Dim = Literal["pp", "dp", "cp", "tp"]
DIMS: tuple[Dim, ...] = ("pp", "dp", "cp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    pp: int = 1
    dp: int = 1
    cp: int = 1
    tp: int = 1
    ep: int = 1

    def __post_init__(self) -> None:
        sizes = {"pp": self.pp, "dp": self.dp, "cp": self.cp, "tp": self.tp, "ep": self.ep}
        bad = [f"{name}={size}" for name, size in sizes.items() if size < 1]
        if bad:
            raise ValueError(f"parallel sizes must be at least 1: {', '.join(bad)}")
        if (self.dp * self.cp) % self.ep:
            raise ValueError(f"expert parallel size {self.ep} must divide data × context parallel {self.dp * self.cp}")

    @staticmethod
    def from_layout(layout: Layout) -> ParallelDims:
        return ParallelDims(
            pp=layout.pipeline_parallel_size,
            dp=layout.data_parallel_size,
            cp=layout.context_parallel_size,
            tp=layout.tensor_parallel_size,
            ep=layout.expert_parallel_size,
        )

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.pp, self.dp, self.cp, self.tp)

    def size(self, dim: Dim) -> int:
        return int(getattr(self, dim))

    def coordinates(self, rank: int) -> dict[Dim, int]:
        """The (pp, dp, cp, tp) coordinates of a global rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside a world of {self.world_size}")
        coords: dict[Dim, int] = {}
        rest = rank
        for dim in reversed(DIMS):
            rest, coords[dim] = divmod(rest, self.size(dim))
        return {dim: coords[dim] for dim in DIMS}

    def describe(self) -> str:
        parts = [f"{dim}{self.size(dim)}" for dim in DIMS if self.size(dim) > 1]
        if self.ep > 1:
            parts.append(f"ep{self.ep}")
        return "×".join(parts) or "1 process"


@dataclass
class ParallelMesh:
    """This rank's place in the layout, and the process groups of each dimension."""

    dims: ParallelDims
    rank: int
    device: torch.device
    device_mesh: DeviceMesh | None
    """None for a single process."""

    @property
    def coords(self) -> dict[Dim, int]:
        return self.dims.coordinates(self.rank)

    @property
    def distributed(self) -> bool:
        return self.device_mesh is not None

    def coordinate(self, dim: Dim) -> int:
        return self.coords[dim]

    @property
    def data_rank(self) -> int:
        """Which data shard this rank trains on (its dp coordinate)."""
        return self.coordinate("dp")

    def submesh(self, *dims: Dim) -> DeviceMesh | None:
        """The mesh of these dimensions through this rank (flattened when several); None if size 1."""
        if self.device_mesh is None or all(self.dims.size(d) == 1 for d in dims):
            return None
        if len(dims) == 1:
            return self.device_mesh[dims[0]]
        return self.device_mesh[dims]._flatten("_".join(dims))

    def group(self, *dims: Dim) -> ProcessGroup | None:
        mesh = self.submesh(*dims)
        return None if mesh is None else mesh.get_group()

    @cached_property
    def expert_mesh(self) -> DeviceMesh | None:
        """("pp", "edp", "ep", "tp"): ep consecutive dp × cp ranks share the experts; None without EP.

        Every rank must read this property at the same point of the program (it creates groups).
        """
        if self.device_mesh is None or self.dims.ep == 1:
            return None
        from torch.distributed.device_mesh import init_device_mesh

        d = self.dims
        return init_device_mesh(
            self.device.type,
            (d.pp, d.dp * d.cp // d.ep, d.ep, d.tp),
            mesh_dim_names=("pp", "edp", "ep", "tp"),
        )


def build_mesh(dims: ParallelDims, rank: int, world_size: int, device: torch.device) -> ParallelMesh:
    """The mesh of this process (call after the default process group exists, if world_size > 1)."""
    if dims.world_size != world_size:
        raise ValueError(
            f"the layout {dims.describe()} needs {dims.world_size} processes, but {world_size} are running"
        )
    if world_size == 1:
        return ParallelMesh(dims, 0, device, None)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, dims.shape, mesh_dim_names=DIMS)
    return ParallelMesh(dims, rank, device, mesh)
