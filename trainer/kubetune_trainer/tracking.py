"""Experiment tracking (`spec.<backend>.integrations`): MLflow and Weights & Biases.

Each tracker is a progress `Reporter` on the main process:

- at start it opens a run named after the job and logs the job's settings as parameters
  (flattened: `training.lora.rank`), and says where the run is (`run_url`: the MLflow
  run's page, the W&B run's page or, offline, its folder);
- every optimizer step and validation logs the step's scalars (`train/loss`, `val/loss`,
  `train/lr`, ... at that step);
- at the end it logs the final model: output name, type, path, base model, final loss
  and the result's size, read from the result's `kubetune.json`.

Credentials come from the environment (WANDB_API_KEY, MLFLOW_TRACKING_TOKEN), set in the
pod from the Secret named by `api_key_secret` (kubetune.planning.tracking). A tracker
that cannot start fails the job at start with the field path (a run the user asked to
track is not silently untracked); once running, a logging error is printed and training
goes on.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from kubetune.api.integrations import MlflowIntegration, WandbIntegration
from kubetune.planning.resolved import ResolvedJob
from kubetune_trainer.config import ConfigError
from kubetune_trainer.outputs import RESULT_FILE, result_path
from kubetune_trainer.progress import ProgressEvent


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as `dotted.key: value` strings (MLflow parameters are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif value is not None:
            flat[name] = str(value)[:500]
    return flat


def step_scalars(event: ProgressEvent) -> dict[str, float]:
    values = {
        "train/loss": event.loss,
        "val/loss": event.val_loss,
        "train/lr": event.lr,
        "train/tokens_per_second": event.tokens_per_second,
        "train/epoch": event.epoch,
    }
    values.update({f"train/{key}": value for key, value in event.extra.items()})
    return {key: float(value) for key, value in values.items() if value is not None}


def final_model_info(job: ResolvedJob) -> dict[str, Any]:
    """What a tracker records about the result, from its kubetune.json (empty when absent)."""
    from kubetune_trainer.outputs import read_result

    folder = result_path(job.paths.output, job.output.name)
    if not (folder / RESULT_FILE).is_file():
        return {}
    record = read_result(folder)
    metrics = record.get("metrics") or {}
    info = {
        "output.name": job.output.name,
        "output.type": job.output.type,
        "output.path": str(folder),
        "output.base_model": record.get("base_model"),
        "output.training_type": record.get("training_type"),
        "output.finetuning_type": record.get("finetuning_type"),
        "output.dtype": record.get("dtype"),
        "output.size_bytes": record.get("size_bytes"),
        "final/train_loss": metrics.get("train_loss"),
        "final/val_loss": metrics.get("val_loss"),
        "final/steps": metrics.get("steps"),
    }
    return {key: value for key, value in info.items() if value is not None}


class MlflowTracker:
    """One MLflow run per job, through the tracking client (no global active run)."""

    def __init__(self, settings: MlflowIntegration, job: ResolvedJob, config: dict[str, Any]) -> None:
        mlflow = importlib.import_module("mlflow")
        self.job = job
        uri = settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise ConfigError(
                f"spec.{job.backend}.integrations.mlflow.tracking_uri is not set (nor MLFLOW_TRACKING_URI): "
                "set it to your MLflow tracking server, e.g. http://mlflow.mlflow.svc:5000"
            )
        self.uri = uri
        self.client = mlflow.MlflowClient(tracking_uri=self.uri)
        experiment_name = settings.experiment_name or job.output.name
        experiment = self.client.get_experiment_by_name(experiment_name)
        self.experiment_id = (
            experiment.experiment_id if experiment is not None else self.client.create_experiment(experiment_name)
        )
        tags = {**(settings.tags or {}), "kubetune.job": f"{job.job.namespace}/{job.job.name}"}
        if settings.description:
            tags["mlflow.note.content"] = settings.description
        run = self.client.create_run(self.experiment_id, run_name=settings.name or job.job.name, tags=tags)
        self.run_id: str = run.info.run_id
        params = flatten(config)
        entities = importlib.import_module("mlflow.entities")
        batch = [entities.Param(key, value) for key, value in params.items()]
        for start in range(0, len(batch), 100):  # the server takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=batch[start : start + 100])
        self.ended = False

    @property
    def run_url(self) -> str:
        base = self.uri.rstrip("/")
        if base.startswith(("http://", "https://")):
            return f"{base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return f"{base}/{self.experiment_id}/{self.run_id}"

    def report(self, event: ProgressEvent) -> None:
        try:
            if event.kind in ("step", "validation"):
                self.client.log_batch(self.run_id, metrics=self._metrics(step_scalars(event), event.step))
            elif event.kind == "end":
                self._log_result()
        except Exception as error:  # tracking is best effort once running
            print(f"kubetune: mlflow: {error}", file=sys.stderr)

    def _metrics(self, values: dict[str, float], step: int) -> list[Any]:
        entities = importlib.import_module("mlflow.entities")
        timestamp = int(time.time() * 1000)
        return [entities.Metric(key, value, timestamp, step) for key, value in values.items()]

    def _log_result(self) -> None:
        info = final_model_info(self.job)
        numbers = {key: float(value) for key, value in info.items() if isinstance(value, int | float)}
        texts = {key: str(value) for key, value in info.items() if key not in numbers}
        for key, value in texts.items():
            self.client.set_tag(self.run_id, f"kubetune.{key}", value)
        if numbers:
            self.client.log_batch(self.run_id, metrics=self._metrics(numbers, 0))
        self.client.log_dict(self.run_id, info, "kubetune-result.json")
        self.ended = True

    def close(self) -> None:
        try:
            self.client.set_terminated(self.run_id, status="FINISHED" if self.ended else "FAILED")
        except Exception as error:
            print(f"kubetune: mlflow: {error}", file=sys.stderr)


class WandbTracker:
    """One W&B run per job; its files go to the output volume (WANDB_MODE=offline works too)."""

    def __init__(self, settings: WandbIntegration, job: ResolvedJob, config: dict[str, Any]) -> None:
        wandb = importlib.import_module("wandb")
        self.job = job
        if settings.base_url:
            os.environ.setdefault("WANDB_BASE_URL", settings.base_url)
        self.run = wandb.init(
            project=settings.project or job.output.name,
            entity=settings.entity,
            name=settings.name or job.job.name,
            tags=settings.tags,
            notes=settings.notes,
            config=config,
            dir=str(job.paths.output),  # the root filesystem is read-only in a pod; keep the run with the job
        )
        self.ended = False

    @property
    def run_url(self) -> str:
        url: str | None = self.run.url
        return url if url else Path(self.run.dir).parent.resolve().as_uri()

    def report(self, event: ProgressEvent) -> None:
        try:
            if event.kind in ("step", "validation"):
                self.run.log(step_scalars(event), step=event.step)
            elif event.kind == "end":
                self.run.summary.update(final_model_info(self.job))
                self.ended = True
        except Exception as error:
            print(f"kubetune: wandb: {error}", file=sys.stderr)

    def close(self) -> None:
        self.run.finish(exit_code=0 if self.ended else 1)
        # `finish` can return before W&B's service process has written the last records to
        # the run file (seen in offline mode: the file held no history yet); stopping the
        # service waits for it, before the trainer process exits.
        importlib.import_module("wandb").teardown()


def start_trackers(job: ResolvedJob) -> dict[str, MlflowTracker | WandbTracker]:
    """The requested trackers, started; a tracker that cannot start is a ConfigError naming its field."""
    integrations = job.section.integrations
    if integrations is None:
        return {}
    config = job.section.model_dump(mode="json")
    trackers: dict[str, MlflowTracker | WandbTracker] = {}
    requested: list[tuple[str, Any, type[MlflowTracker] | type[WandbTracker]]] = [
        ("mlflow", integrations.mlflow, MlflowTracker),
        ("wandb", integrations.wandb, WandbTracker),
    ]
    for name, settings, tracker in requested:
        if settings is None:
            continue
        try:
            trackers[name] = tracker(settings, job, config)
        except ConfigError:
            raise
        except Exception as error:
            for started in trackers.values():
                started.close()
            raise ConfigError(
                f"spec.{job.backend}.integrations.{name}: the {name} run could not start "
                f"({type(error).__name__}: {error}); check the settings and credentials "
                f"(api_key_secret), or remove integrations.{name}"
            ) from None
    return trackers
