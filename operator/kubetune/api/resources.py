"""The three custom resources: CustomizationJob, Model and FileSet (spec and status).

The backend sections keep NeMo Customizer's snake_case names; everything Kubernetes-side
(scheduling, storage, status) is camelCase, as Kubernetes users expect.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from pydantic.alias_generators import to_camel

from kubetune.api.automodel import AutomodelSpec
from kubetune.api.common import (
    MAX_LIST_ITEMS,
    MAX_NAME_LENGTH,
    MAX_SUBDOMAIN_LENGTH,
    MAX_TEXT_LENGTH,
    DnsLabel,
    DnsSubdomain,
    Reference,
    Section,
)
from kubetune.api.unsloth import UnslothSpec

Backend = Literal["automodel", "unsloth"]
BACKENDS: tuple[Backend, ...] = ("automodel", "unsloth")
Phase = Literal["Created", "Pending", "Running", "Completed", "Failed", "Cancelled", "Suspended"]
TERMINAL_PHASES: tuple[Phase, ...] = ("Completed", "Failed", "Cancelled")

Path = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT_LENGTH)]
ShortString = Annotated[str, StringConstraints(max_length=253)]
Quantity = Annotated[
    str,
    StringConstraints(pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$", max_length=MAX_NAME_LENGTH),
]


# --------------------------------------------------------------------------- sources


class PvcSource(Section):
    claimName: DnsSubdomain = Field(description="PersistentVolumeClaim holding the files, in the object's namespace.")
    path: Path = Field("/", description="Folder (or file) inside the claim.")


class HostPathSource(Section):
    path: Path = Field(description="Absolute path on the node (or, under `kubetune run`, on this machine).")


class Source(Section):
    """Where the files are: exactly one of `pvc`, `hostPath`, `uri`."""

    pvc: PvcSource | None = Field(None, description="Files on a PersistentVolumeClaim.")
    hostPath: HostPathSource | None = Field(None, description="Files on the node's filesystem.")
    uri: Annotated[str, StringConstraints(pattern=r"^hf://[^/\s]+/[^/\s]+$", max_length=MAX_TEXT_LENGTH)] | None = (
        Field(None, description="A hub URI `hf://org/name`, downloaded when the network allows it.")
    )
    tokenSecret: DnsLabel | None = Field(
        None,
        description=(
            "For a `uri` source: a Secret in the namespace of the jobs that use it whose `HF_TOKEN` key is the "
            "hub token (gated or private models); it reaches the trainer as HF_TOKEN via a secretKeyRef."
        ),
    )


# --------------------------------------------------------------------------- Model / FileSet


class Adapter(Section):
    baseModel: Reference = Field(description="The full-weight Model this LoRA adapter applies to.")


class ModelTraining(Section):
    """How a Model was made, filled by the operator on the Models its jobs create."""

    job: ShortString = Field(description="The CustomizationJob that trained it (`namespace/name`).")
    baseModel: ShortString = Field(description="The Model it was trained from (`name` or `workspace/name`).")
    backend: Literal["automodel", "unsloth"] = Field(description="The trainer backend.")
    trainingType: ShortString = Field(description="`sft` or `distillation`.")
    finetuningType: ShortString = Field(description="`lora`, `lora_merged` or `all_weights`.")
    finalLoss: float | None = Field(None, description="Training loss of the last step.")
    finalValLoss: float | None = Field(None, description="The last validation loss.")


class ModelSpec(Section):
    source: Source = Field(description="Where the weights (or adapter) are stored.")
    tokenizer: ShortString | None = Field(
        None,
        description="Tokenizer identity: Models with the same value share tokenizer and vocabulary.",
    )
    numParameters: int | None = Field(None, gt=0, description="Number of parameters (for memory planning).")
    numExperts: int | None = Field(None, ge=0, description="Number of experts of an MoE model; 0 for dense.")
    numAttentionHeads: int | None = Field(
        None, gt=0, description="Query heads (config.json `num_attention_heads`): tensor parallel must divide it."
    )
    numKeyValueHeads: int | None = Field(
        None, gt=0, description="Key/value heads (`num_key_value_heads`): tensor parallel must divide it."
    )
    numLayers: int | None = Field(
        None, gt=0, description="Decoder layers (`num_hidden_layers`): each pipeline stage needs at least one."
    )
    hiddenSize: int | None = Field(
        None, gt=0, description="Hidden size (`hidden_size`): sizes the embeddings in the memory estimate."
    )
    vocabSize: int | None = Field(
        None,
        gt=0,
        description="Vocabulary size (`vocab_size`): sizes the embeddings and logits in the memory estimate.",
    )
    tieWordEmbeddings: bool | None = Field(
        None, description="Whether the LM head shares the input embedding (`tie_word_embeddings`)."
    )
    adapter: Adapter | None = Field(
        None, description="Present when this Model is a LoRA adapter; absent for full weights."
    )
    sharedWith: list[DnsLabel] | None = Field(
        None, max_length=MAX_LIST_ITEMS, description="Namespaces whose jobs may use this Model."
    )
    description: str | None = Field(None, max_length=MAX_TEXT_LENGTH, description="What this model is.")
    training: ModelTraining | None = Field(None, description="Present on Models created by a CustomizationJob.")


DATA_FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
"""The data file types of a FileSet, one list for both sides: the operator mounts a source path
with one of these suffixes as a file, and the trainer reads exactly these (kubetune_trainer.data)."""


class FileSetSpec(Section):
    source: Source = Field(description="Where the files are stored.")
    sharedWith: list[DnsLabel] | None = Field(
        None, max_length=MAX_LIST_ITEMS, description="Namespaces whose jobs may use this FileSet."
    )


# --------------------------------------------------------------------------- CustomizationJob spec


class Toleration(Section):
    key: ShortString | None = Field(None, description="Taint key the toleration applies to.")
    operator: Literal["Exists", "Equal"] | None = Field(None, description="`Exists` or `Equal` (default).")
    value: ShortString | None = Field(None, description="Taint value to match.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match; empty matches all effects."
    )
    tolerationSeconds: int | None = Field(None, description="How long a NoExecute taint is tolerated.")


class Scheduling(Section):
    nodeSelector: dict[str, ShortString] | None = Field(
        None, max_length=MAX_LIST_ITEMS, description="Node labels the training pods must match."
    )
    tolerations: list[Toleration] | None = Field(
        None, max_length=MAX_LIST_ITEMS, description="Tolerations for the training pods."
    )
    priorityClassName: DnsLabel | None = Field(None, description="PriorityClass of the training pods.")
    queueName: DnsLabel | None = Field(
        None, description="Kueue LocalQueue; sets the `kueue.x-k8s.io/queue-name` label on the children."
    )


class Storage(Section):
    claimName: DnsSubdomain | None = Field(
        None,
        description="Existing PersistentVolumeClaim for checkpoints and the result; the job writes under "
        "a folder named after itself. Without it the operator creates a claim of `size`.",
    )
    size: Quantity = Field("100Gi", description="Size of the claim the operator creates.")
    storageClassName: DnsLabel | None = Field(None, description="StorageClass of the claim the operator creates.")


class CustomizationJobSpec(Section):
    automodel: AutomodelSpec | None = Field(None, description="An Automodel job (multi-GPU, SFT or distillation).")
    unsloth: UnslothSpec | None = Field(None, description="An Unsloth job (single GPU, quantized LoRA).")
    suspend: bool = Field(False, description="Suspend the training (true) or resume it (false).")
    scheduling: Scheduling | None = Field(None, description="Where and with which priority the pods run.")
    storage: Storage | None = Field(None, description="Volume for checkpoints and the result.")

    @property
    def backend(self) -> Backend | None:
        """The backend whose section is present, when exactly one is."""
        present = [name for name in BACKENDS if getattr(self, name) is not None]
        return present[0] if len(present) == 1 else None


# --------------------------------------------------------------------------- status


class StatusModel(BaseModel):
    """Status is written by the operator: lenient about extra keys (kopf keeps its own there).

    Everything the operator and the trainer write into `status` is built from these models and
    sent as `wire()`: the one way to write status.
    """

    model_config = ConfigDict(extra="allow")

    def wire(self) -> dict[str, Any]:
        """The JSON sent in a status merge patch: camelCase, and no key for what is unknown
        (None), so a patch never erases a value another writer put there."""
        return self.model_dump(mode="json", exclude_none=True, by_alias=True)


class Condition(StatusModel):
    type: str = Field(max_length=MAX_NAME_LENGTH, description="Validated, ReferencesResolved, Launched, ...")
    status: Literal["True", "False", "Unknown"] = Field(description="Whether the condition holds.")
    reason: str | None = Field(None, max_length=MAX_NAME_LENGTH * 2, description="CamelCase reason.")
    message: str | None = Field(None, max_length=MAX_TEXT_LENGTH * 8, description="What happened and what to do.")
    lastTransitionTime: str | None = Field(None, max_length=64, description="When the status last changed.")


# Computed once by `kubetune.planning.layout.compute_layout`, then carried whole: `status.layout`
# (camelCase: its aliases), the trainer's resolved job and `kubetune validate -o json`
# (snake_case: its field names).
class Layout(BaseModel):
    """The GPUs and the data, tensor, pipeline, context and expert parallel sizes the job runs with."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", alias_generator=to_camel, validate_by_name=True, validate_by_alias=True
    )

    total_gpus: int
    world_size: int
    data_parallel_size: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    context_parallel_size: int
    expert_parallel_size: int
    gradient_accumulation_steps: int


