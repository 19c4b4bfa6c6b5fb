"""Supervised fine-tuning, unsloth backend: load → setup → train → save → cleanup.

`unsloth.FastLanguageModel` loads the model and attaches LoRA; TRL's `SFTTrainer` trains.
On a GPU that is unsloth's own fast path; without one, unsloth 2026.10's CPU fallback
(stock transformers + peft + TRL, with its dtype policy, bitsandbytes CPU 4-bit and
chunked cross entropy) runs the same code, which is how CI trains for real.

Features (every field of `spec.unsloth`; the table is in docs/trainer-unsloth.md):
- model: `max_seq_length`, `load_in_4bit` / `load_in_8bit` (bitsandbytes Linear4bit /
  Linear8bitLt; on CPU unsloth has no 8-bit path, so kubetune hands its load a
  `BitsAndBytesConfig(load_in_8bit=True)`), `dtype` (`auto` = unsloth's auto-detect; the
  dtype in use is logged), `trust_remote_code` (logged when on);
- training: LoRA through `FastLanguageModel.get_peft_model` (rank, alpha, dropout,
  target_modules, bias, use_rslora, random_state), `use_gradient_checkpointing`
  (`unsloth` / true / false); `all_weights` trains every weight, unquantized;
- data: `kubetune_trainer.data` reads and checks the rows; `dataset.text_field` and
  `apply_chat_template` pick the text (`backends.unsloth.dataset`); labels are
  completion-only; `validation_path` (else 10% held out); `packing`;
- schedule, batch, optimizer, hardware: `arguments.sft_config_kwargs` (SFTConfig),
  `hardware.gpus` -> CUDA_VISIBLE_DEVICES before CUDA starts; `hardware.precision` is
  bf16/fp16 autocast on a GPU, and on CPU whatever unsloth's fallback keeps (logged);
- progress through the shared reporters (console, file, Prometheus, integrations, the
  job's status in a cluster); checkpoints every `save_steps` (null: about 10 per run) and
  on SIGTERM; a restart resumes from the newest complete checkpoint;
- the result per `output.save_method` (`backends.unsloth.save`) plus kubetune.json.

Raises:
- `ConfigError`: unsloth cannot be imported (the reason is in the message: kubetune never
  falls back to a non-unsloth trainer), `hardware.gpus` names GPUs that are not there,
  or the job asks for something that cannot run on CPU (`paged_adamw_8bit`);
- `DataError`: a missing file or a malformed row (file and line), before the model loads;
- `ModelError`: a missing model folder, or quantized loading that did not quantize;
- `Preempted`: SIGTERM arrived; a checkpoint was written (exit 143, resume on restart).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.planning.resolved import ResolvedJob
from kubetune_trainer.backends.unsloth import arguments
from kubetune_trainer.backends.unsloth.reporting import Notes, make_reporter
from kubetune_trainer.checkpoint import Preempted, Preemption
from kubetune_trainer.config import ConfigError, RunOptions, check_integrations
from kubetune_trainer.models import ModelError, local_model_path
from kubetune_trainer.outputs import finished, job_record, result_path, write_result_with

# bitsandbytes' 8-bit matmul logs this on every forward on CPU; it is expected, not news.
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


def run(job: ResolvedJob, options: RunOptions) -> Path:
    section = arguments.section_of(job)
    check_integrations(job)
    if finished(job.paths.output, job.output.name):  # a restart after success: nothing to do
        return result_path(job.paths.output, job.output.name)
    notes = Notes()
    # 0. GPUs: CUDA_VISIBLE_DEVICES must be set before anything initialises CUDA (unsloth's import does).
    visible = _select_gpus(section.hardware.gpus, notes)
    fast_language_model = import_unsloth(notes)
    import datasets
    import torch

    datasets.disable_progress_bars()  # per-map bars for a few hundred rows are noise in a job log
    on_gpu = torch.cuda.is_available()
    if visible is not None and not on_gpu and arguments.nvidia_devices_present():
        raise ConfigError(
            f"hardware.gpus {section.hardware.gpus!r} (CUDA_VISIBLE_DEVICES={visible}) selects no usable GPU on "
            "this machine; fix the indices instead of training on CPU"
        )
    if not on_gpu and (refusal := arguments.cpu_refusal(section)):
        raise ConfigError(f"{refusal} (this machine has no GPU: unsloth trains on CPU)")
    reporter = make_reporter(job, options)
    try:
        with Preemption() as preemption:
            # 1. Load: tokenizer and every data row first, so bad data fails before the model loads.
            from kubetune_trainer.backends.unsloth.dataset import load_sft_data

            model_path = local_model_path(job.paths.model)
            data = load_sft_data(
                section, job.paths.training, job.paths.validation, arguments.data_tokenizer(section, model_path)
            )
            notes.extend(f"warning: {w}" for w in data.warnings)
            if section.model.trust_remote_code:
                notes.add("model.trust_remote_code is on: the checkpoint's own Python code may run")
            kwargs = arguments.from_pretrained_kwargs(section, model_path)
            with _eight_bit_on_cpu(section.model.load_in_8bit and not on_gpu, notes):
                model, tokenizer = fast_language_model.from_pretrained(**kwargs)
            _check_quantized(model, section)

            # 2. Setup: LoRA (or full weights), SFTConfig, SFTTrainer; resume if a checkpoint exists.
            lora = arguments.peft_kwargs(section)
            if lora is not None:
                model = fast_language_model.get_peft_model(model, **lora)
            setup = _make_trainer(job, options, model, tokenizer, data, reporter, on_gpu, preemption)
            trainer, plan, progress = setup.trainer, setup.plan, setup.progress
            notes.add(_describe(section, model, setup, data, on_gpu))
            notes.flush(reporter, plan.total_steps)
            checkpoints = Path(trainer.args.output_dir)
            from kubetune_trainer.backends.unsloth.callbacks import latest_complete, remove_incomplete

            for removed in remove_incomplete(checkpoints):
                progress.emit("start", 0, message=f"removed {removed}: a save that did not finish")
            latest = latest_complete(checkpoints)
            if latest is not None:
                progress.emit("start", latest[0], message=f"resuming from {latest[1]} (step {latest[0]})")

            # 3. Train.
            started = time.perf_counter()
            output = trainer.train(resume_from_checkpoint=str(latest[1]) if latest else None)
            seconds = time.perf_counter() - started
            if setup.stopper.stopped_at is not None:
                raise Preempted(f"stopped by SIGTERM at step {setup.stopper.stopped_at}; checkpoint written")
            if data.validation is not None and not _evaluated_at(trainer, trainer.state.global_step):
                trainer.evaluate()

            # 4. Save: the result per output.save_method, plus kubetune.json.
            from kubetune_trainer.backends.unsloth import save

            route = save.route(section, model)
            info = _result_info(job, trainer, output, progress.history, seconds, route, data.held_out, on_gpu)
            del trainer  # drop optimizer state before a merge loads the base model a second time
            gc.collect()
            folder = write_result_with(
                lambda partial: _save(model, tokenizer, partial, section, model_path),
                job.paths.output,
                job.output.name,
                info,
            )
            progress.emit("end", progress.total_steps, message=f"result written to {folder} ({route})")
            return folder
    finally:
        # 5. Cleanup.
        reporter.close()


def _save(model: Any, tokenizer: Any, folder: Path, section: Any, base_path: str) -> None:
    from kubetune_trainer.backends.unsloth import save

    save.write(model, tokenizer, folder, section, base_path)


# --------------------------------------------------------------------------- load helpers


def import_unsloth(notes: Notes) -> Any:
    """`unsloth.FastLanguageModel`, or a ConfigError with the reason (never a silent fallback)."""
    early = [name for name in ("transformers", "trl", "peft") if name in sys.modules]
    if early:  # unsloth patches these on import; imported first, some patches may not apply
        notes.add(f"warning: {', '.join(early)} were imported before unsloth; unsloth patches them on import")
    try:
        import unsloth
        from unsloth import FastLanguageModel
    except Exception as error:
        raise ConfigError(
            f"the unsloth backend needs the unsloth package, and `import unsloth` failed: "
            f"{type(error).__name__}: {error}. Install a matching torch/torchvision pair (or none) with "
            "unsloth (see docs/trainer-unsloth.md); kubetune does not train unsloth jobs without unsloth"
        ) from error
    notes.add(f"unsloth {unsloth.__version__}, device type {getattr(unsloth, 'DEVICE_TYPE', '?')}")
    return FastLanguageModel


def _select_gpus(gpus: str | None, notes: Notes) -> str | None:
    import torch

    if gpus is not None and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        raise ConfigError("hardware.gpus: CUDA was initialised before the trainer could set CUDA_VISIBLE_DEVICES")
    value = arguments.select_gpus(gpus)
    if value is not None:
        notes.add(f"hardware.gpus {gpus!r}: CUDA_VISIBLE_DEVICES={value}")
    elif gpus is not None:
        notes.add(f"hardware.gpus {gpus!r} not applied: the node assigned this pod's GPU")
    return value


@contextlib.contextmanager
def _eight_bit_on_cpu(active: bool, notes: Notes) -> Iterator[None]:
    """unsloth's CPU loader has no 8-bit path (it loads 16-bit and says so); hand its
    transformers load the bitsandbytes 8-bit config, which runs on CPU (Linear8bitLt)."""
    if not active:
        yield
        return
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    original = AutoModelForCausalLM.from_pretrained
    own = AutoModelForCausalLM.__dict__.get("from_pretrained")  # usually inherited: then restore by deleting

    def from_pretrained(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("quantization_config", BitsAndBytesConfig(load_in_8bit=True))  # type: ignore[no-untyped-call]
        return original(*args, **kwargs)

    # unsloth's loader looks the method up at call time, so swapping it for this one call is enough.
    setattr(AutoModelForCausalLM, "from_pretrained", staticmethod(from_pretrained))  # noqa: B010
    try:
        yield
    finally:
        if own is None:
            delattr(AutoModelForCausalLM, "from_pretrained")
        else:
            setattr(AutoModelForCausalLM, "from_pretrained", own)  # noqa: B010
    notes.add(
        "load_in_8bit on CPU: unsloth's CPU loader has no 8-bit path, so kubetune passed "
        "BitsAndBytesConfig(load_in_8bit=True) into its transformers load (ignore its '16-bit' line above)"
    )


def _check_quantized(model: Any, section: Any) -> None:
    wanted = "Linear4bit" if section.model.load_in_4bit else "Linear8bitLt" if section.model.load_in_8bit else None
    if wanted and not any(type(m).__name__ == wanted for m in model.modules()):
        raise ModelError(
            f"model.load_in_{'4' if wanted == 'Linear4bit' else '8'}bit is set, but the model loaded without "
            f"{wanted} layers (bitsandbytes could not quantize it here; unsloth's log above says why). "
            "Set it to false to train unquantized, or run on a machine where bitsandbytes works"
        )


# --------------------------------------------------------------------------- setup helpers


@dataclass
class Setup:
    trainer: Any
    plan: arguments.StepPlan
    progress: Any
    """callbacks.ProgressCallback: emits the run's events."""
    stopper: Any
    """callbacks.PreemptionCallback: records the step SIGTERM stopped at."""
    restored: list[str]
    """Job arguments kept against unsloth's CPU defaults."""


