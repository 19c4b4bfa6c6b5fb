from __future__ import annotations

import pytest

from kubetune.api.automodel import AutomodelSpec
from kubetune.api.resources import CustomizationJobStatus
from kubetune.api.unsloth import UnslothSpec
from kubetune.planning.layout import Layout, LayoutError, compute_layout


def _automodel(parallelism: dict[str, int], batch: dict[str, int]) -> AutomodelSpec:
    return AutomodelSpec.model_validate(
        {"model": "m", "dataset": {"training": "d"}, "parallelism": parallelism, "batch": batch}
    )


@pytest.mark.parametrize(
    ("parallelism", "batch", "expected"),
    [
        ({}, {}, (1, 1, 1, 1, 1, 1, 8)),
        ({"num_gpus_per_node": 8}, {"global_batch_size": 16, "micro_batch_size": 2}, (8, 8, 1, 1, 1, 1, 1)),
        (
            {"num_nodes": 2, "num_gpus_per_node": 8, "tensor_parallel_size": 2},
            {"global_batch_size": 32, "micro_batch_size": 2},
            (16, 8, 2, 1, 1, 1, 2),
        ),
        (
            {
                "num_nodes": 4,
                "num_gpus_per_node": 8,
                "tensor_parallel_size": 2,
                "pipeline_parallel_size": 2,
                "context_parallel_size": 2,
            },
            {"global_batch_size": 64, "micro_batch_size": 1},
            (32, 4, 2, 2, 2, 1, 16),
        ),
        ({"num_gpus_per_node": 8, "expert_parallel_size": 4}, {"global_batch_size": 8}, (8, 8, 1, 1, 1, 4, 1)),
    ],
)
def test_automodel_layout(parallelism: dict[str, int], batch: dict[str, int], expected: tuple[int, ...]) -> None:
    layout = compute_layout(_automodel(parallelism, batch))
    total, dp, tp, pp, cp, ep, accumulation = expected
    assert layout == Layout(
        total_gpus=total,
        world_size=total,
        data_parallel_size=dp,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        context_parallel_size=cp,
        expert_parallel_size=ep,
        gradient_accumulation_steps=accumulation,
    )
    assert dp * tp * pp * cp == layout.world_size


@pytest.mark.parametrize(
    ("parallelism", "batch"),
    [({"num_gpus_per_node": 6, "tensor_parallel_size": 4}, {}), ({"num_gpus_per_node": 8}, {"global_batch_size": 12})],
)
def test_invalid_layouts_raise(parallelism: dict[str, int], batch: dict[str, int]) -> None:
    with pytest.raises(LayoutError):
        compute_layout(_automodel(parallelism, batch))


def test_unsloth_layout_is_one_gpu_with_its_accumulation() -> None:
    spec = UnslothSpec.model_validate(
        {"model": {"name": "m"}, "dataset": {"path": "d"}, "batch": {"gradient_accumulation_steps": 4}}
    )
    layout = compute_layout(spec)
    assert (layout.total_gpus, layout.world_size, layout.gradient_accumulation_steps) == (1, 1, 4)


def test_one_layout_is_camel_case_in_status_and_snake_case_elsewhere() -> None:
    layout = compute_layout(_automodel({}, {}))
    status = CustomizationJobStatus(layout=layout).wire()["layout"]
    by_name = layout.model_dump()
    assert list(status.values()) == list(by_name.values())
    assert set(status) == {
        "totalGpus",
        "worldSize",
        "dataParallelSize",
        "tensorParallelSize",
        "pipelineParallelSize",
        "contextParallelSize",
        "expertParallelSize",
        "gradientAccumulationSteps",
    }
    assert "gradient_accumulation_steps" in by_name  # the resolved job and `validate -o json`
    # Read back from either shape: the status the operator reads, the config the trainer reads.
    assert CustomizationJobStatus.model_validate({"layout": status}).layout == layout
    assert Layout.model_validate(by_name) == layout
