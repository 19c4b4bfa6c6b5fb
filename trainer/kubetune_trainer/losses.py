"""Token-level losses, returned as sums so that the loop can normalise by the global count.

Normalising by the number of label tokens in the whole global batch (all micro batches on
all ranks) is what makes the result independent of how the batch is split: one process
with 4 micro batches and 2 processes with 2 each compute the same gradient.

Labels are shifted once, before the model runs (`shift_labels`): position t carries the
label of token t + 1. The losses then compare logits and labels position by position, so
they work unchanged on a slice of the sequence (context parallel) or on the last stage of
a pipeline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kubetune_trainer.data import IGNORE_INDEX


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits: position t gets labels[t + 1]; the last position none."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def labelled(logits: torch.Tensor, shifted_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (fp32) at the positions that carry a label, those labels, and the selection mask."""
    mask = shifted_labels != IGNORE_INDEX
    return logits[mask].float(), shifted_labels[mask], mask


def cross_entropy_sum(logits: torch.Tensor, shifted_labels: torch.Tensor) -> torch.Tensor:
    predicted, targets, _ = labelled(logits, shifted_labels)
    return F.cross_entropy(predicted, targets, reduction="sum")


def per_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE of every position (0 where there is no label), shape (batch, seq-1): for tests and tools."""
    targets = labels[:, 1:]
    flat = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1).clamp(min=0),
        reduction="none",
    ).view(targets.shape)
    return flat * (targets != IGNORE_INDEX)


def distillation_sums(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    shifted_labels: torch.Tensor,
    ratio: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, KL, CE) summed over label tokens.

    loss = ratio × KL(teacher/T ‖ student/T)·T² + (1 − ratio) × CE — logit-pair
    distillation on the completion tokens, the T² keeping gradient scale independent of T.
    """
    student, targets, mask = labelled(student_logits, shifted_labels)
    teacher = teacher_logits[mask].float()
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1), log_target=True, reduction="sum"
    ) * (t * t)
    ce = F.cross_entropy(student, targets, reduction="sum")
    return ratio * kl + (1.0 - ratio) * ce, kl, ce
