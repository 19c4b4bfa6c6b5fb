"""The `automodel` backend section: NeMo Customizer's Automodel job configuration.

Field names, defaults and enums are NeMo Customizer's, exactly (`kubetune schema automodel`
lists them; tests/api/test_defaults.py holds every default). Cross-field rules (the
GPU layout, distillation needs a teacher, ...) live in `kubetune.planning.rules`, where
each is declared once for both the Python validator and the CRD's CEL.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StringConstraints, model_validator

from kubetune.api.common import MAX_LIST_ITEMS, MAX_NODES, MAX_TEXT_LENGTH, DnsSubdomain, Reference, Section
from kubetune.api.integrations import Integrations

AutomodelTrainingType = Literal["sft", "distillation"]
AutomodelFinetuningType = Literal["lora", "lora_merged", "all_weights"]
TeacherPrecision = Literal["bf16", "fp16", "fp32"]
ModulePattern = Annotated[str, StringConstraints(min_length=1, max_length=256)]

LORA_FINETUNING_TYPES = ("lora", "lora_merged")


class AutomodelDataset(Section):
    training: Reference = Field(description="Training FileSet reference (`name` or `workspace/name`).")
    validation: Reference | None = Field(
        None,
        description="Optional validation FileSet reference. Without it, 10% of the training data is held out.",
    )
    prompt_template: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_TEXT_LENGTH,
        description=(
            "Optional prompt template for custom dataset schemas: the prompt, with `{column}` placeholders "
            "filled from each row; the completion is the row's `completion` column, or the column named "
            "by a trailing `{column}` after the separator `|||` (e.g. `Q: {question}|||{answer}`)."
        ),
    )


class AutomodelLora(Section):
    rank: int = Field(
        16, gt=0, le=4096, description="LoRA rank (low-rank dimension). Higher = more capacity and memory."
    )
    alpha: int = Field(32, gt=0, le=65536, description="LoRA scaling factor.")
    merge: bool = Field(False, description="Merge the adapter into the base model at the end of training.")
    target_modules: list[ModulePattern] | None = Field(
        None,
        min_length=1,
        max_length=MAX_LIST_ITEMS,
        description="Module name patterns to adapt; null applies LoRA to all linear layers.",
    )


class AutomodelTraining(Section):
    training_type: AutomodelTrainingType = Field("sft", description="Training method: `sft` or `distillation`.")
    finetuning_type: AutomodelFinetuningType = Field(
        "lora",
        description=(
            "Adapter regime. `lora` trains an adapter; `lora_merged` merges it into the base weights; "
            "`all_weights` performs full-weight training."
        ),
    )
    lora: AutomodelLora | None = Field(
        None, description="LoRA configuration (filled with defaults when finetuning_type is a LoRA variant)."
    )
    max_seq_length: int = Field(2048, gt=0, le=1048576, description="Maximum sequence length in tokens.")
    teacher_model: Reference | None = Field(
        None,
        description=(
            "Teacher Model reference. Required for distillation; must share the student's tokenizer and vocabulary."
        ),
    )
    teacher_precision: TeacherPrecision = Field(
        "bf16", description="Precision for loading the frozen teacher (`bf16`, `fp16`, `fp32`)."
    )
    distillation_ratio: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Balance between cross-entropy and KD loss: 0.0 = CE only, 1.0 = KD only.",
    )
    distillation_temperature: float = Field(
        1.0, gt=0.0, le=1000.0, description="Softmax temperature for KD. Higher = softer distributions."
    )
    offload_teacher: bool = Field(False, description="Keep the teacher off the GPU between uses to save memory.")

    @model_validator(mode="after")
    def _fill_lora_defaults(self) -> AutomodelTraining:
        if self.finetuning_type in LORA_FINETUNING_TYPES and self.lora is None:
            self.lora = AutomodelLora()
        return self


class AutomodelSchedule(Section):
    epochs: int = Field(1, gt=0, le=100000, description="Number of passes over the training data.")
    max_steps: int | None = Field(
        None,
        gt=0,
        description="Optional cap on training steps; training stops here even if `epochs` is not reached.",
    )
    val_check_interval: float | None = Field(
        None,
        gt=0.0,
        description=(
            "Validation cadence: a fraction of an epoch (e.g. 0.5 = twice per epoch) when <= 1.0, "
            "otherwise every N optimizer steps."
        ),
    )
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="Random seed; null picks one and records it.")


class AutomodelBatch(Section):
    global_batch_size: int = Field(8, gt=0, description="Effective batch size across all data-parallel ranks.")
    micro_batch_size: int = Field(1, gt=0, description="Per-step batch size on each device.")
    sequence_packing: bool = Field(False, description="Pack multiple samples into one sequence to reduce padding.")


class AutomodelOptimizer(Section):
    learning_rate: float = Field(5e-6, gt=0.0, le=10.0, description="Step size for weight updates.")
    weight_decay: float = Field(0.01, ge=0.0, le=10.0, description="L2 regularization strength.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps before the main schedule.")


class AutomodelParallelism(Section):
    num_nodes: int = Field(1, gt=0, le=MAX_NODES, description="Number of training nodes.")
    num_gpus_per_node: int = Field(1, gt=0, le=64, description="GPUs per node.")
    tensor_parallel_size: int = Field(
        1, gt=0, le=4096, description="GPUs for tensor parallelism (splits layers across GPUs)."
    )
    pipeline_parallel_size: int = Field(
        1, gt=0, le=4096, description="GPUs for pipeline parallelism (splits model stages across GPUs)."
    )
    context_parallel_size: int = Field(
        1, gt=0, le=4096, description="GPUs for context parallelism (for very long sequences)."
    )
    expert_parallel_size: int | None = Field(
        None,
        gt=0,
        le=4096,
        description="Expert parallelism for MoE models; must divide the number of experts.",
    )


class AutomodelOutput(Section):
    name: DnsSubdomain = Field(description="Name of the Model the job creates.")
    description: str | None = Field(None, max_length=MAX_TEXT_LENGTH, description="Description of the output Model.")


class AutomodelSpec(Section):
    """An Automodel job: SFT or distillation, LoRA / merged LoRA / full weights, multi-GPU."""

    model: Reference = Field(description="Base Model reference (`name` or `workspace/name`) to fine-tune.")
    dataset: AutomodelDataset = Field(description="Training and validation data.")
    training: AutomodelTraining = Field(default_factory=AutomodelTraining, description="Training method.")
    schedule: AutomodelSchedule = Field(default_factory=AutomodelSchedule, description="Epochs, steps and seed.")
    batch: AutomodelBatch = Field(default_factory=AutomodelBatch, description="Global and micro batch sizes.")
    optimizer: AutomodelOptimizer = Field(default_factory=AutomodelOptimizer, description="AdamW settings.")
    parallelism: AutomodelParallelism = Field(
        default_factory=AutomodelParallelism, description="Nodes, GPUs and the parallel layout."
    )
    output: AutomodelOutput | None = Field(
        None, description="The Model this job creates; its name defaults to one derived from the job."
    )
    integrations: Integrations | None = Field(None, description="Experiment tracking (W&B, MLflow).")
