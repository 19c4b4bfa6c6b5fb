"""The fast step path gives today's results: the chunked LM-head loss equals the plain loss,
and a whole SFT run (chunked loss, fused AdamW, length-grouped micro batches) has the
per-step losses of the plain path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kubetune_trainer import batching, losses
from kubetune_trainer.__main__ import run_job
from kubetune_trainer.backends.automodel import engine, steps
from kubetune_trainer.config import RunOptions
from kubetune_trainer.data import IGNORE_INDEX
from kubetune_trainer.progress import read_events


@pytest.mark.parametrize("train_head", [False, True])
def test_chunked_linear_cross_entropy_equals_the_plain_loss(monkeypatch: pytest.MonkeyPatch, train_head: bool) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(3, 17, 32, requires_grad=True)
    weight = torch.randn(1000, 32, requires_grad=train_head)
    labels = torch.randint(0, 1000, (3, 17))
    labels[0, :5] = IGNORE_INDEX
    labels[2, 10:] = IGNORE_INDEX
    monkeypatch.setattr(losses, "HEAD_CHUNK_ELEMENTS", 7 * 1000)  # 7 rows a chunk: several chunks, one partial

    chunked = losses.linear_cross_entropy_sum(hidden, weight, labels)
    (chunked * 0.25).backward()
    chunked_grads = [hidden.grad.clone()] + ([weight.grad.clone()] if train_head else [])
    hidden.grad, weight.grad = None, None
    plain = losses.cross_entropy_sum(hidden @ weight.t(), labels)
    (plain * 0.25).backward()
    plain_grads = [hidden.grad] + ([weight.grad] if train_head else [])

    assert abs(chunked.item() - plain.item()) <= 1e-5 * abs(plain.item())
    for got, want in zip(chunked_grads, plain_grads, strict=True):
        assert want is not None
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(chunked_grads[0][0, :5]) == 0  # unlabelled positions get no gradient


def test_no_labels_give_zero_loss_and_zero_gradient() -> None:
    hidden = torch.randn(2, 4, 8, requires_grad=True)
    loss = losses.linear_cross_entropy_sum(hidden, torch.randn(50, 8), torch.full((2, 4), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad is not None and torch.count_nonzero(hidden.grad) == 0


def _step_losses(tmp_path: Path, name: str, tiny_model: Path, task_data: Path, kind: str) -> list[float]:
    from conftest import make_job

    spec = {"schedule": {"max_steps": 6}, "batch": {"sequence_packing": False}, "training": {"finetuning_type": kind}}
    job, _ = make_job(tmp_path / name, tiny_model, task_data, spec)
    progress = tmp_path / f"{name}.jsonl"
    run_job(job, RunOptions(progress_bar=False, progress_file=str(progress), checkpoint_every=10**6))
    return [e.loss for e in read_events(progress) if e.kind == "step" and e.loss is not None]


@pytest.mark.parametrize("kind", ["lora", "all_weights"])
def test_fast_step_path_keeps_the_per_step_losses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model: Path, task_data: Path, kind: str
) -> None:
    fast = _step_losses(tmp_path, "fast", tiny_model, task_data, kind)
    monkeypatch.setattr(steps, "PLAIN_HEAD_MODELS", frozenset())  # full logits, then the loss
    monkeypatch.setattr(engine, "FUSED_ADAMW", False)  # torch's default AdamW
    monkeypatch.setattr(batching, "GROUP_BY_LENGTH", False)  # micro batches in schedule order
    plain = _step_losses(tmp_path, "plain", tiny_model, task_data, kind)
    assert len(fast) == len(plain) == 6
    assert max(abs(a - b) for a, b in zip(fast, plain, strict=True)) <= 1e-4, (fast, plain)


def test_the_chunked_head_is_used_for_a_whole_model(tiny_model: Path) -> None:
    from kubetune_trainer.distributed import ParallelModel
    from kubetune_trainer.models import add_lora, load_causal_lm
    from kubetune_trainer.parallel.mesh import ParallelDims

    model = add_lora(load_causal_lm(str(tiny_model), torch.float32), 4, 8, None)
    assert steps.output_head(ParallelModel(model, [], 1), ParallelDims()) is not None
    assert steps.output_head(ParallelModel(model, [], 2), ParallelDims(dp=2)) is None  # FSDP2: logits path
    assert steps.output_head(ParallelModel(model, [], 1), ParallelDims(tp=2)) is None
