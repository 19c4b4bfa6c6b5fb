"""The memory pre-flight's verdict: does a job's estimate fit the cluster's GPUs?

Against a GPU of G GiB (KUBETUNE_GPU_MEMORY_GIB): `fits` when the estimate is at most 90%
of G (the allocator's fragmentation takes the rest); `cannot fit` when even the floor
(weights, gradients and optimizer states at their leanest, no activations) exceeds G, so
the job is refused; `tight` (a warning) otherwise. The message lists the changes that
would help, each re-estimated with `kubetune.planning.memory.estimate` (more GPUs, LoRA,
4-bit, an 8-bit optimizer, a smaller micro batch, gradient checkpointing, offloading the
teacher), those that make the job fit first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from kubetune.api.resources import MemoryStatus
from kubetune.planning.layout import Layout
from kubetune.planning.memory import estimate
from kubetune.planning.memory.estimate import MemoryEstimate, MemoryInputs
from kubetune.planning.references import Finding

FITS_FRACTION = 0.9
"""Above 90% of the GPU the allocator's fragmentation alone can run a job out of memory."""
MAX_GPUS = 4096

Verdict = Literal["fits", "tight", "cannot fit"]


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
    verdict = _verdict(estimate, gpu)
    if verdict == "fits":
        return MemoryCheck("fits", f"estimated {total:.1f} GiB per GPU fits GPUs of {gpu:g} GiB", estimate, gpu)
    suggestions = tuple(_suggestions(estimate, gpu, verdict))
    advice = "; ".join(suggestions) or "use GPUs with more memory"
    if verdict == "cannot fit":
        message = (
            f"cannot fit: the weights, gradients and optimizer states alone need at least {floor:.1f} GiB per GPU, "
            f"more than one GPU's {gpu:g} GiB (estimated {total:.1f} GiB with activations). Change: {advice}"
        )
    else:
        message = (
            f"estimated {total:.1f} GiB per GPU is more than {FITS_FRACTION:.0%} of one GPU's {gpu:g} GiB, so the job "
            f"may run out of memory (the weights, gradients and optimizer states need at least {floor:.1f} GiB). "
            f"To lower it: {advice}"
        )
    return MemoryCheck(verdict, message, estimate, gpu, suggestions)


def _verdict(e: MemoryEstimate, gpu: float) -> Verdict:
    if e.total <= FITS_FRACTION * gpu:
        return "fits"
    return "cannot fit" if e.floor > gpu else "tight"


_RANK: dict[Verdict, int] = {"fits": 0, "tight": 1, "cannot fit": 2}


def _suggestions(current: MemoryEstimate, gpu: float, verdict: Verdict) -> list[str]:
    """Each applicable change, re-estimated; those that help, best first."""
    if current.inputs is None or current.layout is None:
        return []
    # A refused job is helped by what lowers the floor; a tight one by what lowers the total.
    metric: Callable[[MemoryEstimate], float] = (lambda e: e.floor) if verdict == "cannot fit" else (lambda e: e.total)
    scored: list[tuple[int, float, str]] = []
    for change in _CHANGES:
        changed = change(current.inputs, current.layout)
        if changed is None:
            continue
        text, inputs, layout = changed
        after = estimate.estimate(inputs, layout)
        if metric(after) < metric(current) - 0.05:
            then = _verdict(after, gpu)
            scored.append((_RANK[then], metric(after), f"{text} (≈{after.total:.1f} GiB per GPU: {then})"))
    more = _more_gpus(current, gpu, verdict)
    if more is not None:
        scored.append(more)
    return [text for _, _, text in sorted(scored)]


def _more_gpus(current: MemoryEstimate, gpu: float, verdict: Verdict) -> tuple[int, float, str] | None:
    """The smallest automodel world (a multiple of TP×PP×CP, up to MAX_GPUS) that improves the verdict."""
    inputs, layout = current.inputs, current.layout
    if inputs is None or layout is None or inputs.backend != "automodel":
        return None
    model_parallel = layout.world_size // layout.data_parallel_size
    best: tuple[int, MemoryEstimate] | None = None
    for dp in range(layout.data_parallel_size + 1, MAX_GPUS // model_parallel + 1):
        world = dp * model_parallel
        bigger = layout.model_copy(update={"data_parallel_size": dp, "world_size": world, "total_gpus": world})
        after = estimate.estimate(inputs, bigger)
        then = _verdict(after, gpu)
        if then == "fits":
            best = (world, after)
            break
        if best is None and _RANK[then] < _RANK[verdict]:
            best = (world, after)  # remember the first improvement; keep looking for one that fits
    if best is None:
        return None
    world, after = best
    then = _verdict(after, gpu)
    text = (
        f"more GPUs: at least {world} (parallelism.num_nodes × num_gpus_per_node, now {layout.world_size}; "
        f"≈{after.total:.1f} GiB per GPU: {then})"
    )
    return _RANK[then], after.floor if verdict == "cannot fit" else after.total, text


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


def memory_report(estimate: MemoryEstimate | None, gpu_memory_gib: float | None) -> MemoryStatus | None:
    """status.memoryEstimate: the estimate, plus the verdict when the GPU size is configured."""
    if estimate is None:
        return None
    status = estimate.as_status()
    if gpu_memory_gib is not None:
        check = check_memory(estimate, gpu_memory_gib)
        status = status.model_copy(
            update={"gpuMemoryGiB": gpu_memory_gib, "verdict": check.verdict, "message": check.message}
        )
    return status
