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

    shape (dense Llama-like, P ≈ 12·L·h² with h ≈ 120·L):  h = (10·P)^(1/3),  L = h / 120
    vocabulary V = 131072 (assumed; Llama 3 has 128256, Qwen 151936)
    LoRA parameters A = rank · 20·h · L · share   (20·h = the in+out widths of q,k,v,o (GQA),
                       gate, up, down per layer; `share` = the fraction the targets cover)

    automodel (FSDP2 shards everything over all W ranks, as torchtitan's dp_shard×cp mesh;
               TP and PP split the weights, so every sharded tensor is divided by W):
      full FT   weights 4·P/W (fp32 master)  gradients 4·P/W   optimizer 8·P/W (AdamW m, v fp32)
      LoRA      weights 2·P/W (16-bit frozen base) + 4·A/W, gradients 4·A/W, optimizer 8·A/W
      floor     the same with 16-bit everything: full 2+2+4 bytes/param, LoRA 2·P/W + 8·A/W
    unsloth (one GPU, no sharding; b = bytes/param of the loaded base: 4-bit 0.5, 8-bit 1,
             else 2, or 4 for dtype float32; embeddings and lm_head, ≈ 2·V·h, stay 16-bit):
      full FT   weights b·P  gradients b·P  optimizer adamw 2·b·P, adamw_8bit 2·P, sgd 0
      LoRA      weights b·P + 4·A, gradients 4·A, optimizer adamw 8·A, 8-bit 2·A, sgd 0
      floor     the same without the 16-bit embeddings, and 0 for a paged optimizer (it can
                spill to host memory)
    activations (per micro batch; s = max_seq_length / CP, b = micro batch, t = TP;
                 Korthikanti et al. 2022, 16-bit, flash attention: s·b·h·(10 + 24/t) per layer)
      no checkpointing (automodel): s·b·h·(10 + 24/t) · L/PP · min(PP, accumulation steps)
                                     (1F1B keeps up to PP micro batches in flight on stage 0)
      checkpointing (unsloth true): 2·s·b·h·L (layer inputs) + one layer's full activations
      offloaded (unsloth "unsloth"): one layer's full activations + its input
      logits: s·b·V·12 bytes (16-bit logits, fp32 copy and gradient for the loss);
              unsloth's chunked cross-entropy: s·b·V·4
    teacher (distillation): T·p/W (p = 2 for bf16/fp16, 4 for fp32; sharded like the student),
             or one layer T·p/L_T when offload_teacher; plus its logits and the KD softmaxes
             s·b·V·10 bytes. Floor: T·p/W, or 0 when offloaded.
    overhead: CUDA context 1 GiB, NCCL 0.5 GiB when W > 1, and FSDP2's all-gathered 16-bit
              copy of two layers (current + prefetch) when DP·CP > 1: 2 · 2·(P/L)/t.

Verdict against a GPU of G GiB: `fits` when estimate ≤ 90% of G (the allocator's
fragmentation takes the rest); `cannot fit` when floor > G; `tight` otherwise. The message
lists the changes that would help, each re-estimated (more GPUs, LoRA, 4-bit, an 8-bit
optimizer, a smaller micro batch, gradient checkpointing, offloading the teacher).

Compared with the seed's "GPU Memory Guidelines" in tests/planning/test_memory.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from kubetune.api.automodel import LORA_FINETUNING_TYPES, AutomodelSpec
from kubetune.api.resources import Backend, FileSetSpec, ModelSpec
from kubetune.api.unsloth import UnslothSpec
from kubetune.planning.layout import Layout
from kubetune.planning.references import Finding

GIB = 1024**3
FITS_FRACTION = 0.9
"""Above 90% of the GPU the allocator's fragmentation alone can run a job out of memory."""
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

Verdict = Literal["fits", "tight", "cannot fit"]
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

    def as_status(self) -> dict[str, float | int]:
        """camelCase, as `status.memoryEstimate` holds it (values in GiB per GPU)."""
        return {_camel_gib(key): value for key, value in self.as_dict().items()}

    def explain(self) -> str:
        lines = [f"estimated GPU memory: {self.total:.1f} GiB per GPU ({self.gpus} GPU{'s' * (self.gpus > 1)})"]
        for part in PARTS:
            note = self.notes.get(part, "")
            lines.append(f"  {part:<12}{getattr(self, part):7.1f} GiB  {note}".rstrip())
        lines.append(
            f"  {'floor':<12}{self.floor:7.1f} GiB  weights, gradients and optimizer states at 16-bit, "
            "no activations: refused only above this"
        )
        return "\n".join(lines)


