"""Rules that need other objects: the Models and FileSets a job names.

These run wherever the objects are known: `kubetune validate` (objects in the input), the
admission webhook and every reconcile (objects from the API server). Where a value is not
known (a Model without `tokenizer`, a reference not in the input) the check is reported
as a warning or left to the trainer, never silently passed as "fine".
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from kubetune.api.automodel import AutomodelSpec
from kubetune.api.common import split_reference
from kubetune.api.resources import FileSetSpec, ModelSpec, Source
from kubetune.api.unsloth import UnslothSpec
from kubetune.planning.layout import Architecture, architecture_problems

RefKind = Literal["Model", "FileSet"]


@dataclass(frozen=True)
class ObjectKey:
    kind: RefKind
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True)
class Finding:
    path: str
    message: str
    reason: str


@dataclass(frozen=True)
class ReferenceUse:
    """One reference in a job: where it is written, what it must be, what it resolves to."""

    path: str
    kind: RefKind
    key: ObjectKey
    role: Literal["model", "teacher", "training", "validation"]


@dataclass
class Catalog:
    """Known Models and FileSets. `authoritative` means "absent is missing" (the API server)."""

    models: dict[tuple[str, str], ModelSpec] = field(default_factory=dict)
    filesets: dict[tuple[str, str], FileSetSpec] = field(default_factory=dict)
    authoritative: bool = False
    invalid: dict[ObjectKey, str] = field(default_factory=dict)
    """Objects that exist but fail their own validation, with the first error."""

    def get(self, key: ObjectKey) -> ModelSpec | FileSetSpec | None:
        table: Mapping[tuple[str, str], ModelSpec | FileSetSpec] = self.models if key.kind == "Model" else self.filesets
        return table.get((key.namespace, key.name))


ALLOWED_HOST_PATHS_SETTING = "allowedHostPaths"
"""The operator setting (Helm value; KUBETUNE_ALLOWED_HOST_PATHS) that lets hostPath sources in."""


def host_path_allowed(path: str, allowed_prefixes: Sequence[str]) -> bool:
    """Whether an absolute node path lies under one of the prefixes (whole path segments:
    `/data` covers `/data/x`, not `/database`; `..` is resolved first, so it cannot climb out)."""
    resolved = posixpath.normpath(path)
    for prefix in allowed_prefixes:
        root = posixpath.normpath(prefix)
        if resolved == root or resolved.startswith(root.rstrip("/") + "/"):
            return True
    return False


def cluster_source_problem(source: Source, allowed_host_paths: Sequence[str] = ()) -> str | None:
    """Why a source cannot be mounted in a cluster, or None.

    Relative and `~` hostPaths are for `kubetune run` (resolved against the manifest's folder);
    a node needs an absolute path. And a hostPath mounts a folder of the node into a pod the
    operator creates, which anyone allowed to create a Model could aim at `/` or a container
    runtime's socket: in a cluster it is refused unless the operator's allowedHostPaths covers it.
    """
    if source.hostPath is None:
        return None
    path = source.hostPath.path
    if not path.startswith("/"):
        return (
            f"spec.source.hostPath.path {path!r} is relative: in a cluster give an absolute "
            "path on the node (relative paths and ~ are for kubetune run only)"
        )
    if not host_path_allowed(path, allowed_host_paths):
        allowed = ", ".join(allowed_host_paths) if allowed_host_paths else "none"
        return (
            f"spec.source.hostPath.path {path!r} is not allowed in this cluster: the operator setting "
            f"{ALLOWED_HOST_PATHS_SETTING} (Helm value; allowed now: {allowed}) must list a prefix of it, "
            "because a hostPath mounts the node's own files into the trainer pod; use a pvc or uri source, "
            "or ask the cluster administrator to allow the folder"
        )
    return None


def reference_uses(section: AutomodelSpec | UnslothSpec, namespace: str) -> Iterator[ReferenceUse]:
    """Every reference a backend section holds, with the dotted path it is written at."""

    def use(path: str, kind: RefKind, ref: str | None, role: str) -> Iterator[ReferenceUse]:
        if ref is not None:
            ns, name = split_reference(ref, namespace)
            yield ReferenceUse(path, kind, ObjectKey(kind, ns, name), role)  # type: ignore[arg-type]

    if isinstance(section, AutomodelSpec):
        yield from use("spec.automodel.model", "Model", section.model, "model")
        yield from use("spec.automodel.training.teacher_model", "Model", section.training.teacher_model, "teacher")
        yield from use("spec.automodel.dataset.training", "FileSet", section.dataset.training, "training")
        yield from use("spec.automodel.dataset.validation", "FileSet", section.dataset.validation, "validation")
    else:
        yield from use("spec.unsloth.model.name", "Model", section.model.name, "model")
        yield from use("spec.unsloth.dataset.path", "FileSet", section.dataset.path, "training")
        yield from use("spec.unsloth.dataset.validation_path", "FileSet", section.dataset.validation_path, "validation")


@dataclass
class ReferenceCheck:
    errors: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    missing: list[ReferenceUse] = field(default_factory=list)
    resolved: dict[str, ModelSpec | FileSetSpec] = field(default_factory=dict)
    """Resolved objects by role ("model", "teacher", "training", "validation")."""


def check_references(section: AutomodelSpec | UnslothSpec, namespace: str, catalog: Catalog) -> ReferenceCheck:
    result = ReferenceCheck()
    for ref in reference_uses(section, namespace):
        target = catalog.get(ref.key)
        if ref.key in catalog.invalid:
            result.errors.append(
                Finding(ref.path, f"{ref.key} is invalid: {catalog.invalid[ref.key]}", "ReferenceInvalid")
            )
            continue
        if target is None:
            result.missing.append(ref)
            message = f"{ref.key} was not found"
            if catalog.authoritative:
                message += "; the job waits and re-checks when it is created"
            else:
                message += " in the input; it is checked when the job is applied"
            result.warnings.append(Finding(ref.path, message, "ReferenceNotFound"))
            continue
        if ref.key.namespace != namespace and namespace not in (target.sharedWith or []):
            result.errors.append(
                Finding(
                    ref.path,
                    f"{ref.key} is not shared with namespace {namespace}: "
                    f"add {namespace} to its spec.sharedWith, or copy it into {namespace}",
                    "ReferenceNotShared",
                )
            )
            continue
        if ref.key.namespace != namespace and target.source.pvc is not None:
            result.errors.append(
                Finding(
                    ref.path,
                    f"{ref.key} is stored on PersistentVolumeClaim {target.source.pvc.claimName} in namespace "
                    f"{ref.key.namespace}, which pods in {namespace} cannot mount: copy it into a claim in "
                    f"{namespace}, or give it a hostPath or uri source",
                    "ReferenceNotMountable",
                )
            )
            continue
        result.resolved[ref.role] = target
    _check_models(section, result)
    return result


def _check_models(section: AutomodelSpec | UnslothSpec, result: ReferenceCheck) -> None:
    model, teacher = result.resolved.get("model"), result.resolved.get("teacher")
    model_path = "spec.automodel.model" if isinstance(section, AutomodelSpec) else "spec.unsloth.model.name"
    for path, target, role in (
        (model_path, model, "base model"),
        ("spec.automodel.training.teacher_model", teacher, "teacher"),
    ):
        if isinstance(target, ModelSpec) and target.adapter is not None:
            result.errors.append(
                Finding(
                    path,
                    f"the {role} must be a full-weight Model, but this one is a LoRA adapter of "
                    f"{target.adapter.baseModel}: use the base model (or a merged model) instead",
                    "ModelIsAdapter",
                )
            )
    if not isinstance(section, AutomodelSpec):
        return
    if isinstance(model, ModelSpec) and isinstance(teacher, ModelSpec):
        if model.tokenizer is None or teacher.tokenizer is None:
            result.warnings.append(
                Finding(
                    "spec.automodel.training.teacher_model",
                    "student and teacher tokenizers are not declared (Model spec.tokenizer); the trainer "
                    "compares their vocabularies when it loads them",
                    "TokenizerUnknown",
                )
            )
        elif model.tokenizer != teacher.tokenizer:
            result.errors.append(
                Finding(
                    "spec.automodel.training.teacher_model",
                    f"student and teacher must share a tokenizer, but the student's is {model.tokenizer!r} "
                    f"and the teacher's is {teacher.tokenizer!r}: pick a teacher of the same model family",
                    "TokenizerMismatch",
                )
            )
    ep = section.parallelism.expert_parallel_size or 1
    if isinstance(model, ModelSpec) and model.numExperts is not None and ep > 1:
        if model.numExperts == 0:
            result.errors.append(
                Finding(
                    "spec.automodel.parallelism.expert_parallel_size",
                    "expert parallelism needs an MoE model, but the base model has no experts "
                    "(numExperts: 0): remove expert_parallel_size",
                    "ExpertParallelWithoutExperts",
                )
            )
        elif model.numExperts % ep != 0:
            result.errors.append(
                Finding(
                    "spec.automodel.parallelism.expert_parallel_size",
                    f"expert_parallel_size must divide the model's number of experts ({model.numExperts}); got {ep}",
                    "ExpertParallelDoesNotDivideExperts",
                )
            )
    if isinstance(model, ModelSpec):
        _check_architecture(section, model, result)


def _check_architecture(section: AutomodelSpec, model: ModelSpec, result: ReferenceCheck) -> None:
    parallelism = section.parallelism
    architecture = Architecture(model.numAttentionHeads, model.numKeyValueHeads, model.numLayers)
    for field_name, message in architecture_problems(parallelism, architecture):
        result.errors.append(
            Finding(f"spec.automodel.parallelism.{field_name}", message + " (from the base Model's spec)", "ModelSplit")
        )
    unknown = [
        f"{name} (spec.{fields})"
        for name, size, known, fields in (
            ("head counts", parallelism.tensor_parallel_size, model.numKeyValueHeads is not None, "numKeyValueHeads"),
            ("layer count", parallelism.pipeline_parallel_size, model.numLayers is not None, "numLayers"),
            ("expert count", parallelism.expert_parallel_size or 1, model.numExperts is not None, "numExperts"),
        )
        if size > 1 and not known
    ]
    if unknown:
        result.warnings.append(
            Finding(
                "spec.automodel.model",
                f"the base Model does not declare its {' and '.join(unknown)}, so whether the layout can split "
                "it is checked by the trainer when it reads the model's config.json, after the pods start",
                "ModelSplitUnknown",
            )
        )
