"""The GPU memory pre-flight against its own formula and against NeMo Customizer's "GPU Memory
Guidelines" (its Training Configuration page).

NeMo Customizer's table (estimated GPU requirements by model size):

| Model Size | LoRA (1 GPU) | Full FT (min GPUs) |
| 1B         | 16 GB        | 1 × 24 GB          |
| 3B         | 24 GB        | 2 × 24 GB          |
| 7-8B       | 40 GB        | 2-4 × 80 GB        |
| 13B        | 80 GB        | 4 × 80 GB          |
| 70B        | 2 × 80 GB    | 8+ × 80 GB         |

At the table's recommendation the pre-flight must never refuse; well below it, it must
warn or refuse. Rows expect one exact verdict so that a change to the formula shows here.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest

from kubetune.api.automodel import AutomodelSpec
from kubetune.api.resources import Adapter, ModelSpec, Source
from kubetune.api.unsloth import UnslothSpec
from kubetune.planning.layout import compute_layout
from kubetune.planning.memory.estimate import GIB, MemoryEstimate, estimate_from_resolved, estimate_memory
from kubetune.planning.memory.verdict import FITS_FRACTION, check_memory, memory_report

B = 1_000_000_000


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def automodel(ft: str = "lora", gpus: int = 1, nodes: int = 1, **extra: Any) -> AutomodelSpec:
    total = gpus * nodes
    body = {
        "model": "student",
        "dataset": {"training": "train"},
        "training": {"finetuning_type": ft},
        "parallelism": {"num_gpus_per_node": gpus, "num_nodes": nodes},
        "batch": {"global_batch_size": 8 * total},
    }
    return AutomodelSpec.model_validate(_merge(body, extra))


def unsloth(**extra: Any) -> UnslothSpec:
    return UnslothSpec.model_validate(_merge({"model": {"name": "student"}, "dataset": {"path": "train"}}, extra))


def model(params: float | None, adapter: bool = False) -> ModelSpec:
    return ModelSpec(
        source=Source(uri="hf://org/model"),
        numParameters=None if params is None else int(params),
        adapter=Adapter(baseModel="base") if adapter else None,
    )


def estimate_of(section: AutomodelSpec | UnslothSpec, params: float, teacher: float | None = None) -> MemoryEstimate:
    result = estimate_memory(section, compute_layout(section), model(params), model(teacher) if teacher else None)
    assert result is not None
    return result


# --------------------------------------------------------------------------- NeMo Customizer's table

SEED_TABLE = [
    # (model size, finetuning_type, GPUs, GiB per GPU, verdict at the table's recommendation)
    (1 * B, "lora", 1, 16, "fits"),
    (1 * B, "all_weights", 1, 24, "fits"),
    (3 * B, "lora", 1, 24, "fits"),
    # fp32 master weights + AdamW are 16 bytes/param: 22.4 GiB of states per GPU on 2 GPUs
    (3 * B, "all_weights", 2, 24, "tight"),
    (7 * B, "lora", 1, 40, "fits"),
    (8 * B, "lora", 1, 40, "fits"),
    (7 * B, "all_weights", 2, 80, "fits"),
    (8 * B, "all_weights", 2, 80, "tight"),
    (8 * B, "all_weights", 4, 80, "fits"),
    (13 * B, "lora", 1, 80, "fits"),
    (13 * B, "all_weights", 4, 80, "fits"),
    # Without activation checkpointing 70B keeps ≈43 GiB of activations per micro batch.
    (70 * B, "lora", 2, 80, "tight"),
    (70 * B, "all_weights", 8, 80, "tight"),
    (70 * B, "all_weights", 16, 80, "tight"),
]


@pytest.mark.parametrize(("params", "ft", "gpus", "gib", "verdict"), SEED_TABLE)
def test_seed_table_recommendation_is_never_refused(params: int, ft: str, gpus: int, gib: int, verdict: str) -> None:
    check = check_memory(estimate_of(automodel(ft, gpus), params), gib)
    assert check.verdict == verdict, check.estimate.explain()
    assert not check.refuse


WELL_BELOW = [
    # (model size, finetuning_type, GPUs, GiB per GPU, verdict)
    (1 * B, "lora", 1, 4, "tight"),
    (1 * B, "lora", 1, 1, "cannot fit"),
    (1 * B, "all_weights", 1, 6, "cannot fit"),
    (3 * B, "lora", 1, 8, "tight"),
    (3 * B, "all_weights", 1, 16, "cannot fit"),
    (7 * B, "all_weights", 1, 24, "cannot fit"),
    (8 * B, "lora", 1, 16, "tight"),
    (8 * B, "lora", 1, 12, "cannot fit"),
    (8 * B, "all_weights", 1, 40, "cannot fit"),
    (13 * B, "lora", 1, 16, "cannot fit"),
    (13 * B, "all_weights", 1, 80, "cannot fit"),
    (70 * B, "lora", 1, 80, "cannot fit"),
    (70 * B, "all_weights", 4, 80, "cannot fit"),
]


@pytest.mark.parametrize(("params", "ft", "gpus", "gib", "verdict"), WELL_BELOW)
def test_well_below_the_seed_table_warns_or_refuses(params: int, ft: str, gpus: int, gib: int, verdict: str) -> None:
    assert check_memory(estimate_of(automodel(ft, gpus), params), gib).verdict == verdict


# --------------------------------------------------------------------------- directions


Case = tuple[AutomodelSpec | UnslothSpec, float, float | None]
"""(backend section, numParameters, teacher numParameters)."""


def _pair(light: Case, heavy: Case) -> tuple[MemoryEstimate, MemoryEstimate]:
    return estimate_of(*light), estimate_of(*heavy)


COMPARISONS: dict[str, tuple[Case, Case, str]] = {
    "unsloth 4-bit < automodel 16-bit LoRA": ((unsloth(), 8 * B, None), (automodel("lora"), 8 * B, None), "weights"),
    "unsloth 4-bit < unsloth 8-bit": (
        (unsloth(), 8 * B, None),
        (unsloth(model={"load_in_4bit": False, "load_in_8bit": True}), 8 * B, None),
        "weights",
    ),
    "unsloth 8-bit < unsloth 16-bit": (
        (unsloth(model={"load_in_4bit": False, "load_in_8bit": True}), 8 * B, None),
        (unsloth(model={"load_in_4bit": False}), 8 * B, None),
        "weights",
    ),
    "unsloth bf16 < unsloth float32": (
        (unsloth(model={"load_in_4bit": False}), 1 * B, None),
        (unsloth(model={"load_in_4bit": False, "dtype": "float32"}), 1 * B, None),
        "weights",
    ),
    "FSDP2 over 8 GPUs < over 2": (
        (automodel("all_weights", 8), 8 * B, None),
        (automodel("all_weights", 2), 8 * B, None),
        "floor",
    ),
    "two nodes < one node": (
        (automodel("all_weights", 8, nodes=2), 13 * B, None),
        (automodel("all_weights", 8), 13 * B, None),
        "optimizer",
    ),
    "LoRA < full weights": ((automodel("lora"), 3 * B, None), (automodel("all_weights"), 3 * B, None), "floor"),
    "LoRA on q,v < LoRA on all linear layers": (
        (automodel("lora", training={"lora": {"target_modules": ["q_proj", "v_proj"]}}), 8 * B, None),
        (automodel("lora"), 8 * B, None),
        "optimizer",
    ),
    "rank 8 < rank 64": (
        (automodel("lora", training={"lora": {"rank": 8}}), 8 * B, None),
        (automodel("lora", training={"lora": {"rank": 64}}), 8 * B, None),
        "gradients",
    ),
    "micro batch 1 < 4": (
        (automodel("lora"), 8 * B, None),
        (automodel("lora", batch={"micro_batch_size": 4, "global_batch_size": 8}), 8 * B, None),
        "activations",
    ),
    "max_seq_length 1024 < 4096": (
        (automodel("lora", training={"max_seq_length": 1024}), 8 * B, None),
        (automodel("lora", training={"max_seq_length": 4096}), 8 * B, None),
        "activations",
    ),
    "TP 2 < TP 1 on 2 GPUs": (
        (automodel("lora", 2, parallelism={"tensor_parallel_size": 2}), 8 * B, None),
        (automodel("lora", 2), 8 * B, None),
        "activations",
    ),
    "CP 2 < CP 1 on 2 GPUs": (
        (automodel("lora", 2, parallelism={"context_parallel_size": 2}), 8 * B, None),
        (automodel("lora", 2), 8 * B, None),
        "activations",
    ),
    "unsloth gradient checkpointing < none": (
        (unsloth(), 8 * B, None),
        (unsloth(training={"use_gradient_checkpointing": False}), 8 * B, None),
        "activations",
    ),
    "unsloth adamw_8bit < adamw_torch (full weights)": (
        (unsloth(model={"load_in_4bit": False}, training={"finetuning_type": "all_weights"}), 1 * B, None),
        (
            unsloth(
                model={"load_in_4bit": False},
                training={"finetuning_type": "all_weights"},
                optimizer={"optim": "adamw_torch"},
            ),
            1 * B,
            None,
        ),
        "optimizer",
    ),
    "paged 8-bit optimizer lowers the floor": (
        (
            unsloth(
                model={"load_in_4bit": False},
                training={"finetuning_type": "all_weights"},
                optimizer={"optim": "paged_adamw_8bit"},
            ),
            1 * B,
            None,
        ),
        (unsloth(model={"load_in_4bit": False}, training={"finetuning_type": "all_weights"}), 1 * B, None),
        "floor",
    ),
}

_DISTILL = {"training_type": "distillation", "teacher_model": "teacher"}
COMPARISONS |= {
    "offloaded teacher < teacher on the GPU": (
        (automodel("lora", training={**_DISTILL, "offload_teacher": True}), 1.7 * B, 8 * B),
        (automodel("lora", training=_DISTILL), 1.7 * B, 8 * B),
        "teacher",
    ),
    "bf16 teacher < fp32 teacher": (
        (automodel("lora", training=_DISTILL), 1.7 * B, 8 * B),
        (automodel("lora", training={**_DISTILL, "teacher_precision": "fp32"}), 1.7 * B, 8 * B),
        "teacher",
    ),
    "SFT < distillation": (
        (automodel("lora"), 1.7 * B, None),
        (automodel("lora", training=_DISTILL), 1.7 * B, 8 * B),
        "floor",
    ),
}


@pytest.mark.parametrize("case", sorted(COMPARISONS))
def test_direction(case: str) -> None:
    light, heavy, part = COMPARISONS[case]
    lighter, heavier = _pair(light, heavy)
    assert getattr(lighter, part) < getattr(heavier, part), (lighter.explain(), heavier.explain())
    assert lighter.total <= heavier.total


# --------------------------------------------------------------------------- the formula itself


@pytest.mark.parametrize(
    ("section", "params", "expected"),
    [
        # full weights, one GPU: fp32 master 4 + grads 4 + AdamW 8 bytes/param; floor 2 + 2 + 4
        (automodel("all_weights"), 1 * B, {"weights": 4, "gradients": 4, "optimizer": 8, "floor": 8}),
        # FSDP2 over 4 GPUs divides every sharded tensor by 4
        (automodel("all_weights", 4), 1 * B, {"weights": 1, "gradients": 1, "optimizer": 2, "floor": 2}),
        # unsloth full weights in bf16 with adamw_8bit: 2 + 2 + 2 bytes/param, no sharding
        (
            unsloth(model={"load_in_4bit": False}, training={"finetuning_type": "all_weights"}),
            1 * B,
            {"weights": 2, "gradients": 2, "optimizer": 2, "floor": 6},
        ),
    ],
)
def test_bytes_per_parameter(section: AutomodelSpec | UnslothSpec, params: int, expected: dict[str, float]) -> None:
    result = estimate_of(section, params)
    for part, bytes_per_param in expected.items():
        assert getattr(result, part) == pytest.approx(bytes_per_param * params / GIB), part


# A Llama-3.2-1B-like shape: hidden 2048, 16 layers, 128,256-token vocabulary, tied embeddings.
SHAPED = {"hiddenSize": 2048, "numLayers": 16, "vocabSize": 128256, "tieWordEmbeddings": True}
EMBEDDING = 2048 * 128256
DECODER = 1.24 * B - EMBEDDING


@pytest.mark.parametrize(
    ("parallelism", "held"),
    [
        # FSDP2 over DP shards everything
        ({"num_gpus_per_node": 4}, (DECODER + EMBEDDING) / 4),
        # TP splits the decoder layers and keeps the (tied) embedding whole; DP 2 shards both
        ({"num_gpus_per_node": 4, "tensor_parallel_size": 2}, DECODER / 4 + EMBEDDING / 2),
        # PP: half the layers per stage; the first stage's embedding and the last stage's
        # tied LM head are each a whole copy
        ({"num_gpus_per_node": 2, "pipeline_parallel_size": 2}, DECODER / 2 + EMBEDDING),
        # CP shards like DP (FSDP2 over DP × CP)
        ({"num_gpus_per_node": 2, "context_parallel_size": 2}, (DECODER + EMBEDDING) / 2),
    ],
)
def test_full_weights_per_part_sharding(parallelism: dict[str, int], held: float) -> None:
    section = automodel("all_weights", parallelism=parallelism)
    declared = model(1.24 * B).model_copy(update=SHAPED)
    result = estimate_memory(section, compute_layout(section), declared)
    assert result is not None
    assert result.weights == pytest.approx(4 * held / GIB)
    assert result.optimizer == pytest.approx(8 * held / GIB)
    # the floor is the least any trainer could hold: everything sharded over every GPU
    assert result.floor == pytest.approx(8 * 1.24 * B / GIB / result.gpus)


def test_lora_adapter_split_by_tensor_parallel() -> None:
    one, tp4 = (automodel("lora", gpus, parallelism={"tensor_parallel_size": gpus}) for gpus in (1, 4))
    declared = model(1.24 * B).model_copy(update=SHAPED)
    single, split = (estimate_memory(s, compute_layout(s), declared) for s in (one, tp4))
    assert single is not None and split is not None
    # one matrix of each A/B pair is split over 4 GPUs, the other kept whole: 5/8 of the adapter
    assert split.gradients == pytest.approx(single.gradients * (1 + 1 / 4) / 2)


def test_lora_floor_is_the_16_bit_base_plus_a_small_adapter() -> None:
    result = estimate_of(automodel("lora"), 8 * B)
    assert 2 * 8 * B / GIB < result.floor < 1.05 * 2 * 8 * B / GIB


FLOOR_GRID = list(
    itertools.product(
        ["lora", "all_weights"],
        [1, 8],
        [0.1 * B, 8 * B, 70 * B],
    )
)


@pytest.mark.parametrize(("ft", "gpus", "params"), FLOOR_GRID)
def test_floor_never_exceeds_the_estimate(ft: str, gpus: int, params: float) -> None:
    # The refusal uses the floor: above the estimate it could refuse a job the estimate fits.
    for section in (
        automodel(ft, gpus),
        automodel(ft, gpus, training=_DISTILL),
        unsloth(training={"finetuning_type": ft}, model={"load_in_4bit": ft == "lora"}),
        unsloth(optimizer={"optim": "paged_adamw_8bit"}),
    ):
        result = estimate_of(section, params, 2 * params)
        assert 0 < result.floor <= result.weights + result.gradients + result.optimizer + result.teacher
        assert result.floor <= result.total


# --------------------------------------------------------------------------- unknowns


@pytest.mark.parametrize(
    ("section", "student", "teacher"),
    [
        (automodel(), None, None),
        (automodel(), model(None), None),
        (unsloth(), model(None), None),
        (automodel(), model(8 * B, adapter=True), None),
        (automodel(training=_DISTILL), model(1 * B), None),
        (automodel(training=_DISTILL), model(1 * B), model(None)),
        (automodel(training=_DISTILL), model(1 * B), model(8 * B, adapter=True)),
    ],
)
def test_unknown_sizes_give_no_estimate(
    section: AutomodelSpec | UnslothSpec, student: ModelSpec | None, teacher: ModelSpec | None
) -> None:
    assert estimate_memory(section, compute_layout(section), student, teacher) is None


def test_estimate_from_resolved_references() -> None:
    section = automodel(training=_DISTILL)
    resolved = {"model": model(1 * B), "teacher": model(8 * B)}
    assert estimate_from_resolved(section, compute_layout(section), resolved) == estimate_of(section, 1 * B, 8 * B)
    assert estimate_from_resolved(section, compute_layout(section), {"model": model(1 * B)}) is None


# --------------------------------------------------------------------------- verdict


def _scaled(result: MemoryEstimate, total: float, floor: float) -> MemoryEstimate:
    # Only the sums matter to the verdict: put the whole estimate into one part.
    return dataclasses.replace(
        result, weights=total, gradients=0.0, optimizer=0.0, activations=0.0, teacher=0.0, overhead=0.0, floor=floor
    )


@pytest.mark.parametrize(
    ("total", "floor", "gpu", "verdict"),
    [
        (9.0, 5.0, 10.0, "fits"),
        (9.01, 5.0, 10.0, "tight"),
        (30.0, 10.0, 10.0, "tight"),
        (30.0, 10.01, 10.0, "cannot fit"),
    ],
)
def test_verdict_thresholds(total: float, floor: float, gpu: float, verdict: str) -> None:
    check = check_memory(_scaled(estimate_of(automodel(), 1 * B), total, floor), gpu)
    assert check.verdict == verdict
    assert check.refuse == (verdict == "cannot fit")
    assert check.warn == (verdict == "tight")
    assert FITS_FRACTION == 0.9


@pytest.mark.parametrize(
    ("section", "params", "teacher", "gpu", "verdict", "advice"),
    [
        (automodel("all_weights"), 7 * B, None, 24, "cannot fit", "training.finetuning_type: lora"),
        (automodel("all_weights"), 7 * B, None, 24, "cannot fit", "more GPUs: at least"),
        (automodel("lora"), 8 * B, None, 16, "tight", "the unsloth backend with load_in_4bit: true"),
        (unsloth(model={"load_in_4bit": False}), 8 * B, None, 16, "tight", "model.load_in_4bit: true (≈"),
        (
            unsloth(model={"load_in_4bit": False}, training={"finetuning_type": "all_weights"}),
            8 * B,
            None,
            24,
            "cannot fit",
            "training.finetuning_type: lora with model.load_in_4bit: true",
        ),
        (
            unsloth(batch={"per_device_train_batch_size": 16}),
            8 * B,
            None,
            12,
            "tight",
            "per_device_train_batch_size: 1",
        ),
        (
            unsloth(training={"use_gradient_checkpointing": False}),
            8 * B,
            None,
            12,
            "tight",
            "use_gradient_checkpointing: unsloth",
        ),
        (
            automodel("lora", batch={"micro_batch_size": 8, "global_batch_size": 8}),
            8 * B,
            None,
            40,
            "tight",
            "batch.micro_batch_size: 1",
        ),
        (automodel("all_weights", training=_DISTILL), 1.7 * B, 8 * B, 40, "tight", "training.offload_teacher: true"),
        (
            automodel("lora", training={**_DISTILL, "teacher_precision": "fp32"}),
            1 * B,
            8 * B,
            24,
            "cannot fit",
            "training.teacher_precision: bf16",
        ),
    ],
)
def test_message_says_what_to_change(
    section: AutomodelSpec | UnslothSpec, params: float, teacher: float | None, gpu: float, verdict: str, advice: str
) -> None:
    check = check_memory(estimate_of(section, params, teacher), gpu)
    assert check.verdict == verdict
    assert advice in check.message, check.message
    finding = check.finding()
    assert finding is not None
    assert finding.path == f"spec.{'automodel' if isinstance(section, AutomodelSpec) else 'unsloth'}"
    assert finding.reason == {"tight": "MemoryTight", "cannot fit": "MemoryCannotFit"}[verdict]


def test_more_gpus_suggestion_is_the_smallest_world_that_fits() -> None:
    check = check_memory(estimate_of(automodel("all_weights"), 7 * B), 80)
    suggestion = next(s for s in check.suggestions if s.startswith("more GPUs"))
    needed = int(suggestion.split("at least ")[1].split(" ")[0])
    assert check_memory(estimate_of(automodel("all_weights", needed), 7 * B), 80).verdict == "fits"
    assert check_memory(estimate_of(automodel("all_weights", needed - 1), 7 * B), 80).verdict != "fits"


def test_fits_has_no_finding_and_no_advice() -> None:
    check = check_memory(estimate_of(automodel(), 1 * B), 80)
    assert (check.verdict, check.finding(), check.suggestions, check.reason) == ("fits", None, (), "MemoryFits")


def test_gpu_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        check_memory(estimate_of(automodel(), 1 * B), 0)


# --------------------------------------------------------------------------- shapes for status and CLI


def test_status_and_json_shapes() -> None:
    result = estimate_of(automodel("lora", 2), 8 * B)
    assert result.as_status().wire()["totalGiB"] == result.as_dict()["total_gib"]
    assert set(result.as_status().wire()) == {
        "weightsGiB",
        "gradientsGiB",
        "optimizerGiB",
        "activationsGiB",
        "teacherGiB",
        "overheadGiB",
        "totalGiB",
        "floorGiB",
        "gpus",
    }
    assert result.as_dict()["total_gib"] == round(result.total, 1)
    assert result.as_dict()["gpus"] == 2
    text = result.explain()
    for part in ("weights", "gradients", "optimizer", "activations", "teacher", "overhead", "floor"):
        assert f"\n  {part}" in text


@pytest.mark.parametrize(
    ("gpu", "expected_keys"),
    [(None, set()), (16.0, {"gpuMemoryGiB", "verdict", "message"})],
)
def test_memory_report(gpu: float | None, expected_keys: set[str]) -> None:
    result = estimate_of(automodel("lora"), 8 * B)
    report = memory_report(result, gpu)
    assert report is not None
    assert set(report.wire()) - set(result.as_status().wire()) == expected_keys
    assert memory_report(None, gpu) is None
