"""One table of job cases, run through the Python validator (tests/planning) and through
the real API server's CRD schema + CEL rules (tests/e2e/test_cel_rules.py).

Each row is a valid base job with one change and the dotted path the error must name (or
None for a valid job). `rule` names the cross-field rule expected to fire; schema rows
(types, enums, bounds) leave it None.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GROUP_VERSION = "kubetune.io/v1alpha1"

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LOCAL_EXAMPLES = [EXAMPLES / "quickstart.yaml", EXAMPLES / "05-qlora-unsloth-smollm2.yaml"]
"""Examples with relative hostPath sources: for `kubetune run`, refused for a cluster."""
CLUSTER_EXAMPLES = [p for p in sorted(EXAMPLES.glob("0*.yaml")) if p not in LOCAL_EXAMPLES]


def deep_merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def job(spec: dict[str, Any], name: str = "case") -> dict[str, Any]:
    return {"apiVersion": GROUP_VERSION, "kind": "CustomizationJob", "metadata": {"name": name}, "spec": spec}


AUTOMODEL_BASE: dict[str, Any] = {"model": "base-model", "dataset": {"training": "train-data"}}
UNSLOTH_BASE: dict[str, Any] = {"model": {"name": "base-model"}, "dataset": {"path": "train-data"}}


def automodel(**change: Any) -> dict[str, Any]:
    return job({"automodel": deep_merge(AUTOMODEL_BASE, change)})


def unsloth(**change: Any) -> dict[str, Any]:
    return job({"unsloth": deep_merge(UNSLOTH_BASE, change)})


@dataclass(frozen=True)
class Case:
    id: str
    manifest: dict[str, Any]
    path: str | None
    rule: str | None = None
    server: bool = True
    """False where the API server cannot enforce the row (an untyped field, invisible to CEL):
    the operator's validator (webhook, reconcile) refuses it instead."""

    @property
    def valid(self) -> bool:
        return self.path is None


GPUS_8 = {"num_gpus_per_node": 8}

