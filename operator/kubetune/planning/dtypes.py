"""dtype rules, checked before a job starts instead of deep inside TRL or a CUDA kernel.

Two kinds:

- within the job (`precision_matches_dtype`, a rule in `rules.py`, so the CRD's CEL
  enforces it too): unsloth's `hardware.precision` (the mixed-precision compute dtype)
  must be able to run on weights loaded as `model.dtype`. fp32 weights train in either
  (autocast); fp16 weights cannot train in bf16 nor bf16 weights in fp16 (TRL refuses
  with its own argument names, or the loss overflows).
- against the cluster (`gpu_dtype_findings`): bf16 needs an Ampere or newer GPU. When the
  operator knows the cluster's GPU type (the chart's `gpuType`, `kubetune validate
  --gpu-type`), a job that asks for bf16 on a type known to lack it is refused — every
  automodel job among them, since that trainer always computes in bf16 on GPUs.
"""

from __future__ import annotations

import re

from kubetune.api.automodel import AutomodelSpec
from kubetune.api.unsloth import UnslothSpec
from kubetune.planning.references import Finding

PRECISION_DTYPE = {"bf16": "bfloat16", "fp16": "float16"}
"""`hardware.precision` → the `model.dtype` of the same type."""

# Pre-Ampere data-center and consumer GPUs (compute capability < 8.0): no bf16 arithmetic.
# Matched as whole words in the GPU type as written by the user or by GPU feature discovery
# (`nvidia.com/gpu.product`, e.g. "Tesla-T4", "Tesla-V100-SXM2-16GB", "Quadro-RTX-6000").
_NO_BF16 = re.compile(
    r"(^|[^a-z0-9])(t4|v100[a-z0-9]*|p100|p40|p4|p6|k80|k40|m60|m40|titan[ -]?v|titan[ -]?rtx|quadro[ -]?rtx[ -]?\d+|"
    r"rtx[ -]?20\d0[a-z]*|gtx[ -]?\d+[a-z]*)($|[^a-z0-9])"
)


def precision_matches_dtype(precision: str, dtype: str) -> bool:
    """Whether weights loaded as `dtype` can train with `precision` mixed precision."""
    return dtype in ("auto", "float32") or PRECISION_DTYPE.get(precision) == dtype


def supports_bf16(gpu_type: str) -> bool | None:
    """False for GPU types known to lack bf16; None when unknown (not refused on a guess)."""
    return False if _NO_BF16.search(gpu_type.strip().lower()) else None


def gpu_dtype_findings(section: AutomodelSpec | UnslothSpec, gpu_type: str | None) -> list[Finding]:
    """bf16 asked for on a configured GPU type that cannot compute in bf16."""
    if not gpu_type or supports_bf16(gpu_type) is not False:
        return []
    advice = f"the cluster's GPUs ({gpu_type}) have no bf16 support (it needs an Ampere or newer GPU)"
    findings: list[Finding] = []
    if isinstance(section, UnslothSpec):
        if section.hardware.precision == "bf16":
            findings.append(
                Finding(
                    "spec.unsloth.hardware.precision",
                    f"is bf16, but {advice}: set hardware.precision: fp16 (with model.dtype auto, float16 or float32)",
                    "Bf16UnsupportedByGpu",
                )
            )
        if section.model.dtype == "bfloat16":
            findings.append(
                Finding(
                    "spec.unsloth.model.dtype",
                    f"is bfloat16, but {advice}: set model.dtype to auto, float16 or float32 (with "
                    "hardware.precision: fp16)",
                    "Bf16UnsupportedByGpu",
                )
            )
        return findings
    # The automodel trainer has no precision field: on GPUs it always computes in bf16
    # (autocast and FSDP2's mixed-precision policy), so no automodel job can run there.
    findings.append(
        Finding(
            "spec.automodel",
            f"the automodel trainer computes in bf16 on GPUs, but {advice}: use the unsloth backend with "
            "hardware.precision: fp16, or GPUs with bf16",
            "Bf16UnsupportedByGpu",
        )
    )
    training = section.training
    if training.training_type == "distillation" and training.teacher_precision == "bf16":
        findings.append(
            Finding(
                "spec.automodel.training.teacher_precision",
                f"is bf16, but {advice}: set training.teacher_precision: fp16 or fp32",
                "Bf16UnsupportedByGpu",
            )
        )
    return findings