class ProgressStatus(StatusModel):
    step: int | None = None
    maxSteps: int | None = None
    epoch: float | None = None
    numEpochs: int | None = None
    percentageDone: float | None = None
    trainLoss: float | None = None
    valLoss: float | None = None
    trainLr: float | None = None
    tokensPerSecond: float | None = None
    etaSeconds: float | None = None
    checkpointPath: str | None = Field(None, max_length=MAX_TEXT_LENGTH)
    updatedAt: str | None = Field(None, max_length=64)


class OutputStatus(StatusModel):
    name: str = Field(max_length=MAX_SUBDOMAIN_LENGTH)
    type: Literal["adapter", "model"]
    path: str | None = Field(None, max_length=MAX_TEXT_LENGTH)


class TrackingStatus(StatusModel):
    """Where the job's experiment-tracking runs are (written by the trainer when they start)."""

    mlflowRunUrl: str | None = Field(None, max_length=MAX_TEXT_LENGTH, description="The MLflow run's page.")
    wandbRunUrl: str | None = Field(
        None, max_length=MAX_TEXT_LENGTH, description="The W&B run's page (a file:// folder for an offline run)."
    )


class MemoryStatus(StatusModel):
    """GPU memory per GPU estimated before launch, in GiB."""

    weightsGiB: float | None = None
    gradientsGiB: float | None = None
    optimizerGiB: float | None = None
    activationsGiB: float | None = None
    teacherGiB: float | None = None
    overheadGiB: float | None = None
    totalGiB: float | None = None
    floorGiB: float | None = Field(None, description="Weights, gradients and optimizer states alone.")
    gpus: int | None = None
    gpuMemoryGiB: float | None = Field(None, description="The configured GPU size it was checked against.")
    verdict: Literal["fits", "tight", "cannot fit"] | None = None
    message: str | None = Field(None, max_length=MAX_TEXT_LENGTH)


