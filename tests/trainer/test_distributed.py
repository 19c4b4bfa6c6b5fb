"""Data parallel: 2 torchrun processes (FSDP2, gloo) follow the 1-process loss curve for the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from kubetune_trainer.progress import read_events

SPEC = {"schedule": {"max_steps": 12}, "batch": {"global_batch_size": 8, "micro_batch_size": 2}}


def losses(progress: Path) -> list[float]:
    return [float(e.loss) for e in read_events(progress) if e.kind == "step" and e.loss is not None]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "all_weights"])
def test_two_processes_match_one(
    job_factory: Callable[..., Any], tiny_model: Path, task_data: Path, tmp_path: Path, kind: str
) -> None:
    spec = {**SPEC, "training": {"finetuning_type": kind}}
    one, one_config = job_factory(tiny_model, task_data, spec=spec, output="one")
    two, two_config = job_factory(
        tiny_model, task_data, spec={**spec, "parallelism": {"num_gpus_per_node": 2}}, output="two"
    )
    assert (one.layout.gradient_accumulation_steps, two.layout.gradient_accumulation_steps) == (4, 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "kubetune_trainer", "--no-progress-bar"]
    single = subprocess.run(
        [*base, "--config", str(one_config), "--progress-file", str(tmp_path / "one.jsonl")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]
    double = subprocess.run(
        [*torchrun, *base[2:], "--config", str(two_config), "--progress-file", str(tmp_path / "two.jsonl")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert double.returncode == 0, double.stderr[-4000:]
    curve_one, curve_two = losses(tmp_path / "one.jsonl"), losses(tmp_path / "two.jsonl")
    assert len(curve_one) == len(curve_two) == 12
    assert max(abs(a - b) for a, b in zip(curve_one, curve_two, strict=True)) < 1e-4, (curve_one, curve_two)
    assert curve_one[-1] < curve_one[0]
    name = "adapter_model.safetensors" if kind == "lora" else "model.safetensors"
    a = load_file(Path(one.paths.output) / one.output.name / name)
    b = load_file(Path(two.paths.output) / two.output.name / name)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
