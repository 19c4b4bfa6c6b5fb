"""Read the resolved job and refuse, up front and clearly, what this trainer cannot do.

The resolved job (`kubetune.planning.resolved.ResolvedJob`) is the only input. Checks
here run before anything heavy is loaded:

- parallel sizes the trainer does not run yet are refused (running them as plain data
  parallel would silently change the job), and so is a layout the model cannot be split
  into (heads or layers not divisible), read from its config before the weights load;
- the number of processes must be the layout's world size (the global batch and the
  gradient accumulation were planned for it);
- requested integrations need their package in the trainer image.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kubetune.api.automodel import AutomodelSpec
from kubetune.planning.layout import Architecture, architecture_problems
from kubetune.planning.resolved import ResolvedJob


class ConfigError(ValueError):
    """The job cannot run in this trainer; the message says why and what to change."""


def load_job(path: str | Path) -> ResolvedJob:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read the job config {path}: {error}") from None
    try:
        return ResolvedJob.model_validate(json.loads(text))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: invalid JSON: {error}") from None
    except ValidationError as error:
        raise ConfigError(f"{path}: not a resolved kubetune job:\n{error}") from None


def automodel_section(job: ResolvedJob) -> AutomodelSpec:
    if job.backend != "automodel" or job.automodel is None:
        raise ConfigError(
            f"this entry point runs the automodel backend; the job uses {job.backend!r} "
            "(the unsloth backend has its own trainer image)"
        )
    return job.automodel


def check_supported(job: ResolvedJob, world_size: int) -> None:
    layout = job.layout
    unsupported = [
        f"{name} {size}"
        for name, size in (
            ("pipeline_parallel_size", layout.pipeline_parallel_size),
            ("expert_parallel_size", layout.expert_parallel_size),
        )
        if size > 1
    ]
    if unsupported:
        raise ConfigError(
            f"this trainer runs data, tensor and context parallel; the job asks for {', '.join(unsupported)}. "
            "Set spec.automodel.parallelism's pipeline/expert sizes to 1; the job was not started"
        )
    if world_size != layout.world_size:
        raise ConfigError(
            f"the job was planned for {layout.world_size} process(es) (num_nodes × num_gpus_per_node) but "
            f"{world_size} are running: launch it with torchrun --nproc-per-node matching num_gpus_per_node"
        )
    check_integrations(job)


def check_model_split(job: ResolvedJob, config: Any) -> None:
    """Refuse a layout this model (its transformers config) cannot be split into, before loading weights."""
    section = automodel_section(job)
    parallelism = section.parallelism
    heads = getattr(config, "num_attention_heads", None)
    architecture = Architecture(
        attention_heads=heads,
        key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
        layers=getattr(config, "num_hidden_layers", None),
        intermediate_size=getattr(config, "intermediate_size", None),
    )
    problems = [
        f"spec.automodel.parallelism.{field}: {message}"
        for field, message in architecture_problems(parallelism, architecture)
    ]
    if parallelism.tensor_parallel_size > 1 and not getattr(config, "base_model_tp_plan", None):
        problems.append(
            f"spec.automodel.parallelism.tensor_parallel_size: {type(config).__name__} has no tensor-parallel "
            "plan in transformers; set tensor_parallel_size: 1"
        )
    if problems:
        raise ConfigError(f"the model {job.paths.model} cannot be split as the layout asks: " + "; ".join(problems))


INTEGRATION_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}


def check_integrations(job: ResolvedJob) -> None:
    section = job.section
    integrations = section.integrations
    if integrations is None:
        return
    for name, package in INTEGRATION_PACKAGES.items():
        if getattr(integrations, name) is not None and importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"spec.{job.backend}.integrations.{name} is set, but the {package} package is not installed "
                f"in this trainer image: remove integrations.{name}, or use an image with {package} installed"
            )


@dataclass(frozen=True)
class RunOptions:
    """How to run (not what to train): set by `python -m kubetune_trainer` flags or `kubetune run`."""

    progress_bar: bool = True
    progress_file: str | None = None
    checkpoint_every: int | None = None
    """Optimizer steps between checkpoints; None = the validation cadence, else 10% of the run."""
    keep_checkpoints: int = 2
    metrics_port: int | None = None

    @staticmethod
    def from_environment(**overrides: object) -> RunOptions:
        port = os.environ.get("KUBETUNE_METRICS_PORT")
        every = os.environ.get("KUBETUNE_CHECKPOINT_EVERY_STEPS")
        values: dict[str, object] = {
            "metrics_port": int(port) if port else None,
            "checkpoint_every": int(every) if every else None,
            "progress_file": os.environ.get("KUBETUNE_PROGRESS_FILE") or None,
        }
        values.update({key: value for key, value in overrides.items() if value is not None})
        return RunOptions(**values)  # type: ignore[arg-type]
