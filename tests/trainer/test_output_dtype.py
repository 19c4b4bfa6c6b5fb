"""Merged and full-weight results keep the base model's dtype; kubetune.json records dtype and size."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from kubetune_trainer.__main__ import run_job
from kubetune_trainer.config import RunOptions
from kubetune_trainer.models import add_lora, base_weights_dtype, load_causal_lm
from kubetune_trainer.outputs import folder_size, model_dtype


@pytest.fixture(scope="module")
def bf16_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("bf16") / "tiny-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    assert model_dtype(str(folder)) == torch.bfloat16
    return folder


def _saved_dtypes(folder: Path) -> set[torch.dtype]:
    dtypes = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as weights:
            dtypes |= {weights.get_tensor(key).dtype for key in weights.keys()}  # noqa: SIM118
    return dtypes


@pytest.mark.parametrize(
    ("training", "expected"),
    [
        ({"finetuning_type": "all_weights"}, torch.bfloat16),
        ({"finetuning_type": "lora_merged"}, torch.bfloat16),
        ({"finetuning_type": "lora"}, torch.float32),  # a peft adapter stays fp32
    ],
    ids=["all-weights", "lora-merged", "adapter"],
)
def test_result_has_the_base_models_dtype(
    training: dict[str, Any],
    expected: torch.dtype,
    bf16_model: Path,
    task_data: Path,
    job_factory: Callable[..., Any],
) -> None:
    job, _ = job_factory(bf16_model, task_data, spec={"training": training, "schedule": {"max_steps": 2}})
    folder = run_job(job, RunOptions(progress_bar=False))
    assert _saved_dtypes(folder) == {expected}
    record = json.loads((folder / "kubetune.json").read_text())
    assert record["dtype"] == str(expected).removeprefix("torch.")
    assert record["size_bytes"] == folder_size(folder) - (folder / "kubetune.json").stat().st_size
    if expected == torch.bfloat16:  # half the bytes of fp32 weights: the size is the model's own
        assert record["size_bytes"] < 1.5 * sum(f.stat().st_size for f in bf16_model.glob("*.safetensors")) + 2e6


@pytest.mark.parametrize(
    ("device", "lora", "expected"),
    [("cuda", True, torch.bfloat16), ("cuda", False, torch.float32), ("cpu", True, torch.float32)],
)
def test_base_weights_dtype(device: str, lora: bool, expected: torch.dtype) -> None:
    assert base_weights_dtype(torch.device(device), lora) == expected


def test_lora_on_a_bf16_base_trains_an_fp32_adapter(tiny_model: Path) -> None:
    """The GPU layout of a LoRA job (bf16 frozen base, bf16 compute), run on CPU: the adapter
    stays fp32 and alone gets gradients, in fp32."""
    model = add_lora(load_causal_lm(str(tiny_model), torch.bfloat16), rank=4, alpha=8, target_modules=None)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    ids = torch.arange(1, 17).reshape(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable.values())
    assert all(p.grad is None for p in frozen)
