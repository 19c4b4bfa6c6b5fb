"""The unsloth section, field by field, as the arguments unsloth, peft and TRL receive.

Pure functions of the job (and of "is there a GPU"): no unsloth import, so the mapping
is readable in one place and testable without loading a model. `docs/trainer-unsloth.md`
has the same mapping as a table.

CPU notes (unsloth 2026.10's CPU fallback, `unsloth_zoo.cpu`): it rewrites some
TrainingArguments in `__post_init__` (8-bit/paged optimizers -> fused AdamW, padding-free and packing off,
fp16 -> bf16). kubetune does not accept silent rewrites of the job: `restore_job_arguments`
puts back what bitsandbytes / transformers really run on CPU, and `cpu_refusal` turns
what cannot run on CPU into a clear error (see the functions).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api.unsloth import UnslothSpec
from kubetune.planning.gpus import GPUS_ASSIGNED_BY_NODE
from kubetune.planning.resolved import ResolvedJob
from kubetune_trainer.config import ConfigError

CHECKPOINT_DIR = "checkpoints"
DEFAULT_CHECKPOINTS = 10
"""With save_steps null, checkpoint about this many times per run (as the automodel backend)."""


def section_of(job: ResolvedJob) -> UnslothSpec:
    if job.backend != "unsloth" or job.unsloth is None:
        raise ConfigError(f"the unsloth trainer runs unsloth jobs; this one uses {job.backend!r}")
    return job.unsloth


# --------------------------------------------------------------------------- hardware


def select_gpus(gpus: str | None, environ: dict[str, str] | os._Environ[str] | None = None) -> str | None:
    """Set CUDA_VISIBLE_DEVICES from `hardware.gpus`; return the value set (None: untouched).

    Must run before anything initialises CUDA (unsloth's import does). When the variable
    is already set (a device plugin or a user narrowed the view), the job's indices pick
    from that list, so `gpus: "0"` means "the first GPU this container may use".
    """
    env = os.environ if environ is None else environ
    if gpus is None or env.get(GPUS_ASSIGNED_BY_NODE) == "1":  # in a pod the node chose the GPU
        return None
    wanted = [int(index) for index in gpus.split(",")]
    current = env.get("CUDA_VISIBLE_DEVICES")
    if current:
        visible = [item.strip() for item in current.split(",") if item.strip()]
        missing = [index for index in wanted if index >= len(visible)]
        if missing:
            raise ConfigError(
                f"hardware.gpus {gpus!r} selects GPU index {missing[0]}, but only {len(visible)} GPU(s) are "
                f"visible (CUDA_VISIBLE_DEVICES={current}); use indices below {len(visible)}"
            )
        value = ",".join(visible[index] for index in wanted)
    else:
        value = ",".join(str(index) for index in wanted)
    env["CUDA_VISIBLE_DEVICES"] = value
    return value


def nvidia_devices_present() -> bool:
    """Whether this machine has NVIDIA device nodes at all (checked without initialising CUDA)."""
    return Path("/dev/nvidiactl").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


# --------------------------------------------------------------------------- load


def unsloth_dtype(name: str) -> str | None:
    """`model.dtype` as FastLanguageModel's `dtype`: `auto` is unsloth's None (auto-detect)."""
    return None if name == "auto" else name


def data_tokenizer(section: UnslothSpec, model_path: str) -> Any:
    """The tokenizer that prepares the data, loaded as the model is (`model.trust_remote_code`)."""
    from kubetune_trainer.models import load_tokenizer

    return load_tokenizer(model_path, trust_remote_code=section.model.trust_remote_code)


def from_pretrained_kwargs(section: UnslothSpec, model_path: str) -> dict[str, Any]:
    """Keyword arguments of `FastLanguageModel.from_pretrained`."""
    import torch

    model = section.model
    dtype = unsloth_dtype(model.dtype)
    full = section.training.finetuning_type == "all_weights"
    return {
        "model_name": model_path,
        "max_seq_length": model.max_seq_length,
        "dtype": getattr(torch, dtype) if dtype else None,
        "load_in_4bit": model.load_in_4bit,
        "load_in_8bit": model.load_in_8bit,
        "full_finetuning": full,
        "trust_remote_code": model.trust_remote_code,
        "use_gradient_checkpointing": section.training.use_gradient_checkpointing,
        "local_files_only": True,  # references are resolved to local folders; never reach for a hub
    }


def peft_kwargs(section: UnslothSpec) -> dict[str, Any] | None:
    """Keyword arguments of `FastLanguageModel.get_peft_model`; None for all_weights."""
    lora = section.training.lora
    if section.training.finetuning_type != "lora" or lora is None:
        return None
    return {
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": list(lora.target_modules),
        "bias": lora.bias,
        "use_rslora": lora.use_rslora,
        "random_state": lora.random_state,
        "use_gradient_checkpointing": section.training.use_gradient_checkpointing,
        "max_seq_length": section.model.max_seq_length,
    }


# --------------------------------------------------------------------------- train


@dataclass(frozen=True)
class StepPlan:
    total_steps: int
    steps_per_epoch: int
    save_steps: int


def step_plan(section: UnslothSpec, train_rows: int, checkpoint_every: int | None) -> StepPlan:
    """Optimizer steps as HF Trainer counts them (the last partial accumulation counts as a step)."""
    batch = section.batch
    batches = math.ceil(train_rows / batch.per_device_train_batch_size)
    per_epoch = max(1, math.ceil(batches / batch.gradient_accumulation_steps))
    total = section.schedule.max_steps or per_epoch * section.schedule.epochs
    save = section.schedule.save_steps or checkpoint_every or max(1, math.ceil(total / DEFAULT_CHECKPOINTS))
    return StepPlan(total, per_epoch, save)


def sft_config_kwargs(
    section: UnslothSpec, output_dir: str, plan: StepPlan, has_validation: bool, keep_checkpoints: int
) -> dict[str, Any]:
    """Keyword arguments of `trl.SFTConfig` (a TrainingArguments)."""
    schedule, batch, optimizer = section.schedule, section.batch, section.optimizer
    warmup: float = schedule.warmup_ratio if schedule.warmup_ratio is not None else schedule.warmup_steps
    eval_every = schedule.eval_steps if has_validation else None
    return {
        "output_dir": output_dir,
        "num_train_epochs": schedule.epochs,
        "max_steps": schedule.max_steps if schedule.max_steps is not None else -1,
        # transformers 5: warmup_steps < 1 is a ratio of the total steps (warmup_ratio is gone).
        "warmup_steps": warmup,
        "lr_scheduler_type": schedule.lr_scheduler_type,
        "logging_steps": schedule.logging_steps,
        "save_strategy": "steps",
        "save_steps": plan.save_steps,
        "save_total_limit": keep_checkpoints,
        "eval_strategy": "steps" if eval_every else "no",
        "eval_steps": eval_every,
        "seed": schedule.seed,
        "data_seed": schedule.seed,
        "per_device_train_batch_size": batch.per_device_train_batch_size,
        "per_device_eval_batch_size": batch.per_device_train_batch_size,
        "gradient_accumulation_steps": batch.gradient_accumulation_steps,
        "learning_rate": optimizer.learning_rate,
        "weight_decay": optimizer.weight_decay,
        "optim": optimizer.optim,
        "bf16": section.hardware.precision == "bf16",
        "fp16": section.hardware.precision == "fp16",
        # The data arrives tokenized and truncated (kubetune_trainer.data: completion-only
        # labels), and packed when dataset.packing (backends/unsloth/dataset.py), so TRL
        # neither templates, re-tokenizes nor packs: it collates. Packed rows are laid out
        # padding-free (TRL refuses a max_length then: the rows already fit it).
        "max_length": None if section.dataset.packing else section.model.max_seq_length,
        "packing": False,
        "padding_free": section.dataset.packing,
        "dataset_num_proc": None,
        "report_to": "none",  # progress goes through kubetune's reporters (and its integrations)
        "disable_tqdm": True,  # kubetune draws its own progress bar
        "logging_first_step": True,
        "dataloader_num_workers": 0,
    }


GPU_ONLY_OPTIMIZERS = {
    "paged_adamw_8bit": (
        "bitsandbytes pages optimizer state through CUDA unified memory; on CPU it would quietly run "
        "the non-paged 8-bit AdamW instead. Use optim: adamw_8bit (the same 8-bit state, runs on CPU), "
        "or run this job on a GPU"
    ),
}


def cpu_refusal(section: UnslothSpec) -> str | None:
    """Why this job cannot run as written on CPU (None: it can). Checked only without a GPU."""
    reason = GPU_ONLY_OPTIMIZERS.get(section.optimizer.optim)
    if reason:
        return f"optimizer.optim {section.optimizer.optim} needs a GPU: {reason}"
    return None


def restore_job_arguments(args: Any, section: UnslothSpec, on_cpu: bool) -> list[str]:
    """Undo unsloth's CPU rewrites that would silently change the job; return what was restored.

    - optim: unsloth swaps every 8-bit optimizer for fused AdamW on CPU, but bitsandbytes
      0.50's `AdamW8bit` has CPU kernels (8-bit uint8 state; tested), so `adamw_8bit` runs
      as asked. (`paged_adamw_8bit` is refused on CPU before this, see `cpu_refusal`.)
    - padding_free (the layout of packed rows): unsloth turns it off on CPU because "SDPA
      attends across examples". With transformers 5 that is not so in training: packed rows
      carry position ids, no attention mask and no KV cache, and transformers builds a
      block-diagonal causal mask from the position ids (tested: packed logits equal separate
      ones to 1e-7).
    """
    if not on_cpu:
        return []
    restored = []
    if str(getattr(args.optim, "value", args.optim)) != section.optimizer.optim:
        args.optim = section.optimizer.optim
        restored.append(f"optim={section.optimizer.optim}")
    if section.dataset.packing and not args.padding_free:
        args.padding_free = True
        restored.append("padding_free=True (packed rows)")
    return restored


def effective_precision(args: Any) -> str:
    """What the Trainer will autocast to, after unsloth's CPU normalisation."""
    if getattr(args, "bf16", False):
        return "bf16 autocast"
    if getattr(args, "fp16", False):
        return "fp16 autocast"
    return "fp32 (no autocast)"
