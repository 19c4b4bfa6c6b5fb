"""Pipeline parallel: stages keep the full model's names, compute what it computes, and train like it.

The fast tests split the tiny 4-layer Llama in one process and chain the stages by hand; the
slow ones train 10 AdamW steps with 2 gloo processes (pp=2, 3 micro batches per step with 1F1B, 1 with GPipe)
and with 4 (dp2 × pp2, FSDP2 inside the stages) — pipeline_worker.py under torchrun — and in this
process, and compare the loss of every step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pipeline_worker
import pytest
import tiny_models
import torch
from torch import nn

from kubetune_trainer.batching import Batch, collate
from kubetune_trainer.data import Example
from kubetune_trainer.losses import cross_entropy_sum, shift_labels
from kubetune_trainer.models import add_lora, load_causal_lm
from kubetune_trainer.parallel.pipeline import (
    DecoderStage,
    PipelineSplitError,
    layers_per_stage,
    pad_batch,
    split_stage,
)

WORKER = Path(__file__).with_name("pipeline_worker.py")
PAD = 3


@pytest.fixture(scope="module")
def four_layers(models_dir: Path) -> Path:
    return tiny_models.build_model(models_dir / "four-layers", layers=4)


def load(folder: Path, lora: bool) -> nn.Module:
    torch.manual_seed(0)
    model = load_causal_lm(str(folder))
    return add_lora(model, 8, 16, None) if lora else model


def stages(folder: Path, lora: bool, count: int) -> list[DecoderStage]:
    return [split_stage(load(folder, lora), index, count) for index in range(count)]


def batch(packed: bool) -> Batch:
    torch.manual_seed(1)
    rows = [
        [Example(torch.randint(4, 300, (n,)).tolist(), torch.randint(4, 300, (n,)).tolist()) for n in lengths]
        for lengths in (([9, 12, 5], [20]) if packed else ([17], [11]))
    ]
    return collate(rows, PAD, packed)


def chained(parts: list[DecoderStage], b: Batch) -> torch.Tensor:
    hidden = b.input_ids
    for stage in parts:
        hidden = stage(hidden, b.position_ids, b.attention_mask)
    return hidden


def test_layers_are_split_evenly_with_the_remainder_first() -> None:
    assert layers_per_stage(4, 2) == [2, 2]
    assert layers_per_stage(7, 3) == [3, 2, 2]
    with pytest.raises(PipelineSplitError, match="exceeds the model's 2 decoder layers"):
        layers_per_stage(2, 3)


@pytest.mark.parametrize("lora", [False, True])
def test_stage_state_dicts_partition_the_full_model(four_layers: Path, lora: bool) -> None:
    full = set(load(four_layers, lora).state_dict())
    parts = stages(four_layers, lora, 3)
    keys = [set(stage.state_dict()) for stage in parts]
    assert all(k <= full for k in keys)
    assert set.union(*keys) == full
    assert sum(len(k) for k in keys) == len(full)  # no parameter lives on two stages
    prefix = "base_model.model." if lora else ""
    assert any(k.startswith(f"{prefix}model.embed_tokens.") for k in keys[0])
    assert not any("embed_tokens" in k or "lm_head" in k for k in keys[1])
    assert {k for k in keys[2] if "lm_head" in k or k.startswith(f"{prefix}model.norm")}
    layer_of = [sorted({int(k.split("layers.")[1].split(".")[0]) for k in ks if "layers." in k}) for ks in keys]
    assert layer_of == [[0, 1], [2], [3]]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("lora", [False, True])
def test_chained_stages_compute_the_full_models_logits(four_layers: Path, lora: bool, packed: bool) -> None:
    b = batch(packed)
    with torch.no_grad():
        expected = load(four_layers, lora)(**b.model_inputs(torch.device("cpu"))).logits
        got = chained(stages(four_layers, lora, 2), b)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) < 1e-5


@pytest.mark.parametrize("packed", [False, True])
def test_padding_leaves_the_loss_unchanged(four_layers: Path, packed: bool) -> None:
    b = batch(packed)
    wide = pad_batch(b, b.input_ids.shape[1] + 7, 4, PAD)
    assert wide.input_ids.shape == (4, b.input_ids.shape[1] + 7)
    assert (wide.num_tokens, wide.num_label_tokens) == (b.num_tokens, b.num_label_tokens)
    model = load(four_layers, False)
    with torch.no_grad():
        narrow_loss = cross_entropy_sum(model(**b.model_inputs(torch.device("cpu"))).logits, shift_labels(b.labels))
        wide_loss = cross_entropy_sum(model(**wide.model_inputs(torch.device("cpu"))).logits, shift_labels(wide.labels))
    assert abs(float(narrow_loss) - float(wide_loss)) < 1e-4
    with pytest.raises(ValueError, match="does not fit the pipeline's 2 × 5"):
        pad_batch(b, 5, 2, PAD)


def test_a_tied_embedding_lives_on_the_first_and_last_stage(models_dir: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        tie_word_embeddings=True,
    )  # fmt: skip
    parts = [split_stage(LlamaForCausalLM(config), index, 3) for index in range(3)]
    first, middle, last = (part.tied_weight for part in parts)
    assert first is parts[0].decoder.embed_tokens.weight and last is parts[2].lm_head.weight
    assert middle is None
    assert all(p is not last for p in parts[2].norm_parameters())  # the norm counts the shared weight once
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(parts[0].state_dict()) | set(parts[2].state_dict())
    frozen = LlamaForCausalLM(config).requires_grad_(False)  # LoRA: each end keeps its frozen copy
    assert split_stage(frozen, 0, 2).tied_weight is None


def test_a_model_without_the_decoder_layout_is_refused() -> None:
    with pytest.raises(PipelineSplitError, match="use pipeline_parallel_size 1"):
        split_stage(nn.Sequential(nn.Linear(2, 2)), 0, 2)


# --------------------------------------------------------------------------- two processes


def launch(folder: Path, out: Path, processes: int) -> dict[str, Any]:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    done = subprocess.run(
        [*torchrun, str(WORKER), str(folder), str(out)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def reference(folder: Path, cases: list[tuple[str, bool, int, bool]]) -> dict[str, Any]:
    """The same training in this process, without any parallelism."""
    return {pipeline_worker.case_name(*case): pipeline_worker.run_single(folder, *case) for case in cases}


def check_same_training(one: dict[str, Any], many: dict[str, Any]) -> None:
    assert len(one["losses"]) == len(many["losses"]) == 10
    assert max(abs(a - b) for a, b in zip(one["losses"], many["losses"], strict=True)) < 1e-4, (one, many)
    assert one["losses"][-1] < one["losses"][0] - 0.1  # it trained
    assert many["label_tokens"] == many["expected_label_tokens"]  # extras: summed once per micro batch
    # Validation: loss sums of ~100 label tokens, forward only.
    assert max(abs(a - b) for a, b in zip(one["validation"], many["validation"], strict=True)) < 1e-3
    full = set(many["full_keys"])
    assert full == set(one["full_keys"])
    stage_keys = [set(keys) for keys in many["stage_keys"]]
    assert all(keys <= full for keys in stage_keys)
    assert set.union(*stage_keys) == full


@pytest.fixture(scope="module")
def pp2(four_layers: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    """1 process (this one) and a 2-stage pipeline (all cases in one torchrun)."""
    two = launch(four_layers, tmp_path_factory.mktemp("pp2") / "two.json", 2)
    return reference(four_layers, pipeline_worker.CASES), two


@pytest.mark.slow
@pytest.mark.parametrize("case", [pipeline_worker.case_name(*case) for case in pipeline_worker.CASES])
def test_two_stages_train_like_one_process(pp2: tuple[dict[str, Any], dict[str, Any]], case: str) -> None:
    one, two = pp2[0][case], pp2[1][case]
    assert two["schedule"] == ("ScheduleGPipe" if case.endswith("-1mb") else "Schedule1F1B")
    check_same_training(one, two)


@pytest.mark.slow
def test_fsdp2_inside_the_stages_dp2_pp2(four_layers: Path, tmp_path: Path) -> None:
    """4 processes: each stage sharded by FSDP2 over its data-parallel pair; LoRA, and full weights with a tied head."""
    four = launch(four_layers, tmp_path / "four.json", 4)
    one = reference(four_layers, pipeline_worker.FSDP_CASES)
    for case in one:
        check_same_training(one[case], four[case])
