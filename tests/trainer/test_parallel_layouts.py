"""Model-parallel layouts train like one process: same per-step loss over 10 steps, same result.

Each layout runs under torchrun with gloo on CPU (one process per "GPU" of the layout) and
is compared with a single process on the same global batch. A checkpoint written under
one layout resumes under another (torch.distributed.checkpoint reshards it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from kubetune_trainer.checkpoint import CheckpointStore
from kubetune_trainer.progress import read_events

STEPS = 10
SPEC = {"schedule": {"max_steps": STEPS}, "batch": {"global_batch_size": 8, "micro_batch_size": 2}}
TOLERANCE = 1e-4
"""Per-step losses: every layout's within this of one process."""
WEIGHT_TOLERANCE = 1e-3
"""Final weights: a tenth of one AdamW step at the tests' learning rate (1e-2). Adam divides
each gradient by its own running magnitude, so an element whose gradient is near zero moves
by up to a whole step on a last-bit difference of the summation order (fused vs looped AdamW,
a chunked vs a full-logits loss, an MoE router score tie); a layout that trains wrongly
(a stage, shard or expert not updated, a gradient not reduced) is off by several steps."""

LAYOUTS: dict[str, dict[str, int]] = {
    "tp2": {"num_gpus_per_node": 2, "tensor_parallel_size": 2},
    "dp2xtp2": {"num_gpus_per_node": 4, "tensor_parallel_size": 2},
    "cp2": {"num_gpus_per_node": 2, "context_parallel_size": 2},
    "pp2": {"num_gpus_per_node": 2, "pipeline_parallel_size": 2},
    "dp2xpp2": {"num_gpus_per_node": 4, "pipeline_parallel_size": 2},
    "pp2xtp2": {"num_gpus_per_node": 4, "pipeline_parallel_size": 2, "tensor_parallel_size": 2},
    "ep2": {"num_gpus_per_node": 2, "expert_parallel_size": 2},
}
MOE_LAYOUTS = {"ep2"}
"""Layouts trained on the tiny MoE model (the others on the tiny dense Llama)."""


