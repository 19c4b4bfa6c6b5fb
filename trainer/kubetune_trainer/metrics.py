"""Reporters that export progress elsewhere: Prometheus, and the W&B / MLflow integrations.

Prometheus: when `KUBETUNE_METRICS_PORT` is set, rank 0 serves `/metrics` on that port
with gauges named `kubetune_trainer_*`, labelled with the job's namespace and name.

Integrations (`spec.<backend>.integrations`): `config.check_integrations` refuses a job
whose integration package is missing before anything loads; when it is installed, the
reporters below log every step's scalars to it.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from kubetune.api.integrations import Integrations
from kubetune_trainer.progress import ProgressEvent, Reporter

_GAUGES = {
    "step": ("kubetune_trainer_step", "Optimizer steps done"),
    "max_steps": ("kubetune_trainer_max_steps", "Optimizer steps planned"),
    "epoch": ("kubetune_trainer_epoch", "Fractional epoch"),
    "loss": ("kubetune_trainer_loss", "Training loss of the last step"),
    "val_loss": ("kubetune_trainer_val_loss", "Last validation loss"),
    "lr": ("kubetune_trainer_learning_rate", "Learning rate of the last step"),
    "tokens_per_second": ("kubetune_trainer_tokens_per_second", "Training throughput, all ranks"),
    "eta_seconds": ("kubetune_trainer_eta_seconds", "Estimated seconds to the end of training"),
}


class PrometheusReporter:
    def __init__(self, port: int, namespace: str, job: str, registry: Any = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        self.registry = registry if registry is not None else CollectorRegistry()
        self.labels = {"namespace": namespace, "job": job}
        self.gauges = {
            field: Gauge(name, help_text, list(self.labels), registry=self.registry)
            for field, (name, help_text) in _GAUGES.items()
        }
        self.checkpoints = Counter(
            "kubetune_trainer_checkpoints", "Checkpoints written", list(self.labels), registry=self.registry
        )
        self.server, self.thread = start_http_server(port, registry=self.registry)

    def report(self, event: ProgressEvent) -> None:
        for field, gauge in self.gauges.items():
            value = getattr(event, field)
            if value is not None:
                gauge.labels(**self.labels).set(float(value))
        if event.kind == "checkpoint":
            self.checkpoints.labels(**self.labels).inc()

    def close(self) -> None:
        self.server.shutdown()


def _scalars(event: ProgressEvent) -> dict[str, float]:
    values = {
        "train/loss": event.loss,
        "val/loss": event.val_loss,
        "train/lr": event.lr,
        "train/tokens_per_second": event.tokens_per_second,
        "train/epoch": event.epoch,
    }
    values.update({f"train/{key}": value for key, value in event.extra.items()})
    return {key: float(value) for key, value in values.items() if value is not None}


class WandbReporter:
    """Logs each step's scalars to a W&B run (API key from WANDB_API_KEY, set from the Secret)."""

    def __init__(self, settings: Any, output_name: str, job_name: str, config: dict[str, Any]) -> None:
        self.wandb = importlib.import_module("wandb")
        if settings.base_url:
            os.environ.setdefault("WANDB_BASE_URL", settings.base_url)
        self.run = self.wandb.init(
            project=settings.project or output_name,
            entity=settings.entity,
            name=settings.name or job_name,
            tags=settings.tags,
            notes=settings.notes,
            config=config,
        )

    def report(self, event: ProgressEvent) -> None:
        try:
            if event.kind in ("step", "validation"):
                self.run.log(_scalars(event), step=event.step)
        except Exception as error:  # tracking is best effort once running
            print(f"kubetune: wandb: {error}", file=sys.stderr)

    def close(self) -> None:
        self.run.finish()


class MlflowReporter:
    """Logs each step's scalars to an MLflow run (tracking URI from the job or MLFLOW_TRACKING_URI)."""

    def __init__(self, settings: Any, output_name: str, job_name: str, config: dict[str, Any]) -> None:
        self.mlflow = importlib.import_module("mlflow")
        if settings.tracking_uri:
            self.mlflow.set_tracking_uri(settings.tracking_uri)
        self.mlflow.set_experiment(settings.experiment_name or output_name)
        self.run = self.mlflow.start_run(
            run_name=settings.name or job_name, tags=settings.tags, description=settings.description
        )
        self.mlflow.log_params({key: str(value)[:500] for key, value in config.items()})

    def report(self, event: ProgressEvent) -> None:
        try:
            if event.kind in ("step", "validation"):
                self.mlflow.log_metrics(_scalars(event), step=event.step)
        except Exception as error:
            print(f"kubetune: mlflow: {error}", file=sys.stderr)

    def close(self) -> None:
        self.mlflow.end_run()


def integration_reporters(
    integrations: Integrations | None, output_name: str, job_name: str, config: dict[str, Any]
) -> list[Reporter]:
    if integrations is None:
        return []
    reporters: list[Reporter] = []
    if integrations.wandb is not None:
        reporters.append(WandbReporter(integrations.wandb, output_name, job_name, config))
    if integrations.mlflow is not None:
        reporters.append(MlflowReporter(integrations.mlflow, output_name, job_name, config))
    return reporters
