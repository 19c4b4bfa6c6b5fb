"""Packing without leakage, and a step schedule that does not depend on the world size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune_trainer.batching import StepSchedule, as_sequences, collate, pack, validation_batches
from kubetune_trainer.data import IGNORE_INDEX, Example, PromptSample, TextSample, tokenize
from kubetune_trainer.losses import per_token_cross_entropy
from kubetune_trainer.models import load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return load_tokenizer(str(tiny_model))


@pytest.fixture(scope="module")
def examples(tokenizer: Any) -> list[Example]:
    import tiny_models

    samples: list[Any] = [
        PromptSample(f"r{i}", r["prompt"], r["completion"]) for i, r in enumerate(tiny_models.task_rows(12))
    ]
    samples += [TextSample("t", "red fox and blue bird"), TextSample("u", "count 1 2 3 4")]
    return tokenize(samples, tokenizer, 64).examples


def per_sample_losses(model: torch.nn.Module, batch: Any) -> dict[tuple[int, int], float]:
    """Loss summed per (row, example index within the row)."""
    with torch.no_grad():
        logits = model(**batch.model_inputs(torch.device("cpu"))).logits
    token_loss = per_token_cross_entropy(logits, batch.labels)
    segments = batch.segment_ids[:, 1:]
    losses: dict[tuple[int, int], float] = {}
    for row in range(token_loss.shape[0]):
        for segment in segments[row].unique().tolist():
            if segment >= 0:
                losses[(row, segment)] = float(token_loss[row][segments[row] == segment].sum())
    return losses


def test_packed_and_unpacked_per_sample_losses_agree(tiny_model: Path, examples: list[Example], tokenizer: Any) -> None:
    model = load_causal_lm(str(tiny_model)).eval()
    packs = pack(examples, 64, seed=0)
    assert len(packs) < len(examples), "the examples should share sequences"
    assert all(sum(len(e) for e in p) <= 64 for p in packs)
    packed = collate(packs, tokenizer.pad_token_id, packed=True)
    assert packed.attention_mask is None
    packed_losses = per_sample_losses(model, packed)
    for row, group in enumerate(packs):
        for index, example in enumerate(group):
            alone = collate([[example]], tokenizer.pad_token_id, packed=False)
            (alone_loss,) = per_sample_losses(model, alone).values()
            assert packed_losses[(row, index)] == pytest.approx(alone_loss, abs=1e-4, rel=1e-5), example.where
    # And the number of predicted tokens is the same: no label crosses an example boundary.
    unpacked = collate([[e] for e in examples], tokenizer.pad_token_id, packed=False)
    assert packed.num_label_tokens == unpacked.num_label_tokens


def test_padding_never_carries_labels_or_attention(examples: list[Example]) -> None:
    batch = collate([[examples[0]], [examples[1], examples[2]]], pad_id=3, packed=False)
    assert batch.attention_mask is not None
    padded = batch.attention_mask == 0
    assert (batch.labels[padded] == IGNORE_INDEX).all()
    assert (batch.segment_ids[padded] == -1).all()
    assert batch.num_tokens == sum(len(e) for e in examples[:3])


@pytest.mark.parametrize(("world", "micro"), [(1, 1), (1, 4), (2, 2), (4, 1)])
def test_the_global_batch_is_the_same_whatever_the_split(examples: list[Example], world: int, micro: int) -> None:
    sequences = as_sequences(examples, packing=False, max_length=64, seed=0)
    reference = StepSchedule(sequences, 8, 1, 0, 1, seed=5, pad_id=0, packed=False)
    for step in range(3):  # crosses an epoch boundary (14 examples: 1 step per epoch)
        seen = []
        for rank in range(world):
            schedule = StepSchedule(sequences, micro, 8 // (micro * world), rank, world, seed=5, pad_id=0, packed=False)
            assert len(schedule.micro_batches(step)) == 8 // (micro * world)
            for batch in schedule.micro_batches(step):
                seen += batch.input_ids.tolist()
        expected = reference.micro_batches(step)[0].input_ids.tolist()
        strip = lambda rows: sorted(tuple(t for t in r if t != 0) for r in rows)  # noqa: E731
        assert strip(seen) == strip(expected)
    assert reference.global_indices(0) != reference.global_indices(1)  # a new order each epoch


def test_validation_gives_every_rank_the_same_number_of_batches(examples: list[Example]) -> None:
    sequences = [[e] for e in examples[:5]]
    counts = [len(validation_batches(sequences, 2, rank, 3, 0, False)) for rank in range(3)]
    assert counts == [1, 1, 1]
    fillers = validation_batches(sequences[:1], 1, 1, 2, 0, False)
    assert len(fillers) == 1 and fillers[0].num_label_tokens == 0


def test_unpacked_micro_batches_are_grouped_by_length(examples: list[Example]) -> None:
    sequences = as_sequences(examples, packing=False, max_length=64, seed=0)
    schedule = StepSchedule(sequences, 2, 4, 0, 1, seed=5, pad_id=0, packed=False)
    global_batch = [sequences[i] for i in schedule.global_indices(0)]
    lengths = sorted(len(row[0]) for row in global_batch)
    widths = [batch.input_ids.shape[1] for batch in schedule.micro_batches(0)]
    assert widths == [max(lengths[a : a + 2]) for a in range(0, 8, 2)]  # sorted groups: the least padding
    assert sum(b.num_tokens for b in schedule.micro_batches(0)) == sum(lengths)
