"""What the trainer refuses up front, and the progress reporters."""

from __future__ import annotations

import importlib.machinery
import io
import json
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer.__main__ import main, run_job
from kubetune_trainer.config import ConfigError, RunOptions, check_model_split
from kubetune_trainer.metrics import PrometheusReporter
from kubetune_trainer.models import ModelError, load_config, local_model_path
from kubetune_trainer.progress import (
    ConsoleReporter,
    JsonLinesReporter,
    LogLinesReporter,
    ProgressEvent,
    read_events,
)


@pytest.mark.parametrize(
    ("parallelism", "message"),
    [
        # The tiny model has 4 query heads and 2 key/value heads: 4-way tensor parallel would cut heads.
        ({"num_gpus_per_node": 4, "tensor_parallel_size": 4}, "tensor_parallel_size 4 must divide the model's 2 key"),
        ({"num_gpus_per_node": 4, "pipeline_parallel_size": 4}, "pipeline_parallel_size 4 is more than the model's 2"),
        ({"num_gpus_per_node": 2, "expert_parallel_size": 2}, "needs a mixture-of-experts model"),
    ],
)
def test_a_model_that_cannot_be_split_as_asked_is_refused_before_loading(
    job_factory: Callable[..., Any], tiny_model: Path, task_data: Path, parallelism: dict[str, int], message: str
) -> None:
    job, _ = job_factory(tiny_model, task_data, spec={"parallelism": parallelism, "batch": {"micro_batch_size": 1}})
    with pytest.raises(ConfigError, match=message):
        check_model_split(job, load_config(str(tiny_model)))


def test_a_model_that_can_be_split_as_asked_passes(
    job_factory: Callable[..., Any], tiny_model: Path, task_data: Path
) -> None:
    spec = {"parallelism": {"num_gpus_per_node": 4, "tensor_parallel_size": 2, "pipeline_parallel_size": 2}}
    job, _ = job_factory(tiny_model, task_data, spec={**spec, "batch": {"micro_batch_size": 1}})
    check_model_split(job, load_config(str(tiny_model)))


def test_world_size_must_match_the_layout(job_factory: Callable[..., Any], tiny_model: Path, task_data: Path) -> None:
    job, config = job_factory(tiny_model, task_data, spec={"parallelism": {"num_gpus_per_node": 2}})
    with pytest.raises(ConfigError, match="planned for 2 process"):
        run_job(job, RunOptions(progress_bar=False))
    assert main(["--config", str(config)]) == 2


def test_missing_integration_package_fails_at_start(
    job_factory: Callable[..., Any],
    tiny_model: Path,
    task_data: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An image without the tracking client refuses the job at start (the real image ships both)."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "mlflow" else find_spec(name))
    _, config = job_factory(tiny_model, task_data, spec={"integrations": {"mlflow": {"experiment_name": "x"}}})
    assert main(["--config", str(config), "--no-progress-bar"]) == 2
    assert "the mlflow package is not installed in this trainer image" in capsys.readouterr().err


def test_tracking_clients_are_installed() -> None:
    assert importlib.util.find_spec("mlflow") is not None and importlib.util.find_spec("wandb") is not None


def test_unreachable_hub_model_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"cannot download hf://org/none.*source.pvc or source.hostPath"):
        local_model_path("hf://org/none")
    with pytest.raises(ModelError, match="does not exist"):
        local_model_path("/nonexistent/model")


def test_empty_or_tiny_data_fails_before_the_model_loads(
    job_factory: Callable[..., Any], tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', encoding="utf-8")
    _, config = job_factory(tiny_model, data)
    assert main(["--config", str(config), "--no-progress-bar"]) == 1
    assert f"{data}:2: `completion` must be a string" in capsys.readouterr().err
    data.write_text('{"prompt": "a", "completion": "b"}\n' * 5, encoding="utf-8")
    assert main(["--config", str(config), "--no-progress-bar"]) == 1
    assert "fewer than batch.global_batch_size 8" in capsys.readouterr().err


EVENT = ProgressEvent(
    kind="step",
    step=5,
    max_steps=20,
    epoch=0.5,
    num_epochs=2,
    loss=1.25,
    lr=1e-3,
    tokens_per_second=900.0,
    eta_seconds=30.0,
)


def test_events_map_to_the_job_status_shape() -> None:
    status = EVENT.to_status().wire()
    assert status["percentageDone"] == 25.0 and status["trainLoss"] == 1.25 and status["maxSteps"] == 20
    assert "valLoss" not in status and status["updatedAt"].endswith("Z")


def test_json_lines_and_console_reporters(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    reporter = JsonLinesReporter(path)
    reporter.report(EVENT)
    reporter.close()
    assert read_events(path)[0].loss == 1.25 and json.loads(path.read_text())["percentage_done"] == 25.0
    stream = io.StringIO()
    console = ConsoleReporter(stream=stream)
    console.report(EVENT)
    console.report(ProgressEvent(kind="validation", step=5, max_steps=20, val_loss=0.5))
    console.close()
    text = stream.getvalue()
    assert "5/20" in text and "loss=1.2500" in text and "val_loss 0.5000" in text


def test_log_lines_reporter_throttles_steps_but_keeps_first_last_and_validation() -> None:
    stream = io.StringIO()
    lines = LogLinesReporter(stream=stream, interval_s=3600)
    for step in range(1, 21):
        lines.report(ProgressEvent(kind="step", step=step, max_steps=20, loss=1.0 / step, eta_seconds=75.0))
        if step == 10:
            lines.report(ProgressEvent(kind="validation", step=10, max_steps=20, val_loss=0.5))
    text = stream.getvalue().splitlines()
    assert text == [
        "step 1/20 (5.0%), epoch 0.00, loss 1.0000, eta 1m15s",
        "step 10: val_loss 0.5000",
        "step 20/20 (100.0%), epoch 0.00, loss 0.0500",
    ]
    assert "\r" not in stream.getvalue()


def test_prometheus_reporter_serves_metrics() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    reporter = PrometheusReporter(port, "team-a", "job-1")
    try:
        reporter.report(EVENT)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        reporter.close()
    assert 'kubetune_trainer_loss{job="job-1",namespace="team-a"} 1.25' in body
    assert 'kubetune_trainer_step{job="job-1",namespace="team-a"} 5.0' in body