def _make_trainer(
    job: ResolvedJob,
    options: RunOptions,
    model: Any,
    tokenizer: Any,
    data: Any,
    reporter: Any,
    on_gpu: bool,
    preemption: Preemption,
) -> Setup:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTConfig, SFTTrainer  # type: ignore[attr-defined]  # unsloth's CPU subclass on CPU

    from kubetune_trainer.backends.unsloth.callbacks import CompleteMarker, PreemptionCallback
    from kubetune_trainer.backends.unsloth.callbacks import ProgressCallback as KubetuneProgress

    section = arguments.section_of(job)
    plan = arguments.step_plan(section, len(data.train), options.checkpoint_every)
    output_dir = str(Path(job.paths.output) / arguments.CHECKPOINT_DIR)
    kwargs = arguments.sft_config_kwargs(
        section, output_dir, plan, data.validation is not None, options.keep_checkpoints
    )
    args = SFTConfig(**kwargs)
    restored = arguments.restore_job_arguments(args, section, on_cpu=not on_gpu)
    progress = KubetuneProgress(reporter, plan.total_steps, plan.steps_per_epoch, section.schedule.epochs)
    stopper = PreemptionCallback(preemption)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.validation,
        processing_class=tokenizer,
        callbacks=[CompleteMarker(), progress, stopper],
    )
    for noisy in (PrinterCallback, ProgressCallback):  # kubetune reports progress itself
        trainer.remove_callback(noisy)
    return Setup(trainer, plan, progress, stopper, restored)


