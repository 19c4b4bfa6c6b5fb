"""GPU memory pre-flight: how much memory one GPU of a job needs, and whether it can fit.

Pure arithmetic on the validated backend section, its `Layout` and the `numParameters` of
the Models it names (`Model.spec.numParameters`). An unknown size gives no estimate
(`None`): the numbers below are only as good as that one input, so it is never guessed.

Two figures come out, for two purposes:

* the *estimate* (`MemoryEstimate.total_gib`): what the trainer typically uses per GPU.
  It drives the warning (`tight`) and `status.memoryEstimate`;
* the *floor* (`MemoryEstimate.floor_gib`): weights + gradients + optimizer states (+ the
  teacher's weights unless offloaded) at the leanest precision any trainer could use, no
  activations, no overhead. A job is refused (`cannot fit`) only when the floor exceeds
  the GPU, so a job that might fit is never refused; the estimate can be off by a lot
  (activations depend on the architecture) without ever refusing a job wrongly.

Formula (P = numParameters, W = world size = DP × TP × PP × CP, bytes per GiB = 2**30)::

    shape: the Model's hiddenSize, numLayers, vocabSize and tieWordEmbeddings when it declares
           them; otherwise a dense Llama-like shape (P ≈ 12·L·h² with h ≈ 120·L):
           h = (10·P)^(1/3), L = h / 120, V = 131072 (Llama 3 has 128256, Qwen 151936),
           untied, each embedding matrix E = V·h capped at P/4 (small models have small vocabularies)
    LoRA parameters A = rank · 20·h · L · share   (20·h = the in+out widths of q,k,v,o (GQA),
                       gate, up, down per layer; `share` = the fraction the targets cover)

    automodel, per part as the trainer places it (the fullest rank; S = DP·CP, FSDP2's shards):
      decoder layers  (P − embeddings) / (PP·TP·S)  — TP splits them, PP divides them;
                      MoE experts are sharded over EP instead of S: / (PP·TP·EP)
      embeddings      E / S on the first stage, the LM head E / S on the last (both when PP = 1,
                      one tensor when tied): TP keeps them whole
      LoRA adapter    A / (PP·S) · (1 + 1/TP) / 2  — TP splits one of each pair (B of a
                      column-split layer, A of a row-split one) and keeps the other whole
      full FT   weights 4·Pr (fp32 master)  gradients 4·Pr  optimizer 8·Pr (AdamW m, v fp32)
      LoRA      weights 2·Pr (16-bit frozen base on GPUs) + 4·Ar, gradients 4·Ar, optimizer 8·Ar
                (Pr, Ar: the parameters and adapter parameters of that rank)
      floor     16-bit everything sharded over all W ranks (the least any trainer could hold):
                full 2+2+4 bytes/param over W, LoRA 2·P/W + 8·A/W
    unsloth (one GPU, no sharding; b = bytes/param of the loaded base: 4-bit 0.5, 8-bit 1,
             else 2, or 4 for dtype float32; embeddings and lm_head, ≈ 2·V·h, stay 16-bit):
      full FT   weights b·P  gradients b·P  optimizer adamw 2·b·P, adamw_8bit 2·P, sgd 0
      LoRA      weights b·P + 4·A, gradients 4·A, optimizer adamw 8·A, 8-bit 2·A, sgd 0
      floor     the same without the 16-bit embeddings, and 0 for a paged optimizer (it can
                spill to host memory)
    activations (per micro batch; s = max_seq_length / CP, b = micro batch, t = TP, V the
                 vocabulary of the shape above;
                 Korthikanti et al. 2022, 16-bit, flash attention: s·b·h·(10 + 24/t) per layer)
      no checkpointing (automodel): s·b·h·(10 + 24/t) · L/PP · min(PP, accumulation steps)
                                     (1F1B keeps up to PP micro batches in flight on stage 0)
      checkpointing (unsloth true): 2·s·b·h·L (layer inputs) + one layer's full activations
      offloaded (unsloth "unsloth"): one layer's full activations + its input
      logits: s·b·V·12 bytes (16-bit logits, fp32 copy and gradient for the loss);
              unsloth's chunked cross-entropy: s·b·V·4
    teacher (distillation): T·p (p = 2 for bf16/fp16, 4 for fp32; every rank holds a full,
             unsharded copy, as the trainer does), or one layer T·p/L_T when offload_teacher
             (the trainer streams it layer by layer); plus its logits and the KD softmaxes
             s·b·V·10 bytes. Floor: T·p, or 0 when offloaded.
    overhead: CUDA context 1 GiB, NCCL 0.5 GiB when W > 1, and FSDP2's all-gathered 16-bit
              copy of two layers (current + prefetch) when DP·CP > 1: 2 · 2·(P/L)/t.

The verdict against the cluster's GPU size (fits / tight / cannot fit, with what to
change) is in `kubetune.planning.memory.verdict`.

Compared with NeMo Customizer's published "GPU Memory Guidelines" (the table is in
tests/planning/test_memory.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from kubetune.api.automodel import LORA_FINETUNING_TYPES, AutomodelSpec
from kubetune.api.resources import Backend, FileSetSpec, MemoryStatus, ModelSpec
from kubetune.api.unsloth import UnslothSpec
from kubetune.planning.layout import Layout

GIB = 1024**3
ASSUMED_VOCAB = 131072
HIDDEN_PER_LAYER = 120
"""h / L of Llama-like models: 128 (1B, 8B), 110 (3B), 128 (13B), 102 (70B)."""
LORA_WIDTH_PER_HIDDEN = {
    "q_proj": 2.0,
    "k_proj": 1.25,
    "v_proj": 1.25,
    "o_proj": 2.0,
    "gate_proj": 4.5,
    "up_proj": 4.5,
    "down_proj": 4.5,
}
"""in + out width of each projection in units of h (GQA with 4× fewer KV heads, MLP 3.5·h)."""
ALL_LINEAR_WIDTH = sum(LORA_WIDTH_PER_HIDDEN.values())  # 20·h
LOGIT_BYTES = 12
FUSED_LOGIT_BYTES = 4
TEACHER_LOGIT_BYTES = 10
CUDA_CONTEXT_GIB = 1.0
NCCL_GIB = 0.5

Checkpointing = Literal["none", "layers", "offload"]
OptimizerKind = Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "sgd"]
PARTS = ("weights", "gradients", "optimizer", "activations", "teacher", "overhead")


@dataclass(frozen=True)
class MemoryInputs:
    """What the estimate depends on, normalised across the two backends."""

    backend: Backend
    num_parameters: int
    full: bool
    """Full-weight training (all_weights) rather than LoRA."""
    lora_rank: int
    lora_share: float
    base_bytes: float
    """Bytes per parameter of the loaded base (0.5 for 4-bit, 1 for 8-bit, 2 or 4)."""
    quantized: bool
    optimizer: OptimizerKind
    seq_len: int
    micro_batch: int
    checkpointing: Checkpointing
    fused_loss: bool
    teacher_parameters: int | None = None
    teacher_bytes: float = 2.0
    offload_teacher: bool = False
    shape: ModelShape | None = None
    """The student's shape; None: guessed from `num_parameters` (`ModelShape.of`)."""
    experts: bool = False
    """An MoE model (its experts are sharded over EP, not FSDP2)."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes the estimate splits a model by: declared on the Model, or guessed from its size."""

    hidden: float
    layers: int
    vocab: int
    embedding: float
    """Parameters of one embedding matrix (the input embedding; the LM head is as large)."""
    tied: bool

    @classmethod
    def of(cls, params: float, model: ModelSpec | None = None) -> ModelShape:
        guessed_hidden = (10.0 * params) ** (1.0 / 3.0)
        hidden_size, vocab_size = (model.hiddenSize, model.vocabSize) if model else (None, None)
        hidden = float(hidden_size or guessed_hidden)
        layers = (model.numLayers if model else None) or max(1, round(guessed_hidden / HIDDEN_PER_LAYER))
        vocab = vocab_size or ASSUMED_VOCAB
        embedding = vocab * hidden
        if hidden_size is None or vocab_size is None:
            embedding = min(embedding, params / 4)
        return cls(hidden, layers, vocab, embedding, bool(model and model.tieWordEmbeddings))

    @property
    def head_parameters(self) -> float:
        """Embedding plus LM head (one matrix when tied)."""
        return self.embedding * (1 if self.tied else 2)


