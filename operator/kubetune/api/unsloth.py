"""The `unsloth` backend section: NeMo Customizer's Unsloth job configuration.

Single GPU, SFT only, LoRA or full weights, optional 4-bit/8-bit quantized loading.
Field names, defaults and enums are NeMo Customizer's, exactly (`kubetune schema unsloth`;
tests/api/test_defaults.py); cross-field rules live
in `kubetune.planning.rules`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PlainValidator, StringConstraints, WithJsonSchema, model_validator

from kubetune.api.common import MAX_LIST_ITEMS, MAX_TEXT_LENGTH, DnsSubdomain, GpuList, Reference, Section
from kubetune.api.integrations import Integrations

UnslothTrainingType = Literal["sft"]
UnslothFinetuningType = Literal["lora", "all_weights"]
ComputeDtype = Literal["auto", "bfloat16", "float16", "float32"]
LoraBias = Literal["none", "all", "lora_only"]


def _check_gradient_checkpointing(value: object) -> Literal["unsloth"] | bool:
    if isinstance(value, bool):
        return value
    if value == "unsloth":
        return "unsloth"
    raise ValueError(f"must be `unsloth`, true or false; got {value!r}")


GradientCheckpointing = Annotated[
    Literal["unsloth"] | bool,
    PlainValidator(_check_gradient_checkpointing),
    WithJsonSchema({"anyOf": [{"type": "string", "enum": ["unsloth"]}, {"type": "boolean"}]}),
]
LrSchedulerType = Literal["linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts"]
UnslothOptimizerName = Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "sgd"]
MixedPrecision = Literal["bf16", "fp16"]
SaveMethod = Literal["lora", "merged_16bit", "merged_4bit"]
ModuleName = Annotated[str, StringConstraints(min_length=1, max_length=256)]

UNSLOTH_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class UnslothModel(Section):
    name: Reference = Field(description="Base Model reference (`name` or `workspace/name`).")
    max_seq_length: int = Field(2048, gt=0, le=1048576, description="Maximum sequence length in tokens.")
    load_in_4bit: bool = Field(
        True, description="Load the base model in 4-bit (bitsandbytes). Mutually exclusive with load_in_8bit."
    )
    load_in_8bit: bool = Field(False, description="Load the base model in 8-bit (bitsandbytes).")
    dtype: ComputeDtype = Field("auto", description="Compute dtype (`auto`, `bfloat16`, `float16`, `float32`).")
    trust_remote_code: bool = Field(False, description="Allow custom model code from the checkpoint.")


class UnslothDataset(Section):
    path: Reference = Field(description="Training FileSet reference (`name` or `workspace/name`).")
    text_field: str = Field("text", min_length=1, max_length=256, description="Row field consumed by the trainer.")
    apply_chat_template: bool = Field(
        False, description="Apply the tokenizer's chat template to rows containing a `messages` field."
    )
    validation_path: Reference | None = Field(None, description="Optional validation FileSet reference.")
    packing: bool = Field(False, description="Pack multiple samples into one sequence to reduce padding.")


class UnslothLora(Section):
    rank: int = Field(16, gt=0, le=4096, description="LoRA rank.")
    alpha: int = Field(16, gt=0, le=65536, description="LoRA scaling factor.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout probability.")
    target_modules: list[ModuleName] = Field(
        # A plain default (pydantic copies it per instance), so the live schema and the CRD show it.
        list(UNSLOTH_TARGET_MODULES),
        min_length=1,
        max_length=MAX_LIST_ITEMS,
        description="Modules to adapt; defaults to Unsloth's 7-module set (q/k/v/o and gate/up/down projections).",
    )
    bias: LoraBias = Field("none", description="Bias training mode (`none`, `all`, `lora_only`).")
    use_rslora: bool = Field(False, description="Use rank-stabilized LoRA.")
    random_state: int = Field(3407, ge=0, le=2**32 - 1, description="LoRA initialization seed.")


class UnslothTraining(Section):
    training_type: UnslothTrainingType = Field("sft", description="Training method; Unsloth supports `sft` only.")
    finetuning_type: UnslothFinetuningType = Field(
        "lora", description="`lora` trains an adapter; `all_weights` performs full-weight training."
    )
    lora: UnslothLora | None = Field(
        None, description="LoRA configuration (filled with defaults when finetuning_type is `lora`)."
    )
    use_gradient_checkpointing: GradientCheckpointing = Field(
        "unsloth",
        description="Gradient checkpointing mode: `unsloth` (Unsloth's optimized implementation), true or false.",
    )

    @model_validator(mode="after")
    def _fill_lora_defaults(self) -> UnslothTraining:
        if self.finetuning_type == "lora" and self.lora is None:
            self.lora = UnslothLora()
        return self


class UnslothSchedule(Section):
    epochs: int = Field(1, gt=0, le=100000, description="Number of passes over the training data.")
    max_steps: int | None = Field(None, gt=0, description="Optional cap on training steps (overrides epochs).")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps. Mutually exclusive with warmup_ratio.")
    warmup_ratio: float | None = Field(None, ge=0.0, lt=1.0, description="Warmup as a fraction of total steps.")
    lr_scheduler_type: LrSchedulerType = Field(
        "linear",
        description="`linear`, `cosine`, `constant`, `constant_with_warmup` or `cosine_with_restarts`.",
    )
    logging_steps: int = Field(1, gt=0, description="Logging cadence (steps).")
    save_steps: int | None = Field(None, gt=0, description="Checkpoint cadence (steps).")
    eval_steps: int | None = Field(None, gt=0, description="Evaluation cadence (steps).")
    seed: int = Field(3407, ge=0, le=2**32 - 1, description="Random seed.")


class UnslothBatch(Section):
    per_device_train_batch_size: int = Field(1, gt=0, description="Per-step batch size on the GPU.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Steps to accumulate before a weight update.")


class UnslothOptimizer(Section):
    learning_rate: float = Field(2e-4, gt=0.0, le=10.0, description="Step size for weight updates.")
    weight_decay: float = Field(0.0, ge=0.0, le=10.0, description="L2 regularization strength.")
    optim: UnslothOptimizerName = Field(
        "adamw_8bit",
        description=(
            "Optimizer (`adamw_torch`, `adamw_torch_fused`, `adamw_8bit`, `paged_adamw_8bit`, `sgd`). "
            "8-bit optimizers reduce optimizer-state memory."
        ),
    )


class UnslothHardware(Section):
    gpus: GpuList | None = Field(
        None,
        description="Comma-separated GPU indices (`0` or `0,1`) for CUDA_VISIBLE_DEVICES (selection, not reservation).",
    )
    precision: MixedPrecision = Field("bf16", description="Mixed-precision dtype (`bf16`, `fp16`).")


class UnslothOutput(Section):
    name: DnsSubdomain | None = Field(
        None, description="Name of the Model the job creates; generated from the job name."
    )
    description: str | None = Field(None, max_length=MAX_TEXT_LENGTH, description="Description of the output Model.")
    save_method: SaveMethod = Field(
        "lora",
        description=(
            "`lora` saves the adapter; `merged_16bit` / `merged_4bit` merge it into the base and save a "
            "16-bit / 4-bit checkpoint (LoRA jobs only)."
        ),
    )


class UnslothSpec(Section):
    """An Unsloth job: single-GPU SFT with LoRA or full weights and optional quantized loading."""

    model: UnslothModel = Field(description="Base model and how it is loaded.")
    dataset: UnslothDataset = Field(description="Training and validation data.")
    training: UnslothTraining = Field(default_factory=UnslothTraining, description="Training method.")
    schedule: UnslothSchedule = Field(default_factory=UnslothSchedule, description="Epochs, steps, warmup, logging.")
    batch: UnslothBatch = Field(default_factory=UnslothBatch, description="Batch size and gradient accumulation.")
    optimizer: UnslothOptimizer = Field(default_factory=UnslothOptimizer, description="Optimizer settings.")
    hardware: UnslothHardware = Field(default_factory=UnslothHardware, description="GPU selection and precision.")
    output: UnslothOutput = Field(default_factory=UnslothOutput, description="The Model this job creates.")
    integrations: Integrations | None = Field(None, description="Experiment tracking (W&B, MLflow).")
