"""From tokenized examples to the micro batches each data-parallel rank runs.

Backend-neutral. The schedule is a pure function of (seed, step): epoch `e` visits the
sequences in the order of a permutation seeded with `seed + e`, global step `s` takes the
next `global_batch_size` of them, and data-parallel rank `r` takes its micro batches from
that global batch. So the data position of a resumed run is just its step number, and the
global batch is the same whatever the world size. Unpacked, each global batch is cut into
micro batches of similar lengths (`StepSchedule.micro_batches`) to cut padding.

Packing (`sequence_packing`): examples are packed first-fit into sequences of at most
`max_seq_length` tokens. Positions restart at 0 for each example and no attention mask is
passed, so transformers builds a block-diagonal causal mask from the position ids (no
attention across examples); the first token of each example carries no label, so no
example is trained to predict the next one's first token.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kubetune_trainer.data import IGNORE_INDEX, Example

GROUP_BY_LENGTH = True
"""Unpacked micro batches of similar lengths (False: in schedule order, as before; for tests)."""

PackedSequence = list[Example]
"""One row of a batch: a single example, or several packed together."""


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    """None for packed batches: the block mask comes from the position ids."""
    segment_ids: torch.Tensor
    """Index of the example each token belongs to (within the row), -1 for padding."""
    num_tokens: int
    """Real (non-padding) tokens."""
    num_label_tokens: int
    """Tokens that are predicted with loss (labels shifted by one)."""

    def model_inputs(self, device: torch.device) -> dict[str, Any]:
        return model_inputs(self.input_ids, self.position_ids, self.attention_mask, device)


def model_inputs(
    input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None, device: torch.device
) -> dict[str, Any]:
    """The keyword arguments of a causal LM's forward for these tensors, on `device`."""
    # No KV cache: with one, transformers skips the packed-sequence (block-diagonal) mask.
    inputs: dict[str, Any] = {
        "input_ids": input_ids.to(device),
        "position_ids": position_ids.to(device),
        "use_cache": False,
    }
    if attention_mask is not None:
        inputs["attention_mask"] = attention_mask.to(device)
    return inputs


def pack(examples: Sequence[Example], max_length: int, seed: int) -> list[PackedSequence]:
    """First-fit packing of shuffled examples into sequences of at most max_length tokens."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    bins: list[PackedSequence] = []
    room: list[int] = []
    for index in order:
        example = examples[index]
        target = next((b for b, free in enumerate(room) if free >= len(example)), None)
        if target is None:
            bins.append([example])
            room.append(max_length - len(example))
        else:
            bins[target].append(example)
            room[target] -= len(example)
    return bins


def as_sequences(examples: Sequence[Example], packing: bool, max_length: int, seed: int) -> list[PackedSequence]:
    return pack(examples, max_length, seed) if packing else [[example] for example in examples]


def collate(rows: Sequence[PackedSequence], pad_id: int, packed: bool, weight: bool = True) -> Batch:
    """Right-pad rows to the longest; `weight=False` masks every label (a filler batch)."""
    width = max(sum(len(e) for e in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = torch.full(shape, -1, dtype=torch.long)
    attention_mask = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for s, example in enumerate(row):
            end = start + len(example)
            input_ids[r, start:end] = torch.tensor(example.input_ids)
            if weight:
                labels[r, start:end] = torch.tensor(example.labels)
                labels[r, start] = IGNORE_INDEX  # nothing precedes it within its own example
            position_ids[r, start:end] = torch.arange(len(example))
            segment_ids[r, start:end] = s
            attention_mask[r, start:end] = 1
            start = end
        # Padding gets positions 0.. as well: packed, it becomes its own block; unpacked it is masked.
        position_ids[r, start:] = torch.arange(width - start)
    return Batch(
        input_ids=input_ids,
        labels=labels,
        position_ids=position_ids,
        attention_mask=None if packed else attention_mask,
        segment_ids=segment_ids,
        num_tokens=int(attention_mask.sum()),
        num_label_tokens=int((labels[:, 1:] != IGNORE_INDEX).sum()),
    )


class StepSchedule:
    """Which sequences each rank trains on at each optimizer step (see the module docstring)."""

    def __init__(
        self,
        sequences: Sequence[PackedSequence],
        micro_batch_size: int,
        accumulation: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        pad_id: int,
        packed: bool,
    ) -> None:
        """`accumulation` is the layout's gradient_accumulation_steps (planning/layout.py divides
        the global batch); the global batch is micro × accumulation × data-parallel size."""
        self.sequences = sequences
        self.global_batch_size = micro_batch_size * accumulation * dp_size
        self.micro_batch_size = micro_batch_size
        self.accumulation = accumulation
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.pad_id, self.packed = seed, pad_id, packed
        self.steps_per_epoch = len(sequences) // self.global_batch_size
        self._epoch_order: tuple[int, list[int]] | None = None

    def order(self, epoch: int) -> list[int]:
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = list(range(len(self.sequences)))
            random.Random(self.seed + epoch).shuffle(order)
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def global_indices(self, step: int) -> list[int]:
        """The sequences of global step `step` (0-based), on all ranks together."""
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch_size
        return self.order(epoch)[start : start + self.global_batch_size]

    def micro_batches(self, step: int) -> list[Batch]:
        """This rank's micro batches of step `step`.

        Unpacked, the global batch is grouped by length first: sorted by (length, index) and
        cut into micro batches of similar lengths, dealt to the ranks in turn (rank r gets
        micro batches r, r + dp, ...: each rank a mix of short and long ones). The global
        batch, and with it the step's loss, stays the same; the padding shrinks.
        """
        indices = self.global_indices(step)
        micro = self.micro_batch_size
        if not self.packed and GROUP_BY_LENGTH:
            indices = sorted(indices, key=lambda i: (sum(len(e) for e in self.sequences[i]), i))
            groups = [indices[a : a + micro] for a in range(0, len(indices), micro)]
            mine_groups = groups[self.dp_rank :: self.dp_size]
        else:
            per_rank = micro * self.accumulation
            mine = indices[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
            mine_groups = [mine[a : a + micro] for a in range(0, per_rank, micro)]
        return [collate([self.sequences[i] for i in group], self.pad_id, self.packed) for group in mine_groups]


def validation_batches(
    sequences: Sequence[PackedSequence], micro_batch_size: int, dp_rank: int, dp_size: int, pad_id: int, packed: bool
) -> list[Batch]:
    """This rank's share of the validation set; every rank gets the same number of batches.

    Sharded models run collectives in every forward, so a rank with fewer sequences runs
    filler batches whose labels are all masked (they add nothing to the loss).
    """
    per_rank = -(-len(sequences) // dp_size)
    mine = list(sequences[dp_rank::dp_size])
    batches = [collate(mine[i : i + micro_batch_size], pad_id, packed) for i in range(0, len(mine), micro_batch_size)]
    needed = -(-per_rank // micro_batch_size) if per_rank else 0
    while len(batches) < needed:
        batches.append(collate([sequences[0]], pad_id, packed, weight=False))
    return batches
