"""`output.save_method`: write the trained model the way the job asks, loadable without unsloth.

- `lora` (LoRA): unsloth `save_pretrained_merged(save_method="lora")`, the PEFT adapter;
  loads with peft `PeftModel.from_pretrained(base, folder)`.
- `merged_16bit`, LoRA on an unquantized base: unsloth `save_pretrained_merged(save_method=
  "merged_16bit")`; loads with `AutoModelForCausalLM.from_pretrained(folder)`.
- `merged_16bit`, LoRA on a 4/8-bit base: kubetune merges — the base reloaded unquantized,
  the adapter applied, peft `merge_and_unload`, cast to 16 bit; loads the same way.
- `merged_4bit` (any LoRA): merged as above, then quantized by bitsandbytes (NF4, double
  quantization, lm_head kept 16-bit) and saved; loads with `AutoModelForCausalLM` when
  bitsandbytes is installed (the quantization config is in config.json).
- all_weights: `save_pretrained` of the full model in its training dtype.

Why kubetune merges in two cases: unsloth's CPU backend refuses to merge into a
quantized model and has no `merged_4bit`; unsloth's GPU `merged_16bit` of a 4-bit model
may fetch the 16-bit base from the hub, which a cluster may not reach. kubetune's merge
uses the base model folder the job already mounts, on CPU and GPU alike, so the code a
GPU runs is the code CI tests. Merging into the original (unquantized) base weights is
the usual QLoRA export: the adapter was trained against the NF4 base, and the merged
16-bit model differs from base-NF4+adapter by the base's quantization error only.

"16 bit" is bfloat16 where the hardware has it (GPU: bf16 support and precision bf16;
CPU: unsloth's rule, native bf16 instructions), else float16.
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path
from typing import Any

import torch

from kubetune.api.unsloth import UnslothSpec

SKIP_4BIT = ["lm_head"]
"""Modules left unquantized in merged_4bit (as unsloth's loaders: the output head stays 16-bit)."""


def is_quantized(model: Any) -> bool:
    return any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())


def sixteen_bit_dtype(section: UnslothSpec) -> torch.dtype:
    if torch.cuda.is_available():
        bf16 = section.hardware.precision == "bf16" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float16
    from unsloth import is_bfloat16_supported  # on CPU: unsloth's "native bf16 instructions" rule

    return torch.bfloat16 if is_bfloat16_supported() else torch.float16


def route(section: UnslothSpec, model: Any) -> str:
    """Which writer a job's result goes through (recorded in kubetune.json)."""
    method = section.output.save_method
    if section.training.finetuning_type == "all_weights":
        return "save_pretrained (full weights)"
    if method == "lora" or (method == "merged_16bit" and not is_quantized(model)):
        return f"unsloth save_pretrained_merged({method})"
    return f"kubetune merge ({method}: peft merge_and_unload on the unquantized base)"


def write(model: Any, tokenizer: Any, folder: Path, section: UnslothSpec, base_path: str) -> str:
    """Write the result into `folder` (empty, exists); return the route taken."""
    method = section.output.save_method
    taken = route(section, model)
    if taken.startswith("save_pretrained"):
        model.save_pretrained(str(folder), safe_serialization=True)
        tokenizer.save_pretrained(str(folder))
    elif taken.startswith("unsloth"):
        model.save_pretrained_merged(str(folder), tokenizer, save_method=method)
    else:
        with tempfile.TemporaryDirectory(prefix="kubetune-adapter-", dir=folder.parent) as adapter:
            model.save_pretrained(adapter)  # the PEFT adapter only: small
            merge_into(Path(adapter), folder, tokenizer, section, base_path, four_bit=method == "merged_4bit")
    return taken


def merge_into(
    adapter: Path, folder: Path, tokenizer: Any, section: UnslothSpec, base_path: str, four_bit: bool
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    gc.collect()  # the caller dropped the trainer; free what it held before a second model loads
    dtype = sixteen_bit_dtype(section)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Merge in fp32 on CPU (no rounding before the single cast); in 16 bit on a GPU (memory).
    load_dtype = dtype if device == "cuda" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(
        base_path,
        dtype=load_dtype,
        device_map=device,
        local_files_only=True,
        trust_remote_code=section.model.trust_remote_code,
    )
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().to(dtype)
    if not four_bit:
        merged.save_pretrained(str(folder), safe_serialization=True)
        tokenizer.save_pretrained(str(folder))
        return
    with tempfile.TemporaryDirectory(prefix="kubetune-merged-", dir=folder.parent) as staged:
        merged.save_pretrained(staged, safe_serialization=True)
        del merged, base
        gc.collect()
        quantized = quantize_4bit(staged, dtype, device, section.model.trust_remote_code)
        quantized.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))


def quantize_4bit(path: str, compute_dtype: torch.dtype, device: str, trust_remote_code: bool) -> Any:
    """Load a 16-bit folder quantized to NF4 by bitsandbytes (quantization happens on load)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=SKIP_4BIT,
    )
    return AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=config,
        dtype=compute_dtype,
        device_map=device,
        local_files_only=True,
        trust_remote_code=trust_remote_code,
    )
