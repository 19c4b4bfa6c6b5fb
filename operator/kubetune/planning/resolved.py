"""The resolved job: the one contract between the operator (or `kubetune run`) and the trainer.

It is the validated backend section with every default filled in, the layout, and each
reference replaced by a local path. In a cluster the paths are mount points inside the
trainer pod; under `kubetune run` they are folders on this machine. The trainer cannot
tell the difference, and reads nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kubetune.api.automodel import LORA_FINETUNING_TYPES, AutomodelSpec
from kubetune.api.common import GROUP_VERSION
from kubetune.api.resources import Backend, Layout
from kubetune.api.unsloth import UnslothSpec
from kubetune.planning.names import default_output_name

OutputType = Literal["adapter", "model"]

MOUNT_MODEL = "/models/base"
MOUNT_TEACHER = "/models/teacher"
MOUNT_TRAINING = "/data/training"
MOUNT_VALIDATION = "/data/validation"
MOUNT_OUTPUT = "/output"
MOUNT_CONFIG = "/etc/kubetune/job.json"


class _Contract(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobIdentity(_Contract):
    name: str
    namespace: str = "default"
    uid: str | None = None


class ResolvedPaths(_Contract):
    model: str = Field(description="Folder with the base model (HF layout) or an hf:// URI.")
    teacher_model: str | None = Field(None, description="Folder with the teacher (distillation only).")
    training: str = Field(description="A data file, or a folder of them (training/ subfolder or the root).")
    validation: str | None = Field(None, description="Validation data; null = hold out 10% of training.")
    output: str = Field(description="Writable folder: checkpoints/ and the result.")


class ResolvedOutput(_Contract):
    name: str
    type: OutputType
    description: str | None = None


class ResolvedJob(_Contract):
    apiVersion: Literal["kubetune.io/v1alpha1"] = GROUP_VERSION  # type: ignore[assignment]
    kind: Literal["ResolvedJob"] = "ResolvedJob"
    job: JobIdentity
    backend: Backend
    automodel: AutomodelSpec | None = None
    unsloth: UnslothSpec | None = None
    layout: Layout
    paths: ResolvedPaths
    output: ResolvedOutput
    base_model: str = Field(description="The base Model reference as written (recorded in the output).")

    @property
    def section(self) -> AutomodelSpec | UnslothSpec:
        section = self.automodel if self.backend == "automodel" else self.unsloth
        assert section is not None, "a resolved job always holds its backend's section"
        return section


def output_type(section: AutomodelSpec | UnslothSpec) -> OutputType:
    """`adapter` for a plain LoRA result; `model` for merged or full weights (NeMo's rule)."""
    if isinstance(section, AutomodelSpec):
        training = section.training
        merged = training.finetuning_type == "lora_merged" or (training.lora is not None and training.lora.merge)
        return "adapter" if training.finetuning_type in LORA_FINETUNING_TYPES and not merged else "model"
    if section.training.finetuning_type == "lora" and section.output.save_method == "lora":
        return "adapter"
    return "model"


def output_name(section: AutomodelSpec | UnslothSpec, job_name: str) -> str:
    """The output Model's name: the one the job gives, else `<job>-output`."""
    given = section.output.name if section.output is not None else None
    return given or default_output_name(job_name)


def base_model_reference(section: AutomodelSpec | UnslothSpec) -> str:
    return section.model if isinstance(section, AutomodelSpec) else section.model.name


def output_model_details(
    section: AutomodelSpec | UnslothSpec, job: str, progress: Mapping[str, Any] | None
) -> dict[str, Any]:
    """`description` and `training` of the Model a finished job creates (`job` is `namespace/name`;
    `progress` the job's status.progress, whose last values are the final losses)."""
    progress = progress or {}
    training = {
        "job": job,
        "baseModel": base_model_reference(section),
        "backend": "automodel" if isinstance(section, AutomodelSpec) else "unsloth",
        "trainingType": section.training.training_type,
        "finetuningType": section.training.finetuning_type,
        "finalLoss": progress.get("trainLoss"),
        "finalValLoss": progress.get("valLoss"),
    }
    details: dict[str, Any] = {"training": {key: value for key, value in training.items() if value is not None}}
    description = section.output.description if section.output is not None else None
    if description:
        details["description"] = description
    return details


def resolve(
    section: AutomodelSpec | UnslothSpec,
    layout: Layout,
    job: JobIdentity,
    paths: ResolvedPaths,
) -> ResolvedJob:
    """Build the trainer's config from a validated section, its layout and the local paths."""
    backend: Backend = "automodel" if isinstance(section, AutomodelSpec) else "unsloth"
    description = section.output.description if section.output is not None else None
    return ResolvedJob(
        job=job,
        backend=backend,
        automodel=section if isinstance(section, AutomodelSpec) else None,
        unsloth=section if isinstance(section, UnslothSpec) else None,
        layout=layout,
        paths=paths,
        output=ResolvedOutput(name=output_name(section, job.name), type=output_type(section), description=description),
        base_model=base_model_reference(section),
    )
