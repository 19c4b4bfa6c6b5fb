"""Cross-field rules, each declared once for the Python validator and the CRD's CEL.

A rule sits on one node of a resource's spec (`section` + `node`, the schema object whose
CEL `self` it is), names the fields it concerns (so it is not judged on fields that failed
their own validation), blames one field (`field`, relative to the node; the API server
reports it as `fieldPath`), and carries one message for both enforcers. `check` gets the
parsed node and returns True when the rule holds. The same case table
(tests/planning/test_rules.py and tests/e2e/test_cel_rules.py) drives both halves.

Rules that need other objects (references, tokenizers, experts) are in `references.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from kubetune.api.resources import Source
from kubetune.planning.dtypes import precision_matches_dtype
from kubetune.planning.layout import batch_fits_data_parallel, expert_parallel_fits, gpus_fit_model_parallel

Kind = Literal["CustomizationJob", "Model", "FileSet"]


@dataclass(frozen=True)
class Rule:
    name: str
    """Stable identifier, also the `reason` in status conditions and metrics."""
    kind: Kind
    section: str
    """Dotted path from `spec` to the backend section ("automodel", "unsloth") or "" for spec itself."""
    node: str
    """Dotted path from the section to the node the rule sits on; "" is the section itself."""
    field: str
    """Dotted path from the node to the field blamed; "" blames the node."""
    concerns: tuple[str, ...]
    """Paths (from the section) the rule reads; an error in any of them suspends the rule."""
    check: Callable[[Any], bool]
    cel: str
    message: str

    @property
    def node_path(self) -> str:
        return _join("spec", self.section, self.node)

    @property
    def path(self) -> str:
        """The dotted path an error of this rule is reported at."""
        return _join(self.node_path, self.field)

    @property
    def field_path(self) -> str | None:
        """The CEL `fieldPath` (relative to the node), or None when the node itself is blamed."""
        return "." + self.field if self.field else None


def _join(*parts: str) -> str:
    return ".".join(part for part in parts if part)


_TP_PP_CP = "(self.tensor_parallel_size * self.pipeline_parallel_size * self.context_parallel_size)"
_GPUS = "(self.num_gpus_per_node * self.num_nodes)"
_ROOT_TP_PP_CP = _TP_PP_CP.replace("self.", "self.parallelism.")
_ROOT_GPUS = _GPUS.replace("self.", "self.parallelism.")


_LAYOUT_FIELDS = (
    "parallelism.num_gpus_per_node",
    "parallelism.num_nodes",
    "parallelism.tensor_parallel_size",
    "parallelism.pipeline_parallel_size",
    "parallelism.context_parallel_size",
)
"""The fields the data-parallel size is computed from (paths from the section)."""


def _source_count(source: Source) -> int:
    return sum(value is not None for value in (source.pvc, source.hostPath, source.uri))


RULES: tuple[Rule, ...] = (
    Rule(
        name="ExactlyOneBackend",
        kind="CustomizationJob",
        section="",
        node="",
        field="",
        concerns=("automodel", "unsloth"),
        check=lambda spec: spec.backend is not None,
        cel="has(self.automodel) != has(self.unsloth)",
        message="set exactly one backend section: `automodel` or `unsloth`",
    ),
    Rule(
        name="GpusFitModelParallel",
        kind="CustomizationJob",
        section="automodel",
        node="parallelism",
        field="",
        concerns=_LAYOUT_FIELDS,
        check=lambda p: gpus_fit_model_parallel(p),
        cel=f"{_GPUS} % {_TP_PP_CP} == 0",
        message=(
            "total_gpus (num_gpus_per_node × num_nodes) must be divisible by "
            "tensor_parallel_size × pipeline_parallel_size × context_parallel_size"
        ),
    ),
    Rule(
        name="BatchFitsDataParallel",
        kind="CustomizationJob",
        section="automodel",
        node="",
        field="batch.global_batch_size",
        concerns=("batch.global_batch_size", "batch.micro_batch_size", *_LAYOUT_FIELDS),
        check=lambda spec: batch_fits_data_parallel(spec.batch, spec.parallelism),
        cel=(
            f"{_ROOT_GPUS} % {_ROOT_TP_PP_CP} != 0 || self.batch.global_batch_size % "
            f"(self.batch.micro_batch_size * ({_ROOT_GPUS} / {_ROOT_TP_PP_CP})) == 0"
        ),
        message=(
            "global_batch_size must be divisible by micro_batch_size × data_parallel_size "
            "(data_parallel_size = total_gpus / (tensor × pipeline × context parallel size))"
        ),
    ),
    Rule(
        name="ExpertParallelNeedsTensorParallelOne",
        kind="CustomizationJob",
        section="automodel",
        node="parallelism",
        field="tensor_parallel_size",
        concerns=("parallelism.expert_parallel_size", "parallelism.tensor_parallel_size"),
        check=lambda p: (p.expert_parallel_size or 1) == 1 or p.tensor_parallel_size == 1,
        cel="!has(self.expert_parallel_size) || self.expert_parallel_size == 1 || self.tensor_parallel_size == 1",
        message="tensor_parallel_size must be 1 when expert_parallel_size > 1 (MoE expert parallelism)",
    ),
    Rule(
        name="ExpertParallelDividesDataParallel",
        kind="CustomizationJob",
        section="automodel",
        node="parallelism",
        field="expert_parallel_size",
        concerns=("parallelism.expert_parallel_size", *_LAYOUT_FIELDS),
        check=lambda p: not gpus_fit_model_parallel(p) or expert_parallel_fits(p),
        cel=(
            f"!has(self.expert_parallel_size) || {_GPUS} % {_TP_PP_CP} != 0 || "
            f"({_GPUS} / {_TP_PP_CP} * self.context_parallel_size) % self.expert_parallel_size == 0"
        ),
        message=(
            "expert_parallel_size must divide data_parallel_size × context_parallel_size (the experts are "
            "shared out among those ranks)"
        ),
    ),
    Rule(
        name="PipelineWithContextParallel",
        kind="CustomizationJob",
        section="automodel",
        node="parallelism",
        field="context_parallel_size",
        concerns=("parallelism.pipeline_parallel_size", "parallelism.context_parallel_size"),
        check=lambda p: p.pipeline_parallel_size == 1 or p.context_parallel_size == 1,
        cel="self.pipeline_parallel_size == 1 || self.context_parallel_size == 1",
        message=(
            "pipeline and context parallel together are not supported by the trainer: set "
            "context_parallel_size: 1 (or pipeline_parallel_size: 1)"
        ),
    ),
    Rule(
        name="ExpertParallelWithPipelineOrContext",
        kind="CustomizationJob",
        section="automodel",
        node="parallelism",
        field="expert_parallel_size",
        concerns=(
            "parallelism.expert_parallel_size",
            "parallelism.pipeline_parallel_size",
            "parallelism.context_parallel_size",
        ),
        check=lambda p: (
            (p.expert_parallel_size or 1) == 1 or (p.pipeline_parallel_size == 1 and p.context_parallel_size == 1)
        ),
        cel=(
            "!has(self.expert_parallel_size) || self.expert_parallel_size == 1 || "
            "(self.pipeline_parallel_size == 1 && self.context_parallel_size == 1)"
        ),
        message=(
            "expert parallel runs with data parallel only in the trainer: set pipeline_parallel_size and "
            "context_parallel_size to 1 when expert_parallel_size > 1"
        ),
    ),
    Rule(
        name="DistillationNeedsTeacher",
        kind="CustomizationJob",
        section="automodel",
        node="training",
        field="teacher_model",
        concerns=("training.training_type", "training.teacher_model"),
        check=lambda t: t.training_type != "distillation" or t.teacher_model is not None,
        cel="self.training_type != 'distillation' || has(self.teacher_model)",
        message="distillation needs a teacher: set training.teacher_model to a Model reference",
    ),
    Rule(
        name="TeacherOnlyForDistillation",
        kind="CustomizationJob",
        section="automodel",
        node="training",
        field="teacher_model",
        concerns=("training.training_type", "training.teacher_model"),
        check=lambda t: t.training_type == "distillation" or t.teacher_model is None,
        cel="self.training_type == 'distillation' || !has(self.teacher_model)",
        message="teacher_model is only used by distillation: set training_type: distillation or remove it",
    ),
    Rule(
        name="LoraOnlyForLoraTraining",
        kind="CustomizationJob",
        section="automodel",
        node="training",
        field="lora",
        concerns=("training.finetuning_type", "training.lora"),
        check=lambda t: t.finetuning_type != "all_weights" or t.lora is None,
        cel="self.finetuning_type != 'all_weights' || !has(self.lora)",
        message="training.lora has no effect with finetuning_type: all_weights; remove it or use lora / lora_merged",
    ),
    Rule(
        name="StepIntervalIsWhole",
        kind="CustomizationJob",
        section="automodel",
        node="schedule",
        field="val_check_interval",
        concerns=("schedule.val_check_interval",),
        check=lambda s: s.val_check_interval is None or s.val_check_interval <= 1 or s.val_check_interval.is_integer(),
        cel=(
            "!has(self.val_check_interval) || self.val_check_interval <= 1.0 || "
            "self.val_check_interval == double(int(self.val_check_interval))"
        ),
        message=(
            "val_check_interval above 1 counts steps and must be a whole number; "
            "use a fraction of an epoch (e.g. 0.5) for more frequent checks"
        ),
    ),
    Rule(
        name="QuantizationIsExclusive",
        kind="CustomizationJob",
        section="unsloth",
        node="model",
        field="load_in_8bit",
        concerns=("model.load_in_4bit", "model.load_in_8bit"),
        check=lambda m: not (m.load_in_4bit and m.load_in_8bit),
        cel="!(self.load_in_4bit && self.load_in_8bit)",
        message="load_in_4bit and load_in_8bit are mutually exclusive; set one of them to false",
    ),
    Rule(
        name="FullWeightsNotQuantized",
        kind="CustomizationJob",
        section="unsloth",
        node="",
        field="model.load_in_4bit",
        concerns=("model.load_in_4bit", "model.load_in_8bit", "training.finetuning_type"),
        check=lambda spec: (
            spec.training.finetuning_type != "all_weights" or not (spec.model.load_in_4bit or spec.model.load_in_8bit)
        ),
        cel="self.training.finetuning_type != 'all_weights' || (!self.model.load_in_4bit && !self.model.load_in_8bit)",
        message=(
            "full-weight training (finetuning_type: all_weights) cannot use quantized loading: "
            "set model.load_in_4bit and model.load_in_8bit to false"
        ),
    ),
    Rule(
        name="MergedSaveNeedsLora",
        kind="CustomizationJob",
        section="unsloth",
        node="",
        field="output.save_method",
        concerns=("output.save_method", "training.finetuning_type"),
        check=lambda spec: not spec.output.save_method.startswith("merged_") or spec.training.finetuning_type == "lora",
        cel="!self.output.save_method.startsWith('merged_') || self.training.finetuning_type == 'lora'",
        message="merged_16bit and merged_4bit merge a LoRA adapter: use them only with finetuning_type: lora",
    ),
    Rule(
        name="PrecisionMatchesDtype",
        kind="CustomizationJob",
        section="unsloth",
        node="",
        field="hardware.precision",
        concerns=("hardware.precision", "model.dtype"),
        check=lambda spec: precision_matches_dtype(spec.hardware.precision, spec.model.dtype),
        cel=(
            "self.model.dtype == 'auto' || self.model.dtype == 'float32' || "
            "(self.hardware.precision == 'bf16' ? self.model.dtype == 'bfloat16' : self.model.dtype == 'float16')"
        ),
        message=(
            "hardware.precision and model.dtype disagree: bf16 training needs model.dtype auto, bfloat16 or "
            "float32, fp16 training needs auto, float16 or float32 (fp16 weights cannot train in bf16, nor bf16 "
            "weights in fp16); change spec.unsloth.hardware.precision or spec.unsloth.model.dtype"
        ),
    ),
    Rule(
        name="WarmupIsExclusive",
        kind="CustomizationJob",
        section="unsloth",
        node="schedule",
        field="warmup_ratio",
        concerns=("schedule.warmup_steps", "schedule.warmup_ratio"),
        check=lambda s: s.warmup_ratio is None or s.warmup_steps == 0,
        cel="!has(self.warmup_ratio) || self.warmup_steps == 0",
        message="warmup_steps and warmup_ratio are mutually exclusive; set only one of them",
    ),
    Rule(
        name="LoraOnlyForLoraTraining",
        kind="CustomizationJob",
        section="unsloth",
        node="training",
        field="lora",
        concerns=("training.finetuning_type", "training.lora"),
        check=lambda t: t.finetuning_type == "lora" or t.lora is None,
        cel="self.finetuning_type == 'lora' || !has(self.lora)",
        message="training.lora has no effect with finetuning_type: all_weights; remove it or use lora",
    ),
    Rule(
        name="ExactlyOneSource",
        kind="Model",
        section="",
        node="source",
        field="",
        concerns=("source",),
        check=lambda s: _source_count(s) == 1,
        cel="[has(self.pvc), has(self.hostPath), has(self.uri)].filter(x, x).size() == 1",
        message="set exactly one source: pvc, hostPath or uri",
    ),
)

# A FileSet's source follows the same rule as a Model's.
RULES = (*RULES, *(replace(rule, kind="FileSet") for rule in RULES if rule.kind == "Model"))


IMMUTABLE_MESSAGE = (
    "the backend section cannot change once the job exists (the children run its configuration): "
    "delete the job and create a new one"
)
"""The training configuration is immutable, like a Job's pod template: the CRD enforces it with a
CEL transition rule on each backend section and the webhook compares old and new."""


def backend_changed(old_spec: object, new_spec: object) -> bool:
    # Either may be anything a client sent (a list, a string): only a mapping has sections.
    old = old_spec if isinstance(old_spec, Mapping) else {}
    new = new_spec if isinstance(new_spec, Mapping) else {}
    return any(old.get(backend) != new.get(backend) for backend in ("automodel", "unsloth"))


def rules_for(kind: Kind) -> tuple[Rule, ...]:
    return tuple(rule for rule in RULES if rule.kind == kind)