class CustomizationJobStatus(StatusModel):
    phase: Phase | None = Field(None, description="Created, Pending, Running, Completed, Failed, Cancelled, Suspended.")
    backend: Backend | None = Field(None, description="The backend the job runs on.")
    observedGeneration: int | None = None
    conditions: list[Condition] | None = Field(None, max_length=32)
    layout: Layout | None = None
    progress: ProgressStatus | None = None
    output: OutputStatus | None = None
    tracking: TrackingStatus | None = None
    memoryEstimate: MemoryStatus | None = None


class ResourceStatus(StatusModel):
    """Status of a Model or FileSet: whether its source is usable."""

    phase: Literal["Ready", "Pending", "Failed"] | None = None
    message: str | None = Field(None, max_length=MAX_TEXT_LENGTH)


class ObjectMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = "job"
    namespace: str = "default"


class _Resource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    apiVersion: str
    kind: str
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)


class CustomizationJob(_Resource):
    kind: Literal["CustomizationJob"] = "CustomizationJob"
    spec: CustomizationJobSpec
    status: CustomizationJobStatus | None = None


class Model(_Resource):
    kind: Literal["Model"] = "Model"
    spec: ModelSpec
    status: ResourceStatus | None = None


class FileSet(_Resource):
    kind: Literal["FileSet"] = "FileSet"
    spec: FileSetSpec
    status: ResourceStatus | None = None
