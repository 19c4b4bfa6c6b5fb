"""`hardware.gpus` (unsloth): a selection of devices, not a reservation.

Under `kubetune run` the indices become CUDA_VISIBLE_DEVICES (the trainer sets it). In a
cluster the node's device plugin decides which GPUs a pod gets and numbers them from 0
inside the container, so the indices cannot apply there: the operator requests a count
and tells the trainer (KUBETUNE_GPUS_ASSIGNED_BY_NODE) to leave the selection alone.
Unsloth trains in one process on one GPU, so it never requests more than one.
"""

from __future__ import annotations

from kubetune.api.unsloth import UnslothSpec
from kubetune.planning.references import Finding

GPUS_ASSIGNED_BY_NODE = "KUBETUNE_GPUS_ASSIGNED_BY_NODE"
"""Set to "1" in trainer pods: the node chose the GPUs, `hardware.gpus` indices do not apply."""

UNSLOTH_GPUS = 1
"""GPUs an unsloth job uses (and so requests): one process on one GPU."""


def gpu_selection_warnings(section: UnslothSpec) -> list[Finding]:
    gpus = section.hardware.gpus
    if gpus is None:
        return []
    indices = gpus.split(",")
    path = "spec.unsloth.hardware.gpus"
    warnings = [
        Finding(
            path,
            f"{gpus!r} selects GPUs for `kubetune run` (CUDA_VISIBLE_DEVICES); in a cluster the node assigns "
            f"the pod's GPU, so the job requests {UNSLOTH_GPUS} GPU and the indices are not applied",
            "GpuIndicesAssignedByNode",
        )
    ]
    if len(indices) > UNSLOTH_GPUS:
        warnings.append(
            Finding(
                path,
                f"{gpus!r} lists {len(indices)} GPUs, but unsloth trains in one process on one GPU: only GPU "
                f"{indices[0]} is used and only one is requested; use the automodel backend for several GPUs",
                "UnslothUsesOneGpu",
            )
        )
    return warnings
