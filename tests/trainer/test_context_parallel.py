"""Context parallel: load-balanced sharding, the attention mask, and 2 gloo processes = 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from kubetune_trainer.batching import Batch, collate
from kubetune_trainer.data import IGNORE_INDEX, Example
from kubetune_trainer.losses import cross_entropy_sum, per_token_cross_entropy
from kubetune_trainer.models import load_causal_lm
from kubetune_trainer.parallel.context import (
    ContextParallel,
    check_supported,
    context_parallel_attention,
    gathered_indices,
    padded_width,
    shard_batch,
    shard_indices,
)

WORKER = Path(__file__).with_name("cp_worker.py")


def rows(lengths: list[list[int]]) -> list[list[Example]]:
    """Rows of examples with these lengths; labels on every token but the first two."""
    out, token = [], 4
    for row in lengths:
        examples = []
        for length in row:
            ids = list(range(token, token + length))
            token += length
            examples.append(Example(ids, [IGNORE_INDEX, IGNORE_INDEX, *ids[2:]]))
        out.append(examples)
    return out


PACKED = collate(rows([[5, 7, 3], [9, 4], [6]]), pad_id=3, packed=True)
UNPACKED = collate(rows([[13], [6], [9]]), pad_id=3, packed=False)


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_shards_cover_every_token_once_with_balanced_causal_work(cp: int) -> None:
    width = padded_width(21, cp)
    assert width % (2 * cp) == 0 and 21 <= width < 21 + 2 * cp
    shards = [shard_indices(width, rank, cp) for rank in range(cp)]
    assert sorted(torch.cat(shards).tolist()) == list(range(width))
    assert torch.equal(gathered_indices(width, cp), torch.cat(shards))
    # Query t sees t + 1 keys under the causal mask: every rank gets the same total.
    assert len({int((shard + 1).sum()) for shard in shards}) == 1


def global_order(batch: Batch, cp: int, field: str) -> torch.Tensor:
    """A per-token field of all shards of `batch`, put back in global token order."""
    shards = [shard_batch(batch, rank, cp) for rank in range(cp)]
    width = padded_width(batch.input_ids.shape[1], cp)
    values = torch.cat([getattr(s, field) for s in shards], dim=1)
    out = torch.empty_like(values)
    out[:, gathered_indices(width, cp)] = values
    return out


@pytest.mark.parametrize("batch", [PACKED, UNPACKED], ids=["packed", "unpacked"])
@pytest.mark.parametrize("cp", [2, 3])
def test_labels_are_shifted_before_sharding(batch: Batch, cp: int) -> None:
    width = batch.input_ids.shape[1]
    labels = global_order(batch, cp, "labels")
    assert torch.equal(labels[:, : width - 1], batch.labels[:, 1:])
    assert (labels[:, width - 1 :] == IGNORE_INDEX).all()  # the last token and the padding
    assert torch.equal(global_order(batch, cp, "input_ids")[:, :width], batch.input_ids)
    assert torch.equal(global_order(batch, cp, "position_ids")[:, :width], batch.position_ids)
    assert sum(shard_batch(batch, rank, cp).num_label_tokens for rank in range(cp)) == batch.num_label_tokens


def transformers_mask(batch: Batch) -> torch.Tensor:
    """The (rows, 1, width, width) mask transformers builds for SDPA from the batch's model inputs."""
    from transformers import LlamaConfig
    from transformers.masking_utils import create_causal_mask

    config = LlamaConfig(hidden_size=8, num_attention_heads=1, num_hidden_layers=1)
    config._attn_implementation = "sdpa"
    mask = create_causal_mask(
        config=config,
        inputs_embeds=torch.zeros(*batch.input_ids.shape, 8),
        attention_mask=batch.attention_mask,
        past_key_values=None,
        position_ids=batch.position_ids,
        allow_is_causal_skip=False,
    )
    assert isinstance(mask, torch.Tensor)
    return mask


