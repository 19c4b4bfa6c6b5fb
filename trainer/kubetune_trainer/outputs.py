"""Write the job's result so that plain transformers/peft load it.

Backend-neutral. The result goes to `<output>/<output name>/`:

- `adapter`: a PEFT adapter folder (`adapter_model.safetensors`, `adapter_config.json`),
  plus the tokenizer; load with `PeftModel.from_pretrained(base, folder)`.
- `model` (merged LoRA or full weights): safetensors weights, config, tokenizer; load
  with `AutoModelForCausalLM.from_pretrained(folder)`.

Merged and full-weight results are saved in the base model's own dtype (its config's
`dtype`: a bf16 model gives a bf16 result, not the fp32 the weights trained in); adapters
keep peft's fp32. Both get `kubetune.json` (base model, job, training settings, final
metrics, the result's `dtype` and `size_bytes`). The folder
is written as `.<name>.partial` and renamed when complete, so a result folder that exists
is a finished result: a restarted job that finds it has nothing left to do.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kubetune.planning.resolved import ResolvedJob
from kubetune_trainer import __version__
from kubetune_trainer.models import add_lora, load_causal_lm

RESULT_FILE = "kubetune.json"


def result_path(output_root: str | Path, name: str) -> Path:
    return Path(output_root) / name


def finished(output_root: str | Path, name: str) -> bool:
    return (result_path(output_root, name) / RESULT_FILE).is_file()


def build_result_model(
    base_path: str,
    trained: dict[str, torch.Tensor],
    lora: dict[str, Any] | None,
    merge: bool,
) -> nn.Module:
    """A fresh CPU model holding the trained weights: a PeftModel, or plain weights.

    `trained` is the full (unsharded) state dict of the trained parameters, keyed as the
    training model names them: LoRA weights only for LoRA runs, everything for full runs.
    """
    model = load_causal_lm(base_path, torch.float32)
    own_dtype = model_dtype(base_path)
    if lora is None:
        _, unexpected = model.load_state_dict(trained, strict=False)
        if unexpected:
            raise RuntimeError(f"trained weights do not fit the base model: unexpected {unexpected[:5]}")
        return model.to(own_dtype)
    peft_model = add_lora(model, lora["rank"], lora["alpha"], lora["target_modules"])
    _, unexpected = peft_model.load_state_dict(trained, strict=False)
    if unexpected:
        raise RuntimeError(f"trained adapter does not fit the base model: unexpected {unexpected[:5]}")
    if merge:
        merged: nn.Module = peft_model.merge_and_unload()  # type: ignore[operator]  # merged in fp32, then cast once
        return merged.to(own_dtype)
    return peft_model


def model_dtype(base_path: str) -> torch.dtype:
    """The dtype a model folder's config declares (`dtype`, older `torch_dtype`); fp32 when it says none."""
    config = json.loads((Path(base_path) / "config.json").read_text(encoding="utf-8"))
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def weights_dtype(model: nn.Module) -> str:
    """The dtype of the saved weights, as `torch.<name>` without the prefix (e.g. `bfloat16`)."""
    dtypes = {p.dtype for p in model.parameters() if p.dtype.is_floating_point and p.requires_grad} or {
        p.dtype for p in model.parameters() if p.dtype.is_floating_point
    }
    return ",".join(sorted(str(d).removeprefix("torch.") for d in dtypes))


def job_record(job: ResolvedJob) -> dict[str, Any]:
    """What every result's kubetune.json says about the job that made it (both backends)."""
    section = job.section
    return {
        "base_model": job.base_model,
        "job": job.job.model_dump(),
        "output": job.output.model_dump(),
        "backend": job.backend,
        "training_type": section.training.training_type,
        "finetuning_type": section.training.finetuning_type,
        "layout": job.layout.model_dump(),
    }


def write_result(
    model: nn.Module,
    tokenizer: Any,
    output_root: str | Path,
    name: str,
    info: dict[str, Any],
) -> Path:
    """Save model (or adapter) + tokenizer + kubetune.json atomically; return the folder."""

    def save(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)  # type: ignore[operator]
        tokenizer.save_pretrained(folder)

    return write_result_with(save, output_root, name, {**info, "dtype": weights_dtype(model)})


def write_result_with(save: Callable[[Path], None], output_root: str | Path, name: str, info: dict[str, Any]) -> Path:
    """Like `write_result`, for writers that are not one `save_pretrained` (e.g. unsloth's merges).

    `save(folder)` writes model and tokenizer into the (empty) partial folder; kubetune.json
    and the atomic rename are done here.
    """
    final = result_path(output_root, name)
    partial = final.parent / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save(partial)
    record = {
        "kubetune_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **info,
        "size_bytes": folder_size(partial),
    }
    (partial / RESULT_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    return final


def read_result(folder: str | Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((Path(folder) / RESULT_FILE).read_text(encoding="utf-8"))
    return data
