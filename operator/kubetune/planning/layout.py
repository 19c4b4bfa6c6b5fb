"""The parallel layout of a job: the one place where GPU arithmetic lives.

NeMo Customizer's rules ("GPU relationships and constraints"):
total_gpus = num_gpus_per_node × num_nodes; total_gpus must be divisible by TP × PP × CP;
data_parallel_size = total_gpus / (TP × PP × CP); global_batch_size must be divisible by
micro_batch_size × data_parallel_size, and gradient accumulation is the quotient.
The validator's rules, the CLI, the operator and the trainer all call these functions.
"""

from __future__ import annotations

from dataclasses import dataclass

from kubetune.api.automodel import AutomodelBatch, AutomodelParallelism, AutomodelSpec
from kubetune.api.resources import Layout
from kubetune.api.unsloth import UnslothSpec

__all__ = ["Layout", "LayoutError", "compute_layout"]


class LayoutError(ValueError):
    """The parallel sizes do not fit the GPUs or the batch; validation reports the details."""


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


@dataclass(frozen=True)
class Architecture:
    """What the layout needs to know of a model (None: not known here)."""

    attention_heads: int | None = None
    key_value_heads: int | None = None
    layers: int | None = None
    intermediate_size: int | None = None


def architecture_problems(parallelism: AutomodelParallelism, model: Architecture) -> list[tuple[str, str]]:
    """(field, message) for each way this model cannot be split as the layout asks.

    Tensor parallel splits heads and MLP features evenly (a head is never cut in two);
    pipeline parallel gives every stage at least one decoder layer.
    """
    problems: list[tuple[str, str]] = []
    tp, pp = parallelism.tensor_parallel_size, parallelism.pipeline_parallel_size
    for what, count in (
        ("attention heads", model.attention_heads),
        ("key/value heads", model.key_value_heads),
        ("MLP intermediate size", model.intermediate_size),
    ):
        if count is not None and count % tp:
            problems.append(
                (
                    "tensor_parallel_size",
                    f"tensor_parallel_size {tp} must divide the model's {count} {what}: choose a divisor of {count}",
                )
            )
    if model.layers is not None and pp > model.layers:
        problems.append(
            (
                "pipeline_parallel_size",
                f"pipeline_parallel_size {pp} is more than the model's {model.layers} decoder layers",
            )
        )
    return problems


def expert_parallel_fits(parallelism: AutomodelParallelism) -> bool:
    """EP is carved out of the data × context parallel ranks, so it must divide them."""
    ep = parallelism.expert_parallel_size or 1
    return (data_parallel_size(parallelism) * parallelism.context_parallel_size) % ep == 0


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