def run_trainer(config: Path, progress: Path, processes: int, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    module = ["-m", "kubetune_trainer", "--no-progress-bar", "--config", str(config), "--progress-file", str(progress)]
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    done = subprocess.run([*launcher, *module, *extra], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]


def step_losses(progress: Path) -> list[float]:
    return [float(e.loss) for e in read_events(progress) if e.kind == "step" and e.loss is not None]


def result_weights(job: Any, kind: str) -> dict[str, Any]:
    name = "adapter_model.safetensors" if kind == "lora" else "model.safetensors"
    return load_file(Path(job.paths.output) / job.output.name / name)


def assert_same_weights(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < WEIGHT_TOLERANCE


KINDS = ("lora", "all_weights", "distill")
"""SFT with a LoRA adapter, SFT of all weights, and logit distillation into a LoRA student."""


def spec_for(kind: str, parallelism: dict[str, int] | None = None) -> dict[str, Any]:
    # An fp32 teacher: a bf16 one rounds differently on a pipeline's padded micro batches or a
    # context-parallel slice, and the student would follow that rounding, not the layout.
    distill = {"training_type": "distillation", "finetuning_type": "lora", "teacher_precision": "fp32"}
    training = distill if kind == "distill" else {}
    training.setdefault("finetuning_type", kind)
    return {**SPEC, "training": training, **({"parallelism": parallelism} if parallelism else {})}


def weights_kind(kind: str) -> str:
    return "lora" if kind == "distill" else kind


Reference = Callable[[str, Path], tuple[list[float], dict[str, Any]]]
"""(kind, model folder) -> the single-process per-step losses and result weights."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_teacher: Path, task_data: Path) -> Reference:
    """The single-process run of each kind and model (computed once per module)."""
    from tests.trainer.conftest import make_job

    cache: dict[tuple[str, Path], tuple[list[float], dict[str, Any]]] = {}

    def get(kind: str, model: Path) -> tuple[list[float], dict[str, Any]]:
        if (kind, model) not in cache:
            folder = tmp_path_factory.mktemp(f"reference-{kind}")
            teacher = tiny_teacher if kind == "distill" else None
            job, config = make_job(folder / "out", model, task_data, spec=spec_for(kind), teacher=teacher)
            run_trainer(config, folder / "progress.jsonl", 1)
            cache[kind, model] = (step_losses(folder / "progress.jsonl"), result_weights(job, weights_kind(kind)))
        return cache[kind, model]

    return get


DISTILLED_LAYOUTS = ("tp2", "pp2", "cp2", "ep2")
"""Distillation shares the SFT engine; one layout per dimension shows the teacher runs under it."""
CASES = [
    (layout, kind) for layout in sorted(LAYOUTS) for kind in KINDS if kind != "distill" or layout in DISTILLED_LAYOUTS
]


@pytest.mark.slow
@pytest.mark.parametrize(("layout", "kind"), CASES)
def test_layout_matches_one_process(
    job_factory: Callable[..., Any],
    reference: Reference,
    tiny_model: Path,
    tiny_moe_model: Path,
    tiny_teacher: Path,
    task_data: Path,
    tmp_path: Path,
    layout: str,
    kind: str,
) -> None:
    parallelism = LAYOUTS[layout]
    model = tiny_moe_model if layout in MOE_LAYOUTS else tiny_model
    teacher = tiny_teacher if kind == "distill" else None
    job, config = job_factory(model, task_data, spec=spec_for(kind, parallelism), output=layout, teacher=teacher)
    run_trainer(config, tmp_path / "progress.jsonl", job.layout.world_size)
    expected_losses, expected_weights = reference(kind, model)
    losses = step_losses(tmp_path / "progress.jsonl")
    assert len(losses) == len(expected_losses) == STEPS
    assert max(abs(a - b) for a, b in zip(losses, expected_losses, strict=True)) < TOLERANCE, (losses, expected_losses)
    assert_same_weights(result_weights(job, weights_kind(kind)), expected_weights)


@pytest.mark.slow
def test_checkpoint_saved_under_tp2_resumes_under_dp2(
    job_factory: Callable[..., Any],
    reference: Reference,
    tiny_model: Path,
    task_data: Path,
    tmp_path: Path,
) -> None:
    kind = "lora"
    tp_job, tp_config = job_factory(tiny_model, task_data, spec=spec_for(kind, LAYOUTS["tp2"]), output="shared")
    run_trainer(tp_config, tmp_path / "tp2.jsonl", 2, "--checkpoint-every", "5")
    # Keep only the mid-run checkpoint (step 5) and drop the result: as if the tp2 run stopped there.
    output = Path(tp_job.paths.output)
    shutil.rmtree(output / tp_job.output.name)
    store = CheckpointStore(output / "checkpoints")
    last = store.latest()
    assert last is not None and last.step == STEPS
    shutil.rmtree(last.path)
    resumed_from = store.latest()
    assert resumed_from is not None and resumed_from.step == 5

    dp_job, _ = job_factory(tiny_model, task_data, spec=spec_for(kind, {"num_gpus_per_node": 2}), output="dp2")
    dp_config = tmp_path / "dp2-on-shared.json"
    dp_document = json.loads(dp_job.model_dump_json())
    dp_document["paths"]["output"] = str(output)
    dp_config.write_text(json.dumps(dp_document), encoding="utf-8")
    run_trainer(dp_config, tmp_path / "dp2.jsonl", 2)

    expected_losses, expected_weights = reference(kind, tiny_model)
    resumed = step_losses(tmp_path / "dp2.jsonl")
    assert len(resumed) == STEPS - 5
    assert max(abs(a - b) for a, b in zip(resumed, expected_losses[5:], strict=True)) < TOLERANCE
    assert_same_weights(result_weights(tp_job, kind), expected_weights)
