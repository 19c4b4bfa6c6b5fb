"""Experiment tracking for real: a tiny automodel run logs to a real MLflow tracking server
(`mlflow server` on 127.0.0.1, started here) and to W&B in offline mode; both are read back.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune.api.automodel import AutomodelSpec
from kubetune.planning.layout import compute_layout
from kubetune.planning.resolved import JobIdentity, ResolvedPaths, resolve
from kubetune_trainer.__main__ import run_job
from kubetune_trainer.backends.automodel.engine import make_reporter
from kubetune_trainer.config import ConfigError, RunOptions
from kubetune_trainer.distributed import World
from kubetune_trainer.kube_status import KubernetesStatusReporter
from kubetune_trainer.progress import read_events

STEPS = 3


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server (SQLite store, proxied artifacts) on a free local port."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    executable = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    command = [
        executable,
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]
    log = (root / "server.log").open("wb")
    server = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    try:
        yield url
    finally:
        os.killpg(server.pid, 15)  # the server and its uvicorn worker
        server.wait(timeout=30)
        log.close()


def _step_losses(job_output: Path) -> dict[int, float]:
    events = read_events(job_output / "progress.jsonl")
    return {e.step: e.loss for e in events if e.kind == "step" and e.loss is not None}


def test_mlflow_run_has_params_step_metrics_and_the_final_model(
    mlflow_server: str,
    job_factory: Callable[..., Any],
    tiny_model: Path,
    task_data: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from mlflow import MlflowClient

    spec = {
        "schedule": {"max_steps": STEPS},
        "integrations": {"mlflow": {"tracking_uri": mlflow_server, "experiment_name": "kubetune-test"}},
    }
    job, _ = job_factory(tiny_model, task_data, spec=spec)
    output = Path(job.paths.output)
    run_job(job, RunOptions(progress_bar=False, progress_file=str(output / "progress.jsonl")))

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("kubetune-test")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == job.job.name and run.info.status == "FINISHED"
    assert run.data.params["training.lora.rank"] == str(job.section.training.lora.rank)  # type: ignore[union-attr]
    assert run.data.params["optimizer.learning_rate"] == str(job.section.optimizer.learning_rate)
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    expected = _step_losses(output)
    assert sorted(history) == list(range(1, STEPS + 1)) == sorted(expected)
    assert history == pytest.approx(expected)
    record = json.loads((output / job.output.name / "kubetune.json").read_text())
    assert run.data.tags["kubetune.output.name"] == job.output.name
    assert run.data.tags["kubetune.output.type"] == "adapter"
    assert run.data.metrics["final/train_loss"] == pytest.approx(record["metrics"]["train_loss"])
    downloaded = client.download_artifacts(run.info.run_id, "kubetune-result.json", str(output / "dl"))
    assert json.loads(Path(downloaded).read_text())["output.name"] == job.output.name
    url = f"{mlflow_server}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}"
    assert f"kubetune: mlflow run: {url}" in capsys.readouterr().err


def test_tracking_run_urls_go_to_the_job_status(
    in_cluster: None,
    mlflow_server: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The MLflow run's URL is patched into status.tracking and printed (kubetune run shows it)."""
    patches: list[dict[str, object]] = []
    monkeypatch.setattr(KubernetesStatusReporter, "_patch", lambda self, body: patches.append(body))
    section = AutomodelSpec.model_validate(
        {"model": "m", "dataset": {"training": "d"}, "integrations": {"mlflow": {"tracking_uri": mlflow_server}}}
    )
    job = resolve(
        section,
        compute_layout(section),
        JobIdentity(name="j", namespace="ns"),
        ResolvedPaths(model="/m", training="/d", output=str(tmp_path)),
    )
    reporter = make_reporter(
        job, World(rank=0, local_rank=0, size=1, device=torch.device("cpu")), RunOptions(progress_bar=False)
    )
    reporter.close()  # the run ends FAILED: no end event (a job that stopped early)
    [status] = [body["status"] for body in patches if "tracking" in body["status"]]  # type: ignore[operator,index]
    url = status["tracking"]["mlflowRunUrl"]  # type: ignore[index]
    assert url.startswith(f"{mlflow_server}/#/experiments/")
    assert f"kubetune: mlflow run: {url}" in capsys.readouterr().err


def test_mlflow_without_a_tracking_uri_fails_at_start(
    job_factory: Callable[..., Any], tiny_model: Path, task_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job, _ = job_factory(tiny_model, task_data, spec={"integrations": {"mlflow": {"experiment_name": "x"}}})
    with pytest.raises(ConfigError, match=r"spec.automodel.integrations.mlflow.tracking_uri is not set"):
        run_job(job, RunOptions(progress_bar=False))


# ----------------------------------------------------------------------------- W&B offline


def _wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of an offline run file (.wandb: a LevelDB-style log of Records)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B"
    block, offset, pending = 32768, 7, b""
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # block trailer: zero padding
            offset += block - offset % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        if length == 0 and kind == 0:
            offset += block - offset % block
            continue
        chunk = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def test_wandb_offline_run_files_hold_the_same_metrics(
    job_factory: Callable[..., Any],
    tiny_model: Path,
    task_data: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    spec = {"schedule": {"max_steps": STEPS}, "integrations": {"wandb": {"project": "kubetune-test", "tags": ["t"]}}}
    job, _ = job_factory(tiny_model, task_data, spec=spec)
    output = Path(job.paths.output)
    run_job(job, RunOptions(progress_bar=False, progress_file=str(output / "progress.jsonl")))

    (run_dir,) = (output / "wandb").glob("offline-run-*")
    (run_file,) = run_dir.glob("*.wandb")
    history: dict[int, float] = {}
    config: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for record in _wandb_records(run_file):
        if record.HasField("history"):
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if "train/loss" in items:
                history[int(items["_step"])] = float(items["train/loss"])
        if record.HasField("run"):  # the run's config travels with the run record
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        if record.HasField("summary"):
            summary.update({item.key: json.loads(item.value_json) for item in record.summary.update})
    expected = _step_losses(output)
    assert sorted(history) == list(range(1, STEPS + 1))
    assert history == pytest.approx(expected)
    assert config["training"]["lora"]["rank"] == job.section.training.lora.rank  # type: ignore[union-attr]
    assert summary["output.name"] == job.output.name and summary["output.type"] == "adapter"
    assert f"kubetune: wandb run: {run_dir.resolve().as_uri()}" in capsys.readouterr().err
