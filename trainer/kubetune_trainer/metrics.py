"""Prometheus export of progress (the W&B / MLflow integrations are in `tracking.py`).

When `KUBETUNE_METRICS_PORT` is set, rank 0 serves `/metrics` on that port with gauges
named `kubetune_trainer_*`, labelled with the job's namespace and name.
"""

from __future__ import annotations

from typing import Any

from kubetune_trainer.progress import ProgressEvent

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
        self.server, _serving_thread = start_http_server(port, registry=self.registry)

    def report(self, event: ProgressEvent) -> None:
        for field, gauge in self.gauges.items():
            value = getattr(event, field)
            if value is not None:
                gauge.labels(**self.labels).set(float(value))
        if event.kind == "checkpoint":
            self.checkpoints.labels(**self.labels).inc()

    def close(self) -> None:
        self.server.shutdown()