def _camel_gib(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join("GiB" if word == "gib" else word.title() for word in rest)


# --------------------------------------------------------------------------- inputs


def memory_inputs(
    section: AutomodelSpec | UnslothSpec, num_parameters: int, teacher_parameters: int | None = None
) -> MemoryInputs:
    """Normalise a backend section into what the estimate needs."""
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
        )
    model, training = section.model, section.training
    if model.load_in_4bit:
        base_bytes = 0.5
    elif model.load_in_8bit:
        base_bytes = 1.0
    else:
        base_bytes = 4.0 if model.dtype == "float32" else 2.0
    gc = training.use_gradient_checkpointing
    optim = section.optimizer.optim
    return MemoryInputs(
        backend="unsloth",
        num_parameters=num_parameters,
        full=training.finetuning_type == "all_weights",
        lora_rank=training.lora.rank if training.lora else 0,
        lora_share=_lora_share(training.lora.target_modules if training.lora else None),
        base_bytes=base_bytes,
        quantized=model.load_in_4bit or model.load_in_8bit,
        optimizer="adamw" if optim.startswith("adamw_torch") else optim,  # type: ignore[arg-type]
        seq_len=model.max_seq_length,
        micro_batch=section.batch.per_device_train_batch_size,
        checkpointing="offload" if gc == "unsloth" else "layers" if gc else "none",
        fused_loss=True,
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
    return estimate(memory_inputs(section, model.numParameters, teacher_parameters), layout)


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
    hidden, layers = _shape(p)
    world = layout.world_size
    shard = float(world) if inputs.backend == "automodel" else 1.0
    tp, pp, cp = layout.tensor_parallel_size, layout.pipeline_parallel_size, layout.context_parallel_size
    adapter = 0.0 if inputs.full else inputs.lora_rank * ALL_LINEAR_WIDTH * hidden * layers * inputs.lora_share
    notes: dict[str, str] = {}

    # weights, gradients, optimizer: (typical, floor) in bytes
    if inputs.backend == "automodel":
        trained = p if inputs.full else adapter
        base = 0.0 if inputs.full else 2.0 * p
        weights, weights_floor = (base + 4.0 * trained) / shard, (base + 2.0 * trained) / shard
        grads, grads_floor = 4.0 * trained / shard, 2.0 * trained / shard
        optim, optim_floor = 8.0 * trained / shard, 4.0 * trained / shard
        notes["weights"] = (
            f"{_count(p)} params × 4 bytes (fp32 master, bf16 compute)"
            if inputs.full
            else f"{_count(p)} × 2 bytes (16-bit frozen base) + {_count(adapter)} LoRA params × 4 bytes"
        ) + (f", FSDP2-sharded over {world} GPUs" if world > 1 else "")
        notes["optimizer"] = f"AdamW: 2 fp32 states × {_count(trained)} trained params"
    else:
        embeddings = min(2.0 * ASSUMED_VOCAB * hidden, p / 2) if inputs.quantized else 0.0
        base_floor = inputs.base_bytes * p
        base = inputs.base_bytes * (p - embeddings) + 2.0 * embeddings
        trained_bytes = inputs.base_bytes if inputs.full else 4.0
        trained = p if inputs.full else adapter
        state_bytes = {"adamw": 2.0 * trained_bytes, "adamw_8bit": 2.0, "paged_adamw_8bit": 2.0, "sgd": 0.0}
        weights = base if inputs.full else base + 4.0 * adapter
        weights_floor = base_floor if inputs.full else base_floor + 2.0 * adapter
        grads = trained_bytes * trained
        grads_floor = grads if inputs.full else 2.0 * adapter
        optim = state_bytes[inputs.optimizer] * trained
        optim_floor = 0.0 if inputs.optimizer == "paged_adamw_8bit" else optim
        load = {0.5: "4-bit", 1.0: "8-bit", 2.0: "16-bit", 4.0: "fp32"}[inputs.base_bytes]
        notes["weights"] = f"{_count(p)} params loaded {load}" + (
            "" if inputs.full else f" + {_count(adapter)} LoRA params × 4 bytes"
        )
        notes["optimizer"] = f"{inputs.optimizer} on {_count(trained)} trained params"
    notes["gradients"] = f"{_count(p if inputs.full else adapter)} trained params"

    # activations of one rank (bytes)
    seq = inputs.seq_len / cp
    tokens = seq * inputs.micro_batch
    per_layer = tokens * hidden * (10.0 + 24.0 / tp)
    if inputs.checkpointing == "none":
        in_flight = min(pp, layout.gradient_accumulation_steps)
        acts = per_layer * (layers / pp) * in_flight
        how = "all kept"
    elif inputs.checkpointing == "layers":
        acts = 2.0 * tokens * hidden * layers + per_layer
        how = "checkpointed"
    else:
        acts = 2.0 * tokens * hidden + per_layer
        how = "offloaded to host"
    acts += tokens * ASSUMED_VOCAB * (FUSED_LOGIT_BYTES if inputs.fused_loss else LOGIT_BYTES)
    notes["activations"] = (
        f"{inputs.seq_len} tokens × micro batch {inputs.micro_batch}, hidden ≈{hidden:.0f} × {layers} layers "
        f"({how}), logits over {ASSUMED_VOCAB} tokens"
    )

    # teacher (distillation)
    teacher = teacher_floor = 0.0
    if inputs.teacher_parameters is not None:
        t = float(inputs.teacher_parameters)
        t_hidden, t_layers = _shape(t)
        teacher_weights = inputs.teacher_bytes * t / (t_layers if inputs.offload_teacher else shard)
        teacher = teacher_weights + tokens * ASSUMED_VOCAB * TEACHER_LOGIT_BYTES + tokens * t_hidden * 34.0
        teacher_floor = 0.0 if inputs.offload_teacher else teacher_weights
        notes["teacher"] = f"{_count(t)} params × {inputs.teacher_bytes:.0f} bytes" + (
            ", offloaded (one layer on the GPU)" if inputs.offload_teacher else ""
        )

    overhead = CUDA_CONTEXT_GIB * GIB + (NCCL_GIB * GIB if world > 1 else 0.0)
    if inputs.backend == "automodel" and layout.data_parallel_size * cp > 1:
        overhead += 2 * 2.0 * (p / layers) / tp
    notes["overhead"] = "CUDA context" + (", NCCL, FSDP2 all-gather buffers" if world > 1 else "")

    return MemoryEstimate(
        weights=weights / GIB,
        gradients=grads / GIB,
        optimizer=optim / GIB,
        activations=acts / GIB,
        teacher=teacher / GIB,
        overhead=overhead / GIB,
        floor=(weights_floor + grads_floor + optim_floor + teacher_floor) / GIB,
        gpus=world if inputs.backend == "automodel" else 1,
        notes=notes,
        inputs=inputs,
        layout=layout,
    )


def _shape(params: float) -> tuple[float, int]:
    """(hidden size, layers) of a dense Llama-like model with this many parameters."""
    hidden = (10.0 * params) ** (1.0 / 3.0)
    return hidden, max(1, round(hidden / HIDDEN_PER_LAYER))


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


# --------------------------------------------------------------------------- verdict


@dataclass(frozen=True)
class MemoryCheck:
    """The estimate against the cluster's GPU memory size (KUBETUNE_GPU_MEMORY_GIB)."""

    verdict: Verdict
    message: str
    estimate: MemoryEstimate
    gpu_memory_gib: float
    suggestions: tuple[str, ...] = ()

    @property
    def refuse(self) -> bool:
        return self.verdict == "cannot fit"

    @property
    def warn(self) -> bool:
        return self.verdict == "tight"

    @property
    def reason(self) -> str:
        """CamelCase reason for a condition or an event."""
        return {"fits": "MemoryFits", "tight": "MemoryTight", "cannot fit": "MemoryCannotFit"}[self.verdict]

    def finding(self) -> Finding | None:
        """An error (refuse) or warning (tight) at the backend section; None when it fits."""
        if self.verdict == "fits":
            return None
        backend = self.estimate.inputs.backend if self.estimate.inputs else "automodel"
        return Finding(f"spec.{backend}", self.message, self.reason)


Change = Callable[[MemoryInputs, Layout], "tuple[str, MemoryInputs, Layout] | None"]
"""A change a user can make: (what to write, the inputs and layout after it), or None if n/a."""


def check_memory(estimate: MemoryEstimate, gpu_memory_gib: float) -> MemoryCheck:
    """fits / tight (warn) / cannot fit (refuse), with the changes that would help."""
    if gpu_memory_gib <= 0:
        raise ValueError(f"gpu_memory_gib must be positive, got {gpu_memory_gib}")
    total, floor, gpu = estimate.total, estimate.floor, gpu_memory_gib
    if total <= FITS_FRACTION * gpu:
        return MemoryCheck("fits", f"estimated {total:.1f} GiB per GPU fits GPUs of {gpu:g} GiB", estimate, gpu)
    verdict: Verdict = "cannot fit" if floor > gpu else "tight"
    suggestions = tuple(_suggestions(estimate, gpu, verdict))
    advice = "; ".join(suggestions) or "use GPUs with more memory"
    if verdict == "cannot fit":
        message = (
            f"cannot fit: the weights, gradients and optimizer states alone need at least {floor:.1f} GiB per GPU, "
            f"more than a {gpu:g} GiB GPU has (estimated {total:.1f} GiB with activations). Change: {advice}"
        )
    else:
        message = (
            f"estimated {total:.1f} GiB per GPU is more than {FITS_FRACTION:.0%} of a {gpu:g} GiB GPU, so the job "
            f"may run out of memory (the weights, gradients and optimizer states need at least {floor:.1f} GiB). "
            f"To lower it: {advice}"
        )
    return MemoryCheck(verdict, message, estimate, gpu, suggestions)


def _metric(e: MemoryEstimate, verdict: Verdict) -> float:
    return e.floor if verdict == "cannot fit" else e.total


def _fits(e: MemoryEstimate, gpu: float, verdict: Verdict) -> bool:
    return e.floor <= gpu if verdict == "cannot fit" else e.total <= FITS_FRACTION * gpu


def _suggestions(current: MemoryEstimate, gpu: float, verdict: Verdict) -> list[str]:
    if current.inputs is None or current.layout is None:
        return []
    scored: list[tuple[bool, float, str]] = []
    for change in _CHANGES:
        changed = change(current.inputs, current.layout)
        if changed is None:
            continue
        text, inputs, layout = changed
        after = estimate(inputs, layout)
        if _metric(after, verdict) < _metric(current, verdict) - 0.05:
            fits = _fits(after, gpu, verdict)
            what = "fits" if fits else "still too much"
            scored.append((not fits, _metric(after, verdict), f"{text} (≈{after.total:.1f} GiB per GPU, {what})"))
    more = _more_gpus(current, gpu, verdict)
    if more is not None:
        scored.append((False, 0.0, more))
    return [text for _, _, text in sorted(scored)]


def _more_gpus(current: MemoryEstimate, gpu: float, verdict: Verdict) -> str | None:
    """The smallest automodel world (a multiple of TP×PP×CP) that fits, if any up to 4096 GPUs."""
    inputs, layout = current.inputs, current.layout
    if inputs is None or layout is None or inputs.backend != "automodel":
        return None
    model_parallel = layout.world_size // layout.data_parallel_size
    for dp in range(layout.data_parallel_size + 1, 4096 // model_parallel + 1):
        world = dp * model_parallel
        bigger = dataclasses.replace(layout, data_parallel_size=dp, world_size=world, total_gpus=world)
        if _fits(estimate(inputs, bigger), gpu, verdict):
            return (
                f"more GPUs: at least {world} (parallelism.num_nodes × num_gpus_per_node, now {layout.world_size}; "
                "keep global_batch_size divisible by micro_batch_size × data_parallel_size)"
            )
    return None


def _lora(i: MemoryInputs, layout: Layout) -> tuple[str, MemoryInputs, Layout] | None:
    if not i.full:
        return None
    if i.backend == "automodel":
        return (
            "training.finetuning_type: lora",
            dataclasses.replace(i, full=False, lora_rank=16, lora_share=1.0),
            layout,
        )
    qlora = dataclasses.replace(i, full=False, lora_rank=16, lora_share=1.0, base_bytes=0.5, quantized=True)
    return "training.finetuning_type: lora with model.load_in_4bit: true", qlora, layout


def _four_bit(i: MemoryInputs, layout: Layout) -> tuple[str, MemoryInputs, Layout] | None:
    if i.backend != "unsloth" or i.full or i.base_bytes == 0.5:
        return None
    return "model.load_in_4bit: true", dataclasses.replace(i, base_bytes=0.5, quantized=True), layout


def _unsloth_qlora(i: MemoryInputs, layout: Layout) -> tuple[str, MemoryInputs, Layout] | None:
    if i.backend != "automodel" or layout.world_size > 1 or i.teacher_parameters is not None:
        return None
    qlora = dataclasses.replace(
        i,
        backend="unsloth",
        full=False,
        lora_rank=i.lora_rank or 16,
        lora_share=1.0 if i.full else i.lora_share,
        base_bytes=0.5,
        quantized=True,
        optimizer="adamw_8bit",
        checkpointing="offload",
        fused_loss=True,
    )
    return "the unsloth backend with load_in_4bit: true (QLoRA on one GPU)", qlora, layout


def _eight_bit_optimizer(i: MemoryInputs, layout: Layout) -> tuple[str, MemoryInputs, Layout] | None:
    if i.backend != "unsloth" or i.optimizer not in ("adamw", "adamw_8bit"):
        return None
    return "optimizer.optim: paged_adamw_8bit", dataclasses.replace(i, optimizer="paged_adamw_8bit"), layout


def _micro_batch(i: MemoryInputs, layout: Layout) -> tuple[str, MemoryInputs, Layout] | None:
    if i.micro_batch == 1:
        return None
    field_name = "batch.micro_batch_size" if i.backend == "automodel" else "batch.per_device_train_batch_size"
    return f"{field_name}: 1 (more gradient accumulation instead)", dataclasses.replace(i, micro_batch=1), layout


def _checkpointing(i: MemoryInputs, layout: Layout) -> tuple[str, MemoryInputs, Layout] | None:
    if i.backend != "unsloth" or i.checkpointing == "offload":
        return None
    return "training.use_gradient_checkpointing: unsloth", dataclasses.replace(i, checkpointing="offload"), layout


def _shorter_sequences(i: MemoryInputs, layout: Layout) -> tuple[str, MemoryInputs, Layout] | None:
    if i.seq_len <= 1024:
        return None
    field_name = "training.max_seq_length" if i.backend == "automodel" else "model.max_seq_length"
    return f"{field_name}: {i.seq_len // 2}", dataclasses.replace(i, seq_len=i.seq_len // 2), layout


def _offload_teacher(i: MemoryInputs, layout: Layout) -> tuple[str, MemoryInputs, Layout] | None:
    if i.teacher_parameters is None or i.offload_teacher:
        return None
    return "training.offload_teacher: true", dataclasses.replace(i, offload_teacher=True), layout


def _teacher_bf16(i: MemoryInputs, layout: Layout) -> tuple[str, MemoryInputs, Layout] | None:
    if i.teacher_parameters is None or i.teacher_bytes <= 2.0:
        return None
    return "training.teacher_precision: bf16", dataclasses.replace(i, teacher_bytes=2.0), layout


_CHANGES: tuple[Change, ...] = (
    _lora,
    _four_bit,
    _unsloth_qlora,
    _eight_bit_optimizer,
    _micro_batch,
    _checkpointing,
    _offload_teacher,
    _teacher_bf16,
    _shorter_sequences,
)


def memory_report(estimate: MemoryEstimate | None, gpu_memory_gib: float | None) -> dict[str, Any] | None:
    """status.memoryEstimate: the estimate, plus the verdict when the GPU size is configured."""
    if estimate is None:
        return None
    status: dict[str, Any] = dict(estimate.as_status())
    if gpu_memory_gib is not None:
        check = check_memory(estimate, gpu_memory_gib)
        status.update(gpuMemoryGiB=gpu_memory_gib, verdict=check.verdict, message=check.message)
    return status
