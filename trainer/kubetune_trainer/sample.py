"""Greedy generation from a base model and from a training result: the before/after sample.

`kubetune run` prints one after training, for a prompt from the job's data, so the user
sees what the fine-tuning changed. Works for adapters (base + PEFT adapter) and for full
model results alike; always on CPU-or-whatever-is-there in fp32, one prompt, a few tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kubetune_trainer.models import load_causal_lm, load_tokenizer


def generate(model: Any, tokenizer: Any, prompt: list[dict[str, str]] | str, max_new_tokens: int = 48) -> str:
    if isinstance(prompt, list):
        inputs = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    inputs = {key: value.to(model.device) for key, value in inputs.items()}
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    text: str = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return text.strip()


def before_after(
    base_path: str, result: Path, adapter: bool, prompt: list[dict[str, str]] | str, max_new_tokens: int = 48
) -> tuple[str, str]:
    """(base model's answer, trained model's answer) to `prompt`."""
    tokenizer = load_tokenizer(base_path)
    base = load_causal_lm(base_path).eval()
    before = generate(base, tokenizer, prompt, max_new_tokens)
    trained: Any
    if adapter:
        from peft import PeftModel

        trained = PeftModel.from_pretrained(base, str(result)).eval()
    else:
        trained = load_causal_lm(str(result)).eval()
    return before, generate(trained, tokenizer, prompt, max_new_tokens)
