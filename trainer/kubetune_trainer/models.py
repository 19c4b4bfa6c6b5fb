"""Load models and tokenizers from local folders (or hf:// when the network allows), add LoRA.

Backend-neutral helpers. A model path is a folder in Hugging Face layout (a mounted
volume in a cluster, a local folder under `kubetune run`) or `hf://org/name`, which is
downloaded into the cache (`HF_HOME`) only when the hub is reachable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

HF_SCHEME = "hf://"


class ModelError(RuntimeError):
    """A model that cannot be found, downloaded or used; the message says what to do."""


def local_model_path(path: str, world: Any = None) -> str:
    """A local folder for `path`; `hf://org/name` is downloaded once per node (kubetune_trainer.hub).

    `world` (a `distributed.World`) is the process group under torchrun; None is one process.
    """
    if path.startswith(HF_SCHEME):
        from kubetune_trainer.distributed import World
        from kubetune_trainer.hub import hub_model_path

        return hub_model_path(path, world if world is not None else World(0, 0, 1, torch.device("cpu")))
    folder = Path(path)
    if not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "has no config.json (not a Hugging Face model folder)"
        raise ModelError(f"model folder {folder} {what}")
    return str(folder)


def quiet_transformers() -> None:
    """No per-file progress bars from transformers: the trainer draws its own."""
    from transformers.utils import logging

    logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer; `trust_remote_code` must match the model's load (a custom tokenizer class)."""
    from transformers import AutoTokenizer

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ModelError(f"the tokenizer in {path} has no EOS token; training needs one so generation stops")
    return tokenizer


def pad_id(tokenizer: Any) -> int:
    """Padding never carries loss or attention, so any id works; prefer the tokenizer's own."""
    value = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(value)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_config(path: str, trust_remote_code: bool = False) -> Any:
    """The model's transformers config (config.json only: no weights)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)


def load_causal_lm(path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> nn.Module:
    from transformers import AutoModelForCausalLM

    model: nn.Module = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code
    )
    return model


def base_weights_dtype(device: torch.device, lora: bool) -> torch.dtype:
    """How the student's weights are stored: fp32 when they are trained (the optimizer's master
    copy) and on CPU; bf16 under a LoRA adapter on a GPU, where they are frozen and every
    matmul runs in bf16 anyway — half the memory, what the memory pre-flight counts
    (kubetune.planning.memory.estimate). peft keeps the adapter itself in fp32."""
    return torch.bfloat16 if lora and device.type == "cuda" else torch.float32


def linear_layer_names(model: nn.Module) -> list[str]:
    """The names of every `nn.Linear` but the output head (what `target_modules: null` trains).

    Not peft's "all-linear": on MoE models peft also wraps the fused 3-D expert weights,
    which expert parallel shards.
    """
    output_embeddings: Any = getattr(model, "get_output_embeddings", None)
    head = output_embeddings() if callable(output_embeddings) else None
    return sorted(
        {name.rpartition(".")[2] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
        - {name.rpartition(".")[2] for name, module in model.named_modules() if module is head}
    )


def add_lora(model: nn.Module, rank: int, alpha: int, target_modules: list[str] | None) -> nn.Module:
    """Wrap with a peft LoRA adapter; null target_modules = every linear layer but the head."""
    from peft import LoraConfig, get_peft_model

    from kubetune_trainer.lora_linear import register_lean_linear

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=target_modules if target_modules else linear_layer_names(model),
        task_type="CAUSAL_LM",
    )
    register_lean_linear(config)
    try:
        wrapped: nn.Module = get_peft_model(model, config)
    except ValueError as error:  # e.g. a target_modules pattern that matches nothing
        raise ModelError(f"training.lora.target_modules: {error}") from None
    return wrapped


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def vocabulary_mismatch(student: tuple[Any, nn.Module], teacher: tuple[Any, nn.Module]) -> str | None:
    """Why a teacher cannot teach this student (None when vocabularies match)."""
    (student_tok, student_model), (teacher_tok, teacher_model) = student, teacher
    student_size = student_model.get_output_embeddings().weight.shape[0]  # type: ignore[operator]
    teacher_size = teacher_model.get_output_embeddings().weight.shape[0]  # type: ignore[operator]
    if student_size != teacher_size:
        return f"the student predicts over {student_size} tokens and the teacher over {teacher_size}"
    student_vocab, teacher_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if student_vocab != teacher_vocab:
        differing = sorted(set(student_vocab.items()) ^ set(teacher_vocab.items()), key=str)[:3]
        return f"their tokenizers differ ({len(student_vocab)} vs {len(teacher_vocab)} entries; e.g. {differing})"
    return None
