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

from typing import Any

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


HEAD_CHUNK_ELEMENTS = 2**23
"""Logits computed at once by `linear_cross_entropy_sum`: rows × vocabulary (32 MiB in fp32)."""


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum CE(hidden @ weightᵀ, targets), its gradients computed chunk by chunk in the forward.

    Each chunk's logits live only while that chunk is processed: the forward keeps the
    gradients with respect to `hidden` (rows × hidden size) and `weight` instead of the logits
    (rows × vocabulary), and the backward scales them by the incoming gradient.
    """

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int
    ) -> torch.Tensor:
        want_weight = weight.requires_grad
        compute_weight = weight.detach().to(hidden.dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = hidden[start : start + chunk_rows].detach()
            target = targets[start : start + chunk_rows]
            logits = (rows @ compute_weight.t()).float()
            log_z = torch.logsumexp(logits, dim=-1)
            total += (log_z - logits.gather(1, target[:, None]).squeeze(1)).sum()
            # d CE / d logits = softmax − one-hot, computed in place over the chunk's logits.
            grad_logits = logits.sub_(log_z[:, None]).exp_()
            grad_logits[torch.arange(target.shape[0], device=target.device), target] -= 1.0
            grad_hidden[start : start + chunk_rows] = (grad_logits.to(hidden.dtype) @ compute_weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ rows.float()
        ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else torch.empty(0))
        ctx.want_weight, ctx.weight_dtype = want_weight, weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output.to(grad_hidden.dtype)
        weight_grad = (grad_weight * grad_output).to(ctx.weight_dtype) if ctx.want_weight else None
        return grad_hidden * scale, weight_grad, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, shifted_labels: torch.Tensor) -> torch.Tensor:
    """`cross_entropy_sum(hidden @ weightᵀ, shifted_labels)` without the full logits tensor.

    Only the positions that carry a label get logits at all, a chunk of rows at a time
    (`HEAD_CHUNK_ELEMENTS`); the gradients match the plain loss's (tests/trainer/test_losses.py).
    """
    mask = shifted_labels != IGNORE_INDEX
    rows, targets = hidden[mask], shifted_labels[mask]
    chunk_rows = max(1, HEAD_CHUNK_ELEMENTS // weight.shape[0])
    loss: torch.Tensor = _LinearCrossEntropySum.apply(rows, weight, targets, chunk_rows)
    return loss