def _evaluated_at(trainer: Any, step: int) -> bool:
    return any("eval_loss" in entry and entry.get("step") == step for entry in trainer.state.log_history)


def _describe(section: Any, model: Any, setup: Setup, data: Any, on_gpu: bool) -> str:
    import torch

    args, plan = setup.trainer.args, setup.plan
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    quant = "4-bit" if section.model.load_in_4bit else "8-bit" if section.model.load_in_8bit else "unquantized"
    device = (
        f"GPU {torch.cuda.get_device_name(0)}"
        if on_gpu
        else f"CPU (unsloth CPU fallback, {torch.get_num_threads()} threads)"
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    lines = [
        f"device: {device}",
        f"model: {type(inner).__name__}, {quant}, weights {inner.dtype} (model.dtype {section.model.dtype}), "
        f"compute {arguments.effective_precision(args)} (hardware.precision {section.hardware.precision}), "
        f"gradient checkpointing {'on' if getattr(inner, 'is_gradient_checkpointing', False) else 'off'} "
        f"({section.training.use_gradient_checkpointing})",
        f"{section.training.finetuning_type}: trainable parameters {trainable:,} of {total:,}",
        f"steps: {plan.total_steps} ({plan.steps_per_epoch} per epoch), batch {args.per_device_train_batch_size} × "
        f"accumulation {args.gradient_accumulation_steps}, {len(data.train)} training / "
        f"{len(data.validation) if data.validation is not None else 0} validation "
        f"{'packed sequences' if section.dataset.packing else 'examples'}"
        f"{' (held out)' if data.held_out else ''}, optim {getattr(args.optim, 'value', args.optim)}, "
        f"packing {section.dataset.packing}, checkpoints every {args.save_steps} steps",
    ]
    if setup.restored:
        lines.append(f"kept the job's {', '.join(setup.restored)} (unsloth's CPU defaults would change it)")
    return "\n".join(lines)


def _result_info(
    job: ResolvedJob,
    trainer: Any,
    output: Any,
    history: list[dict[str, float]],
    seconds: float,
    route: str,
    held_out: bool,
    on_gpu: bool,
) -> dict[str, Any]:
    section = arguments.section_of(job)
    losses = [entry["loss"] for entry in history if "loss" in entry]
    val_losses = [entry["val_loss"] for entry in history if "val_loss" in entry]
    return {
        **job_record(job),
        "lora": section.training.lora.model_dump() if section.training.lora else None,
        "save_method": section.output.save_method,
        "save_route": route,
        "seed": section.schedule.seed,
        "device": "cuda" if on_gpu else "cpu",
        "validation_held_out": held_out,
        "metrics": {
            "steps": trainer.state.global_step,
            "first_loss": losses[0] if losses else None,
            "train_loss": losses[-1] if losses else None,
            "mean_train_loss": float(output.training_loss),
            "val_loss": val_losses[-1] if val_losses else None,
            "train_seconds": round(seconds, 3),
        },
    }
