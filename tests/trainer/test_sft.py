"""SFT end to end on a tiny model: each finetuning type learns, and its output reloads with plain HF."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from kubetune_trainer.__main__ import run_job
from kubetune_trainer.config import RunOptions
from kubetune_trainer.outputs import read_result
from kubetune_trainer.progress import read_events

FINETUNING_TYPES = ["lora", "lora_merged", "all_weights"]
SPEC = {"schedule": {"epochs": 2}, "batch": {"sequence_packing": False}}


def step_losses(progress: Path) -> list[float]:
    return [e.loss for e in read_events(progress) if e.kind == "step" and e.loss is not None]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, task_data: Path) -> dict[str, Path]:
    """One run per finetuning type (same seed and data), trained once for the module."""
    from conftest import make_job

    root = tmp_path_factory.mktemp("sft")
    results = {}
    for kind in FINETUNING_TYPES:
        spec = {**SPEC, "training": {"finetuning_type": kind}}
        if kind == "all_weights":
            spec["optimizer"] = {"learning_rate": 0.003}
        job, _ = make_job(root / kind, tiny_model, task_data, spec)
        results[kind] = run_job(job, RunOptions(progress_bar=False, progress_file=str(root / f"{kind}.jsonl")))
    return results


@pytest.mark.parametrize("kind", FINETUNING_TYPES)
def test_loss_falls_and_result_is_complete(trained: dict[str, Path], kind: str) -> None:
    folder = trained[kind]
    losses = step_losses(folder.parent.parent / f"{kind}.jsonl")
    assert len(losses) == 36  # 144 training rows (10% held out) // 8 × 2 epochs
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.3, (first, last)
    info = read_result(folder)
    assert info["finetuning_type"] == kind
    assert info["metrics"]["steps"] == 36 and info["metrics"]["val_loss"] is not None
    files = {p.name for p in folder.iterdir()}
    if kind == "lora":
        assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= files
        assert info["output"]["type"] == "adapter"
    else:
        assert {"model.safetensors", "config.json", "tokenizer.json"} <= files
        assert "adapter_config.json" not in files and info["output"]["type"] == "model"


def _loss(model: torch.nn.Module, tiny_model: Path, task_data: Path) -> float:
    from kubetune_trainer.batching import collate
    from kubetune_trainer.data import load_splits
    from kubetune_trainer.losses import cross_entropy_sum, shift_labels
    from kubetune_trainer.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    splits = load_splits(str(task_data), None, tokenizer, 64, None, seed=1)
    batch = collate([[e] for e in splits.train[:32]], tokenizer.pad_token_id, packed=False)
    with torch.no_grad():
        logits = model(**batch.model_inputs(torch.device("cpu"))).logits
    return float(cross_entropy_sum(logits, shift_labels(batch.labels))) / batch.num_label_tokens


@pytest.mark.parametrize("kind", FINETUNING_TYPES)
def test_result_reloads_with_plain_transformers_and_peft(
    trained: dict[str, Path], tiny_model: Path, task_data: Path, kind: str
) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_model, local_files_only=True).eval()
    base_loss = _loss(base, tiny_model, task_data)
    if kind == "lora":
        model: Any = PeftModel.from_pretrained(base, trained[kind]).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(trained[kind], local_files_only=True).eval()
    assert _loss(model, tiny_model, task_data) < base_loss - 0.3


def test_merged_model_equals_base_plus_adapter(trained: dict[str, Path], tiny_model: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_model, local_files_only=True)
    adapted = PeftModel.from_pretrained(base, trained["lora"]).eval()
    merged = AutoModelForCausalLM.from_pretrained(trained["lora_merged"], local_files_only=True).eval()
    ids = torch.randint(4, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        untrained = AutoModelForCausalLM.from_pretrained(tiny_model, local_files_only=True)(input_ids=ids).logits
    assert (got - untrained).abs().max() > 0.1  # the adapter changed something
    assert (got - expected).abs().max() < 1e-4


def test_finished_job_is_not_trained_again(
    trained: dict[str, Path], job_factory: Callable[..., Any], tiny_model: Path, task_data: Path
) -> None:
    job, _ = job_factory(tiny_model, task_data, spec={**SPEC, "training": {"finetuning_type": "lora"}})
    folder = trained["lora"]
    job = job.model_copy(update={"paths": job.paths.model_copy(update={"output": str(folder.parent)})})
    before = (folder / "kubetune.json").stat().st_mtime_ns
    assert run_job(job, RunOptions(progress_bar=False)) == folder
    assert (folder / "kubetune.json").stat().st_mtime_ns == before


@pytest.mark.parametrize("packing", [True, False])
def test_packing_trains_with_fewer_sequences(
    job_factory: Callable[..., Any], tiny_model: Path, task_data: Path, tmp_path: Path, packing: bool
) -> None:
    job, _ = job_factory(
        tiny_model,
        task_data,
        spec={"batch": {"sequence_packing": packing, "global_batch_size": 4, "micro_batch_size": 2}},
    )
    progress = tmp_path / "p.jsonl"
    run_job(job, RunOptions(progress_bar=False, progress_file=str(progress)))
    losses = step_losses(progress)
    # 144 examples of ~10-16 tokens: packed into 64-token sequences they fill about 5× fewer rows.
    assert (len(losses) < 15) if packing else (len(losses) == 36)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
