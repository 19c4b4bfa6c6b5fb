"""Token-level losses, returned as sums so that the loop can normalise by the global count.

Normalising by the number of label tokens in the whole global batch (all micro batches on
all ranks) is what makes the result independent of how the batch is split: one process
with 4 micro batches and 2 processes with 2 each compute the same gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kubetune_trainer.data import IGNORE_INDEX


def shift(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a label, those labels, and the selection mask."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return logits[:, :-1][mask].float(), targets[mask], mask


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    predicted, targets, _ = shift(logits, labels)
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
    labels: torch.Tensor,
    ratio: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, KL, CE) summed over label tokens.

    loss = ratio × KL(teacher/T ‖ student/T)·T² + (1 − ratio) × CE — logit-pair
    distillation on the completion tokens, the T² keeping gradient scale independent of T.
    """
    student, targets, mask = shift(student_logits, labels)
    teacher = teacher_logits[:, :-1][mask].float()
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1), log_target=True, reduction="sum"
    ) * (t * t)
    ce = F.cross_entropy(student, targets, reduction="sum")
    return ratio * kl + (1.0 - ratio) * ce, kl, ce