RULE_CASES: list[Case] = [
    # --- exactly one backend
    Case("no-backend", job({}), "spec", "ExactlyOneBackend"),
    Case("two-backends", job({"automodel": AUTOMODEL_BASE, "unsloth": UNSLOTH_BASE}), "spec", "ExactlyOneBackend"),
    Case("automodel-only", automodel(), None),
    Case("unsloth-only", unsloth(), None),
    # --- total GPUs divisible by TP × PP × CP
    Case("tp2-on-8", automodel(parallelism={**GPUS_8, "tensor_parallel_size": 2}), None),
    Case(
        "tp2-pp2-dp2-on-8",
        automodel(parallelism={**GPUS_8, "tensor_parallel_size": 2, "pipeline_parallel_size": 2}),
        None,
    ),
    Case(
        "tp2-cp2-dp2-on-8",
        automodel(parallelism={**GPUS_8, "tensor_parallel_size": 2, "context_parallel_size": 2}),
        None,
    ),
    Case(
        "tp3-on-8",
        automodel(parallelism={**GPUS_8, "tensor_parallel_size": 3}),
        "spec.automodel.parallelism",
        "GpusFitModelParallel",
    ),
    Case(
        "tp2-on-1",
        automodel(parallelism={"tensor_parallel_size": 2}),
        "spec.automodel.parallelism",
        "GpusFitModelParallel",
    ),
    Case(
        "pp4-tp2-on-2x2",
        automodel(
            parallelism={
                "num_nodes": 2,
                "num_gpus_per_node": 2,
                "pipeline_parallel_size": 4,
                "tensor_parallel_size": 2,
            }
        ),
        "spec.automodel.parallelism",
        "GpusFitModelParallel",
    ),
    # --- global batch divisible by micro batch × data parallel
    Case("gbs8-mbs1-dp8", automodel(parallelism=GPUS_8), None),
    Case("gbs16-mbs2-dp8", automodel(parallelism=GPUS_8, batch={"global_batch_size": 16, "micro_batch_size": 2}), None),
    Case(
        "gbs12-mbs1-dp8",
        automodel(parallelism=GPUS_8, batch={"global_batch_size": 12}),
        "spec.automodel.batch.global_batch_size",
        "BatchFitsDataParallel",
    ),
    Case(
        "gbs8-mbs3-dp1",
        automodel(batch={"global_batch_size": 8, "micro_batch_size": 3}),
        "spec.automodel.batch.global_batch_size",
        "BatchFitsDataParallel",
    ),
    Case(
        "gbs8-mbs2-dp2-tp4",
        automodel(
            parallelism={**GPUS_8, "tensor_parallel_size": 4}, batch={"global_batch_size": 8, "micro_batch_size": 2}
        ),
        None,
    ),
    # --- expert parallel needs TP 1
    Case("ep4-tp1", automodel(parallelism={**GPUS_8, "expert_parallel_size": 4}), None),
    Case(
        "ep4-tp2",
        automodel(parallelism={**GPUS_8, "expert_parallel_size": 4, "tensor_parallel_size": 2}),
        "spec.automodel.parallelism.tensor_parallel_size",
        "ExpertParallelNeedsTensorParallelOne",
    ),
    Case("ep1-tp2", automodel(parallelism={**GPUS_8, "expert_parallel_size": 1, "tensor_parallel_size": 2}), None),
    Case(
        "ep4-on-dp2",
        automodel(parallelism={"num_gpus_per_node": 2, "expert_parallel_size": 4}),
        "spec.automodel.parallelism.expert_parallel_size",
        "ExpertParallelDividesDataParallel",
    ),
    # --- combinations the trainer does not run
    Case(
        "pp2-cp2",
        automodel(parallelism={"num_gpus_per_node": 4, "pipeline_parallel_size": 2, "context_parallel_size": 2}),
        "spec.automodel.parallelism.context_parallel_size",
        "PipelineWithContextParallel",
    ),
    Case(
        "ep2-pp2",
        automodel(parallelism={"num_gpus_per_node": 4, "pipeline_parallel_size": 2, "expert_parallel_size": 2}),
        "spec.automodel.parallelism.expert_parallel_size",
        "ExpertParallelWithPipelineOrContext",
    ),
    # --- distillation
    Case("distill-with-teacher", automodel(training={"training_type": "distillation", "teacher_model": "big"}), None),
    Case(
        "distill-without-teacher",
        automodel(training={"training_type": "distillation"}),
        "spec.automodel.training.teacher_model",
        "DistillationNeedsTeacher",
    ),
    Case(
        "teacher-without-distill",
        automodel(training={"teacher_model": "big"}),
        "spec.automodel.training.teacher_model",
        "TeacherOnlyForDistillation",
    ),
    Case(
        "distill-ratio-above-1",
        automodel(training={"training_type": "distillation", "teacher_model": "big", "distillation_ratio": 1.5}),
        "spec.automodel.training.distillation_ratio",
    ),
    Case(
        "distill-temperature-0",
        automodel(training={"training_type": "distillation", "teacher_model": "big", "distillation_temperature": 0}),
        "spec.automodel.training.distillation_temperature",
    ),
    Case(
        "teacher-precision-int8",
        automodel(training={"training_type": "distillation", "teacher_model": "big", "teacher_precision": "int8"}),
        "spec.automodel.training.teacher_precision",
    ),
    # --- lora section only for LoRA regimes
    Case(
        "lora-with-all-weights",
        automodel(training={"finetuning_type": "all_weights", "lora": {"rank": 8}}),
        "spec.automodel.training.lora",
        "LoraOnlyForLoraTraining",
    ),
    Case("lora-with-lora-merged", automodel(training={"finetuning_type": "lora_merged", "lora": {"rank": 8}}), None),
    Case(
        "unsloth-lora-with-all-weights",
        unsloth(model={"load_in_4bit": False}, training={"finetuning_type": "all_weights", "lora": {"rank": 8}}),
        "spec.unsloth.training.lora",
        "LoraOnlyForLoraTraining",
    ),
    # --- val_check_interval
    Case("val-check-half-epoch", automodel(schedule={"val_check_interval": 0.5}), None),
    Case("val-check-100-steps", automodel(schedule={"val_check_interval": 100}), None),
    Case(
        "val-check-2.5",
        automodel(schedule={"val_check_interval": 2.5}),
        "spec.automodel.schedule.val_check_interval",
        "StepIntervalIsWhole",
    ),
    Case("val-check-0", automodel(schedule={"val_check_interval": 0}), "spec.automodel.schedule.val_check_interval"),
    # --- unsloth: SFT only, lora/all_weights only
    Case(
        "unsloth-distillation",
        unsloth(training={"training_type": "distillation"}),
        "spec.unsloth.training.training_type",
    ),
    Case(
        "unsloth-lora-merged",
        unsloth(training={"finetuning_type": "lora_merged"}),
        "spec.unsloth.training.finetuning_type",
    ),
    # --- quantization
    Case(
        "4bit-and-8bit",
        unsloth(model={"load_in_8bit": True}),
        "spec.unsloth.model.load_in_8bit",
        "QuantizationIsExclusive",
    ),
    Case("8bit-only", unsloth(model={"load_in_4bit": False, "load_in_8bit": True}), None),
    Case(
        "all-weights-4bit-default",
        unsloth(training={"finetuning_type": "all_weights"}),
        "spec.unsloth.model.load_in_4bit",
        "FullWeightsNotQuantized",
    ),
    Case(
        "all-weights-8bit",
        unsloth(model={"load_in_4bit": False, "load_in_8bit": True}, training={"finetuning_type": "all_weights"}),
        "spec.unsloth.model.load_in_4bit",
        "FullWeightsNotQuantized",
    ),
    Case(
        "all-weights-unquantized",
        unsloth(model={"load_in_4bit": False}, training={"finetuning_type": "all_weights"}),
        None,
    ),
    # --- precision vs model.dtype
    Case(
        "fp16-weights-bf16-training",
        unsloth(model={"dtype": "float16"}),
        "spec.unsloth.hardware.precision",
        "PrecisionMatchesDtype",
    ),
    Case(
        "bf16-weights-fp16-training",
        unsloth(model={"dtype": "bfloat16"}, hardware={"precision": "fp16"}),
        "spec.unsloth.hardware.precision",
        "PrecisionMatchesDtype",
    ),
    Case("bf16-weights-bf16-training", unsloth(model={"dtype": "bfloat16"}), None),
    Case("fp16-weights-fp16-training", unsloth(model={"dtype": "float16"}, hardware={"precision": "fp16"}), None),
    Case("fp32-weights-fp16-training", unsloth(model={"dtype": "float32"}, hardware={"precision": "fp16"}), None),
    # --- save methods
    Case("merged-16bit-lora", unsloth(output={"save_method": "merged_16bit"}), None),
    Case(
        "merged-4bit-all-weights",
        unsloth(
            model={"load_in_4bit": False},
            training={"finetuning_type": "all_weights"},
            output={"save_method": "merged_4bit"},
        ),
        "spec.unsloth.output.save_method",
        "MergedSaveNeedsLora",
    ),
    Case("save-method-gguf", unsloth(output={"save_method": "gguf"}), "spec.unsloth.output.save_method"),
    # --- warmup
    Case("warmup-ratio-only", unsloth(schedule={"warmup_ratio": 0.1}), None),
    Case(
        "warmup-both",
        unsloth(schedule={"warmup_ratio": 0.1, "warmup_steps": 10}),
        "spec.unsloth.schedule.warmup_ratio",
        "WarmupIsExclusive",
    ),
    Case("warmup-ratio-1", unsloth(schedule={"warmup_ratio": 1.0}), "spec.unsloth.schedule.warmup_ratio"),
    # --- enums
    Case("scheduler-cosine", unsloth(schedule={"lr_scheduler_type": "cosine"}), None),
    Case("scheduler-step", unsloth(schedule={"lr_scheduler_type": "step"}), "spec.unsloth.schedule.lr_scheduler_type"),
    Case("optim-paged", unsloth(optimizer={"optim": "paged_adamw_8bit"}), None),
    Case("optim-lion", unsloth(optimizer={"optim": "lion"}), "spec.unsloth.optimizer.optim"),
    Case("precision-fp32", unsloth(hardware={"precision": "fp32"}), "spec.unsloth.hardware.precision"),
    Case("dtype-int8", unsloth(model={"dtype": "int8"}), "spec.unsloth.model.dtype"),
    Case("bias-some", unsloth(training={"lora": {"bias": "some"}}), "spec.unsloth.training.lora.bias"),
    Case("checkpointing-false", unsloth(training={"use_gradient_checkpointing": False}), None),
    Case(
        "checkpointing-maybe",
        unsloth(training={"use_gradient_checkpointing": "maybe"}),
        "spec.unsloth.training.use_gradient_checkpointing",
        server=False,
    ),
    # --- GPU list
    Case("gpus-0-1", unsloth(hardware={"gpus": "0,1"}), None),
    Case("gpus-spaces", unsloth(hardware={"gpus": "0, 1"}), "spec.unsloth.hardware.gpus"),
    Case("gpus-letters", unsloth(hardware={"gpus": "all"}), "spec.unsloth.hardware.gpus"),
    # --- positive sizes, rates and counts
    Case("lr-zero", automodel(optimizer={"learning_rate": 0}), "spec.automodel.optimizer.learning_rate"),
    Case("lr-negative", unsloth(optimizer={"learning_rate": -1e-4}), "spec.unsloth.optimizer.learning_rate"),
    Case("mbs-zero", automodel(batch={"micro_batch_size": 0}), "spec.automodel.batch.micro_batch_size"),
    Case("epochs-zero", automodel(schedule={"epochs": 0}), "spec.automodel.schedule.epochs"),
    Case("rank-negative", automodel(training={"lora": {"rank": -4}}), "spec.automodel.training.lora.rank"),
    Case("nodes-zero", automodel(parallelism={"num_nodes": 0}), "spec.automodel.parallelism.num_nodes"),
    Case("weight-decay-negative", automodel(optimizer={"weight_decay": -0.1}), "spec.automodel.optimizer.weight_decay"),
    Case("max-seq-zero", unsloth(model={"max_seq_length": 0}), "spec.unsloth.model.max_seq_length"),
    Case(
        "grad-accum-zero",
        unsloth(batch={"gradient_accumulation_steps": 0}),
        "spec.unsloth.batch.gradient_accumulation_steps",
    ),
    # --- references
    Case("ref-workspace", automodel(model="team-a/base-model"), None),
    Case("ref-uppercase", automodel(model="Base_Model"), "spec.automodel.model"),
    Case("ref-three-parts", automodel(dataset={"training": "a/b/c"}), "spec.automodel.dataset.training"),
    Case("ref-unsloth-bad", unsloth(model={"name": "-bad"}), "spec.unsloth.model.name"),
    # --- types
    Case("lr-string", automodel(optimizer={"learning_rate": "5e-6"}), "spec.automodel.optimizer.learning_rate"),
    Case("packing-string", automodel(batch={"sequence_packing": "yes"}), "spec.automodel.batch.sequence_packing"),
]
"""Rows that both the Python validator and the API server judge."""

UNKNOWN_FIELD_CASES: list[Case] = [
    Case(
        "automodel-unsloth-batch",
        automodel(batch={"per_device_train_batch_size": 2}),
        "spec.automodel.batch.per_device_train_batch_size",
    ),
    Case("unsloth-automodel-parallelism", unsloth(parallelism={"num_gpus_per_node": 2}), "spec.unsloth.parallelism"),
    Case("automodel-typo", automodel(optimizer={"learnig_rate": 1e-4}), "spec.automodel.optimizer.learnig_rate"),
    Case("spec-typo", job({"automodel": AUTOMODEL_BASE, "suspended": True}), "spec.suspended"),
]
"""Unknown keys: pydantic refuses them; the API server refuses them under strict field validation."""
