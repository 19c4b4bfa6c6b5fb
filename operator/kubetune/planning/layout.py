"""The parallel layout of a job: the one place where GPU arithmetic lives.

NeMo Customizer's rules (seed, "GPU relationships and constraints"):
total_gpus = num_gpus_per_node × num_nodes; total_gpus must be divisible by TP × PP × CP;
data_parallel_size = total_gpus / (TP × PP × CP); global_batch_size must be divisible by
micro_batch_size × data_parallel_size, and gradient accumulation is the quotient.
The validator's rules, the CLI, the operator and the trainer all call these functions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kubetune.api.automodel import AutomodelBatch, AutomodelParallelism, AutomodelSpec
from kubetune.api.resources import LayoutStatus
from kubetune.api.unsloth import UnslothSpec


class LayoutError(ValueError):
    """The parallel sizes do not fit the GPUs or the batch; validation reports the details."""


@dataclass(frozen=True)
class Layout:
    total_gpus: int
    world_size: int
    data_parallel_size: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    context_parallel_size: int
    expert_parallel_size: int
    gradient_accumulation_steps: int

    def as_dict(self) -> dict[str, int]:
        """snake_case keys, as `kubetune validate -o json` prints them."""
        return asdict(self)

    def as_status(self) -> LayoutStatus:
        """`status.layout`."""
        return LayoutStatus(
            totalGpus=self.total_gpus,
            worldSize=self.world_size,
            dataParallelSize=self.data_parallel_size,
            tensorParallelSize=self.tensor_parallel_size,
            pipelineParallelSize=self.pipeline_parallel_size,
            contextParallelSize=self.context_parallel_size,
            expertParallelSize=self.expert_parallel_size,
            gradientAccumulationSteps=self.gradient_accumulation_steps,
        )


def total_gpus(parallelism: AutomodelParallelism) -> int:
    return parallelism.num_gpus_per_node * parallelism.num_nodes


def model_parallel_size(parallelism: AutomodelParallelism) -> int:
    """GPUs that hold one replica of the model: TP × PP × CP."""
    return parallelism.tensor_parallel_size * parallelism.pipeline_parallel_size * parallelism.context_parallel_size


def gpus_fit_model_parallel(parallelism: AutomodelParallelism) -> bool:
    return total_gpus(parallelism) % model_parallel_size(parallelism) == 0


def data_parallel_size(parallelism: AutomodelParallelism) -> int:
    if not gpus_fit_model_parallel(parallelism):
        raise LayoutError(
            f"total_gpus {total_gpus(parallelism)} is not divisible by TP×PP×CP {model_parallel_size(parallelism)}"
        )
    return total_gpus(parallelism) // model_parallel_size(parallelism)


def batch_fits_data_parallel(batch: AutomodelBatch, parallelism: AutomodelParallelism) -> bool:
    """True when the global batch splits into whole micro batches on every data-parallel rank."""
    if not gpus_fit_model_parallel(parallelism):
        return True  # the GPU rule reports this layout; this rule has nothing to add
    return batch.global_batch_size % (batch.micro_batch_size * data_parallel_size(parallelism)) == 0


def compute_layout(spec: AutomodelSpec | UnslothSpec) -> Layout:
    """The layout of a valid backend section; raises LayoutError on an invalid one."""
    if isinstance(spec, UnslothSpec):
        return Layout(
            total_gpus=1,
            world_size=1,
            data_parallel_size=1,
            tensor_parallel_size=1,
            pipeline_parallel_size=1,
            context_parallel_size=1,
            expert_parallel_size=1,
            gradient_accumulation_steps=spec.batch.gradient_accumulation_steps,
        )
    parallelism, batch = spec.parallelism, spec.batch
    dp = data_parallel_size(parallelism)
    if not batch_fits_data_parallel(batch, parallelism):
        raise LayoutError(
            f"global_batch_size {batch.global_batch_size} is not divisible by "
            f"micro_batch_size × data_parallel_size = {batch.micro_batch_size * dp}"
        )
    return Layout(
        total_gpus=total_gpus(parallelism),
        world_size=total_gpus(parallelism),
        data_parallel_size=dp,
        tensor_parallel_size=parallelism.tensor_parallel_size,
        pipeline_parallel_size=parallelism.pipeline_parallel_size,
        context_parallel_size=parallelism.context_parallel_size,
        expert_parallel_size=parallelism.expert_parallel_size or 1,
        gradient_accumulation_steps=batch.global_batch_size // (batch.micro_batch_size * dp),
    )