@pytest.mark.parametrize("batch", [PACKED, UNPACKED], ids=["packed", "unpacked"])
@pytest.mark.parametrize("cp", [2, 3])
def test_mask_matches_what_transformers_builds_for_the_whole_sequence(batch: Batch, cp: int) -> None:
    width = batch.input_ids.shape[1]
    keys = gathered_indices(padded_width(width, cp), cp)
    full = torch.zeros(batch.input_ids.shape[0], padded_width(width, cp), padded_width(width, cp), dtype=torch.bool)
    for rank in range(cp):
        mask = shard_batch(batch, rank, cp).attention_mask
        assert mask is not None and mask.dtype == torch.bool
        queries = shard_indices(padded_width(width, cp), rank, cp)
        full[:, queries[:, None], keys[None, :]] = mask[:, 0]
    expected = transformers_mask(batch)[:, 0]
    real = batch.segment_ids >= 0
    for row in range(batch.input_ids.shape[0]):
        # Real queries see exactly what they see in one process; nobody sees the padding.
        assert torch.equal(full[row, :width, :width][real[row]], expected[row][real[row]])
        assert not full[row, :width][real[row]][:, width:].any()
        assert full[row].any(dim=-1).all()  # every query has a key: no NaN from SDPA


def test_cp_one_leaves_the_model_and_the_loss_as_they_are(tiny_model: Path) -> None:
    model = load_causal_lm(str(tiny_model)).eval()
    alone = ContextParallel(group=None)
    assert alone.apply(model) is model
    assert model.config._attn_implementation == "sdpa"  # type: ignore[union-attr]
    for batch in (PACKED, UNPACKED):
        shard = alone.shard(batch)
        assert torch.equal(shard.input_ids, batch.input_ids) and shard.num_label_tokens == batch.num_label_tokens
        cpu = torch.device("cpu")
        assert shard.model_inputs(cpu).keys() == batch.model_inputs(cpu).keys()
        with torch.no_grad():
            logits = model(**shard.model_inputs(cpu)).logits
        plain = per_token_cross_entropy(logits, batch.labels).sum()
        assert torch.allclose(cross_entropy_sum(logits, shard.labels), plain)


def test_attention_without_the_cp_mask_says_what_to_feed() -> None:
    query = torch.zeros(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match=r"cp group|shard\.model_inputs"):
        context_parallel_attention(nn.Module(), query, query, query, None)


def test_sliding_window_models_are_refused() -> None:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    class Holder(nn.Module):
        def __init__(self, config: object) -> None:
            super().__init__()
            self.config = config

    for config in (LlamaConfig(), Qwen2Config(), Qwen3Config(), MistralConfig(sliding_window=None)):
        check_supported(Holder(config))  # full attention in every layer
    with pytest.raises(ValueError, match=r"sliding-window.*context_parallel_size: 1"):
        check_supported(Holder(MistralConfig(sliding_window=8)))
    with pytest.raises(ValueError, match="sliding-window"):
        check_supported(Holder(Qwen2Config(use_sliding_window=True, sliding_window=8, max_window_layers=1)))
    with pytest.raises(ValueError, match="needs a transformers model"):
        check_supported(nn.Linear(2, 2))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "all_weights"])
def test_two_processes_match_one(tiny_model: Path, tmp_path: Path, kind: str) -> None:
    """cp=2 on gloo: each process holds half of every sequence; per-step loss = 1 process."""
    out = tmp_path / "losses.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    run = subprocess.run(
        [*command, str(WORKER), str(tiny_model), kind, str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(out.read_text(encoding="utf-8"))
    for layout in ("unpacked", "packed"):
        one, two = results["reference"][layout], results["cp"][layout]
        assert len(one) == len(two) == 10
        assert max(abs(a - b) for a, b in zip(one, two, strict=True)) < 1e-4, (layout, one, two)
        assert one[-1] < one[0] - 0.3, (layout, one)  # it trains: the comparison is not of noise