@dataclass(frozen=True)
class MemoryEstimate:
    """GPU memory per GPU, in GiB, with its parts and the floor used for refusals."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    teacher: float
    overhead: float
    floor: float
    gpus: int
    notes: Mapping[str, str] = field(default_factory=dict, compare=False)
    inputs: MemoryInputs | None = field(default=None, compare=False, repr=False)
    layout: Layout | None = field(default=None, compare=False, repr=False)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.teacher + self.overhead

    def as_dict(self) -> dict[str, float | int]:
        """snake_case GiB values rounded to 0.1, for `kubetune validate -o json`."""
        values: dict[str, float | int] = {f"{p}_gib": round(getattr(self, p), 1) for p in PARTS}
        values.update(total_gib=round(self.total, 1), floor_gib=round(self.floor, 1), gpus=self.gpus)
        return values

    def as_status(self) -> MemoryStatus:
        """`status.memoryEstimate`: the same values as `as_dict`, in GiB per GPU."""
        values = self.as_dict()
        return MemoryStatus(
            weightsGiB=values["weights_gib"],
            gradientsGiB=values["gradients_gib"],
            optimizerGiB=values["optimizer_gib"],
            activationsGiB=values["activations_gib"],
            teacherGiB=values["teacher_gib"],
            overheadGiB=values["overhead_gib"],
            totalGiB=values["total_gib"],
            floorGiB=values["floor_gib"],
            gpus=self.gpus,
        )

    def explain(self) -> str:
        lines = [f"estimated GPU memory: {self.total:.1f} GiB per GPU ({self.gpus} GPU{'s' * (self.gpus > 1)})"]
        for part in PARTS:
            note = self.notes.get(part, "")
            lines.append(f"  {part:<12}{getattr(self, part):7.1f} GiB  {note}".rstrip())
        floor_note = self.notes.get("floor", "")
        lines.append(f"  {'floor':<12}{self.floor:7.1f} GiB  {floor_note}; refused only above this".rstrip())
        return "\n".join(lines)


# --------------------------------------------------------------------------- inputs


def memory_inputs(
    section: AutomodelSpec | UnslothSpec,
    num_parameters: int,
    teacher_parameters: int | None = None,
    student: ModelSpec | None = None,
) -> MemoryInputs:
    """Normalise a backend section into what the estimate needs (`student`: the Model, for the
    shape it declares)."""
    shape = ModelShape.of(float(num_parameters), student)
    experts = bool(student is not None and student.numExperts)
    if isinstance(section, AutomodelSpec):
        training = section.training
        lora = training.lora if training.finetuning_type in LORA_FINETUNING_TYPES else None
        distill = training.training_type == "distillation"
        return MemoryInputs(
            backend="automodel",
            num_parameters=num_parameters,
            full=lora is None,
            lora_rank=lora.rank if lora else 0,
            lora_share=_lora_share(lora.target_modules if lora else None),
            base_bytes=2.0,
            quantized=False,
            optimizer="adamw",
            seq_len=training.max_seq_length,
            micro_batch=section.batch.micro_batch_size,
            checkpointing="none",  # the automodel trainer keeps every activation (no recompute)
            fused_loss=False,
            teacher_parameters=teacher_parameters if distill else None,
            teacher_bytes=4.0 if training.teacher_precision == "fp32" else 2.0,
            offload_teacher=training.offload_teacher,
            shape=shape,
            experts=experts,
        )
    model, unsloth_training = section.model, section.training
    if model.load_in_4bit:
        base_bytes = 0.5
    elif model.load_in_8bit:
        base_bytes = 1.0
    else:
        base_bytes = 4.0 if model.dtype == "float32" else 2.0
    gc = unsloth_training.use_gradient_checkpointing
    optim = section.optimizer.optim
    return MemoryInputs(
        backend="unsloth",
        num_parameters=num_parameters,
        full=unsloth_training.finetuning_type == "all_weights",
        lora_rank=unsloth_training.lora.rank if unsloth_training.lora else 0,
        lora_share=_lora_share(unsloth_training.lora.target_modules if unsloth_training.lora else None),
        base_bytes=base_bytes,
        quantized=model.load_in_4bit or model.load_in_8bit,
        optimizer="adamw" if optim.startswith("adamw_torch") else optim,  # type: ignore[arg-type]
        seq_len=model.max_seq_length,
        micro_batch=section.batch.per_device_train_batch_size,
        checkpointing="offload" if gc == "unsloth" else "layers" if gc else "none",
        fused_loss=True,
        shape=shape,
        experts=experts,
    )


def _lora_share(targets: list[str] | None) -> float:
    """Fraction of the all-linear LoRA width the targets cover; unknown names count as an MLP matrix."""
    if targets is None:
        return 1.0
    width = sum(LORA_WIDTH_PER_HIDDEN.get(name.rsplit(".", 1)[-1], 4.5) for name in set(targets))
    return min(1.0, width / ALL_LINEAR_WIDTH)


# --------------------------------------------------------------------------- estimate


def estimate_memory(
    section: AutomodelSpec | UnslothSpec, layout: Layout, model: ModelSpec | None, teacher: ModelSpec | None = None
) -> MemoryEstimate | None:
    """The per-GPU estimate, or None when a size it needs (student or teacher) is unknown."""
    if model is None or model.numParameters is None or model.adapter is not None:
        return None
    distill = isinstance(section, AutomodelSpec) and section.training.training_type == "distillation"
    teacher_parameters = teacher.numParameters if teacher is not None else None
    if distill and (teacher_parameters is None or (teacher is not None and teacher.adapter is not None)):
        return None
    return estimate(memory_inputs(section, model.numParameters, teacher_parameters, model), layout)


def estimate_from_resolved(
    section: AutomodelSpec | UnslothSpec, layout: Layout, resolved: Mapping[str, ModelSpec | FileSetSpec]
) -> MemoryEstimate | None:
    """Same, from `ReferenceCheck.resolved` (the objects a job's references resolved to, by role)."""
    model, teacher = resolved.get("model"), resolved.get("teacher")
    return estimate_memory(
        section,
        layout,
        model if isinstance(model, ModelSpec) else None,
        teacher if isinstance(teacher, ModelSpec) else None,
    )


def estimate(inputs: MemoryInputs, layout: Layout) -> MemoryEstimate:
    """The formula of the module docstring."""
    p = float(inputs.num_parameters)
    shape = inputs.shape or ModelShape.of(p)
    layers = shape.layers
    world = layout.world_size
    notes: dict[str, str] = {}
    states = _states(inputs, layout, shape, notes)
    acts = _activations(inputs, layout, shape, notes)
    teacher, teacher_floor = _teacher(inputs, layout, notes)
    notes["floor"] = (
        "weights, gradients and optimizer states at 16-bit, no activations"
        if inputs.backend == "automodel"
        else "weights as loaded, gradients and optimizer states, no activations"
    ) + (", teacher weights" if teacher_floor else "")

    overhead = CUDA_CONTEXT_GIB * GIB + (NCCL_GIB * GIB if world > 1 else 0.0)
    if inputs.backend == "automodel" and layout.data_parallel_size * layout.context_parallel_size > 1:
        # FSDP2 all-gathers each layer (and prefetches the next) in bf16, per TP shard.
        overhead += 2 * 2.0 * (p / layers) / layout.tensor_parallel_size
    notes["overhead"] = "CUDA context" + (", NCCL, FSDP2 all-gather buffers" if world > 1 else "")

    return MemoryEstimate(
        weights=states.weights / GIB,
        gradients=states.gradients / GIB,
        optimizer=states.optimizer / GIB,
        activations=acts / GIB,
        teacher=teacher / GIB,
        overhead=overhead / GIB,
        floor=(states.floor + teacher_floor) / GIB,
        gpus=world if inputs.backend == "automodel" else 1,
        notes=notes,
        inputs=inputs,
        layout=layout,
    )


@dataclass(frozen=True)
class _States:
    """Bytes per GPU of weights, gradients and optimizer states, and their floor."""

    weights: float
    gradients: float
    optimizer: float
    floor: float


def _states(inputs: MemoryInputs, layout: Layout, shape: ModelShape, notes: dict[str, str]) -> _States:
    p = float(inputs.num_parameters)
    adapter = (
        0.0 if inputs.full else inputs.lora_rank * ALL_LINEAR_WIDTH * shape.hidden * shape.layers * inputs.lora_share
    )
    trained = p if inputs.full else adapter
    notes["gradients"] = f"{_count(trained)} trained params"
    if inputs.backend == "automodel":
        held = _rank_parameters(p, shape, layout, inputs.experts)
        held_adapter = _rank_adapter(adapter, layout)
        held_trained = held if inputs.full else held_adapter
        base = 0.0 if inputs.full else 2.0 * held
        notes["weights"] = (
            f"{_count(p)} params × 4 bytes (fp32 master, bf16 compute)"
            if inputs.full
            else f"{_count(p)} × 2 bytes (16-bit frozen base) + {_count(adapter)} LoRA params × 4 bytes"
        ) + (f"; this GPU holds {_count(held)} of them" if layout.world_size > 1 else "")
        notes["optimizer"] = f"AdamW: 2 fp32 states × {_count(held_trained)} trained params"
        world = float(layout.world_size)
        return _States(
            weights=base + 4.0 * held_trained,
            gradients=4.0 * held_trained,
            optimizer=8.0 * held_trained,
            floor=((0.0 if inputs.full else 2.0 * p) + (2.0 + 2.0 + 4.0) * trained) / world,
        )
    # unsloth: one GPU; bitsandbytes keeps the embeddings and lm_head in 16-bit
    embeddings = min(shape.head_parameters, p / 2) if inputs.quantized else 0.0
    base = inputs.base_bytes * (p - embeddings) + 2.0 * embeddings
    trained_bytes = inputs.base_bytes if inputs.full else 4.0  # PEFT keeps adapters in fp32
    state_bytes = {"adamw": 2.0 * trained_bytes, "adamw_8bit": 2.0, "paged_adamw_8bit": 2.0, "sgd": 0.0}
    optimizer = state_bytes[inputs.optimizer] * trained
    load = {0.5: "4-bit", 1.0: "8-bit", 2.0: "16-bit", 4.0: "fp32"}[inputs.base_bytes]
    notes["weights"] = f"{_count(p)} params loaded {load}" + (
        "" if inputs.full else f" + {_count(adapter)} LoRA params × 4 bytes"
    )
    notes["optimizer"] = f"{inputs.optimizer} on {_count(trained)} trained params"
    floor = 2.0 * inputs.base_bytes * p if inputs.full else inputs.base_bytes * p + 4.0 * adapter
    # A paged optimizer's states can spill to host memory: they are no part of the floor.
    floor += 0.0 if inputs.optimizer == "paged_adamw_8bit" else optimizer
    return _States(
        weights=base + (0.0 if inputs.full else 4.0 * adapter),
        gradients=trained_bytes * trained,
        optimizer=optimizer,
        floor=floor,
    )


def _rank_parameters(params: float, shape: ModelShape, layout: Layout, experts: bool) -> float:
    """Parameters the fullest rank of an automodel job holds (see the module docstring)."""
    shards = layout.data_parallel_size * layout.context_parallel_size
    pp, tp = layout.pipeline_parallel_size, layout.tensor_parallel_size
    outer = shape.head_parameters if pp == 1 else shape.embedding
    decoder = max(0.0, params - shape.head_parameters)
    decoder_shards = layout.expert_parallel_size if experts and layout.expert_parallel_size > 1 else shards
    return decoder / (pp * tp * decoder_shards) + outer / shards


def _rank_adapter(adapter: float, layout: Layout) -> float:
    """LoRA parameters the fullest rank holds: TP splits one matrix of each pair."""
    shards = layout.data_parallel_size * layout.context_parallel_size * layout.pipeline_parallel_size
    return adapter / shards * (1.0 + 1.0 / layout.tensor_parallel_size) / 2.0


def _activations(inputs: MemoryInputs, layout: Layout, shape: ModelShape, notes: dict[str, str]) -> float:
    """Bytes of activations (and logits) one rank keeps for the backward pass."""
    hidden, layers = shape.hidden, shape.layers
    tp, pp = layout.tensor_parallel_size, layout.pipeline_parallel_size
    tokens = inputs.seq_len / layout.context_parallel_size * inputs.micro_batch
    per_layer = tokens * hidden * (10.0 + 24.0 / tp)
    if inputs.checkpointing == "none":
        # 1F1B: stage 0 holds up to PP micro batches (never more than there are) of L/PP layers
        acts = per_layer * (layers / pp) * min(pp, layout.gradient_accumulation_steps)
        how = "all kept"
    elif inputs.checkpointing == "layers":
        acts = 2.0 * tokens * hidden * layers + per_layer
        how = "checkpointed"
    else:
        acts = 2.0 * tokens * hidden + per_layer
        how = "offloaded to host"
    acts += tokens * shape.vocab * (FUSED_LOGIT_BYTES if inputs.fused_loss else LOGIT_BYTES)
    notes["activations"] = (
        f"{inputs.seq_len} tokens × micro batch {inputs.micro_batch}, hidden ≈{hidden:.0f} × {layers} layers "
        f"({how}), logits over {shape.vocab} tokens"
    )
    return acts


def teacher_weight_bytes(inputs: MemoryInputs) -> float:
    """Teacher weights on one GPU: a whole, unsharded copy (every rank holds one), or one layer
    when offloaded (kubetune_trainer/backends/automodel/teacher.py streams it layer by layer)."""
    if inputs.teacher_parameters is None:
        return 0.0
    t = float(inputs.teacher_parameters)
    return inputs.teacher_bytes * t / (ModelShape.of(t).layers if inputs.offload_teacher else 1)


def _teacher(inputs: MemoryInputs, layout: Layout, notes: dict[str, str]) -> tuple[float, float]:
    """(bytes, floor bytes) of the frozen teacher of a distillation job."""
    if inputs.teacher_parameters is None:
        return 0.0, 0.0
    t = float(inputs.teacher_parameters)
    t_hidden = ModelShape.of(t).hidden
    vocab = (inputs.shape or ModelShape.of(float(inputs.num_parameters))).vocab  # the student's, shared
    tokens = inputs.seq_len / layout.context_parallel_size * inputs.micro_batch
    weights = teacher_weight_bytes(inputs)
    # no_grad forward: one layer's working set, then its logits and the two KD softmaxes
    working = tokens * t_hidden * 34.0 + tokens * vocab * TEACHER_LOGIT_BYTES
    notes["teacher"] = f"{_count(t)} params × {inputs.teacher_bytes:.0f} bytes" + (
        ", offloaded (one layer on the GPU)" if inputs.offload_teacher else ""
    )
    return weights + working, 0.0 if inputs.offload_teacher else weights


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"
