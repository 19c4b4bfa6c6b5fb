"""Checkpoints: SIGTERM at step k and a restart give the same result as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from kubetune_trainer.checkpoint import CheckpointStore
from kubetune_trainer.progress import read_events

SPEC = {"schedule": {"epochs": 6}, "batch": {"global_batch_size": 8, "micro_batch_size": 4}}


def trainer(config: Path, progress: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "kubetune_trainer", "--config", str(config), "--no-progress-bar"]
    return subprocess.Popen([*command, "--progress-file", str(progress), *extra], env=env, stderr=subprocess.PIPE)


def steps_done(progress: Path) -> int:
    if not progress.is_file():
        return 0
    return max((e.step for e in read_events(progress) if e.kind == "step"), default=0)


def weights(folder: Path, kind: str) -> dict[str, Any]:
    return load_file(folder / ("adapter_model.safetensors" if kind == "lora" else "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "all_weights"])
def test_sigterm_then_resume_equals_an_uninterrupted_run(
    job_factory: Callable[..., Any], tiny_model: Path, task_data: Path, tmp_path: Path, kind: str
) -> None:
    spec = {**SPEC, "training": {"finetuning_type": kind}}
    job, config = job_factory(tiny_model, task_data, spec=spec, output="interrupted")
    reference_job, reference_config = job_factory(tiny_model, task_data, spec=spec, output="reference")
    uninterrupted = trainer(reference_config, tmp_path / "reference.jsonl", "--checkpoint-every", "7")
    assert uninterrupted.wait(timeout=600) == 0, uninterrupted.stderr.read().decode()  # type: ignore[union-attr]

    progress = tmp_path / "interrupted.jsonl"
    first = trainer(config, progress, "--checkpoint-every", "7")
    while steps_done(progress) < 10 and first.poll() is None:
        time.sleep(0.02)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 143, first.stderr.read().decode()  # type: ignore[union-attr]
    stopped_at = CheckpointStore(Path(job.paths.output) / "checkpoints").latest()
    assert stopped_at is not None and 10 <= stopped_at.step < 108  # stopped mid-run, with a checkpoint
    # Debris of an interrupted write must never be loaded.
    checkpoints = Path(job.paths.output) / "checkpoints"
    (checkpoints / ".step-00000099.partial").mkdir()
    (checkpoints / "step-00000098").mkdir()  # no checkpoint.json: incomplete
    second = trainer(config, progress)
    assert second.wait(timeout=600) == 0, second.stderr.read().decode()  # type: ignore[union-attr]
    events = read_events(progress)
    assert any(e.kind == "start" and e.message and "resumed from" in e.message for e in events)
    assert not (checkpoints / ".step-00000099.partial").exists()

    got = weights(Path(job.paths.output) / job.output.name, kind)
    expected = weights(Path(reference_job.paths.output) / reference_job.output.name, kind)
    assert got.keys() == expected.keys()
    worst = max(float((got[k] - expected[k]).abs().max()) for k in got)
    assert worst <= 1e-5, worst
    # The loss curve after the restart continues the uninterrupted one.
    resumed = {e.step: e.loss for e in events if e.kind == "step"}
    reference = {e.step: e.loss for e in read_events(tmp_path / "reference.jsonl") if e.kind == "step"}
    assert resumed.keys() == reference.keys() == set(range(1, 109))
    assert all(abs(resumed[s] - reference[s]) < 1e-5 for s in reference)  # type: ignore[operator]
