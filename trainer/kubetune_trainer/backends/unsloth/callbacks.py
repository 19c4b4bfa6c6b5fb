"""TrainerCallbacks that connect HF Trainer (inside TRL's SFTTrainer) to kubetune.

- `ProgressCallback`: every optimizer step, evaluation and checkpoint becomes a
  `ProgressEvent` on the shared `Reporter` (console bar, progress file, Prometheus,
  W&B/MLflow, and the job's status in a cluster).
- `PreemptionCallback`: SIGTERM (recorded by `checkpoint.Preemption`) asks the Trainer to
  save a checkpoint and stop after the current step.
- Checkpoints are the Trainer's own `<output>/checkpoints/checkpoint-N/` folders (model or
  adapter, optimizer, scheduler, RNG, trainer state). The Trainer writes them in place,
  so `CompleteMarker` adds `kubetune-complete.json` once a save has finished; on start,
  folders without it (a crash mid-save) are removed and the newest marked one is resumed.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from kubetune_trainer.checkpoint import Preemption
from kubetune_trainer.progress import EventKind, ProgressEvent, Reporter

MARKER = "kubetune-complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return sorted(found)


def remove_incomplete(root: Path) -> list[Path]:
    """Delete checkpoint folders a crash left half-written; return them."""
    removed = [path for _, path in _checkpoints(root) if not (path / MARKER).is_file()]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def latest_complete(root: Path) -> tuple[int, Path] | None:
    complete = [(step, path) for step, path in _checkpoints(root) if (path / MARKER).is_file()]
    return complete[-1] if complete else None


class CompleteMarker(TrainerCallback):
    """Marks a checkpoint complete: on_save runs after the Trainer wrote every file of it."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            marker = {"step": state.global_step, "time": time.time()}
            (folder / MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")


class PreemptionCallback(TrainerCallback):
    def __init__(self, preemption: Preemption) -> None:
        self.preemption = preemption
        self.stopped_at: int | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.preemption.requested and self.stopped_at is None:
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control


class ProgressCallback(TrainerCallback):
    """Turns the Trainer's steps and logs into ProgressEvents (step, validation, checkpoint)."""

    def __init__(self, reporter: Reporter, total_steps: int, steps_per_epoch: int, num_epochs: int) -> None:
        self.reporter = reporter
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
        self.num_epochs = num_epochs
        self.loss: float | None = None
        self.val_loss: float | None = None
        self.lr: float | None = None
        self.tokens_per_second: float | None = None
        self.step_seconds: list[float] = []
        self.history: list[dict[str, float]] = []
        self._step_began = time.perf_counter()
        self._tokens: tuple[float, float] | None = None
        """(time, cumulative tokens) at the previous log with a token count."""

    def emit(self, kind: EventKind, step: int, **fields: Any) -> None:
        recent = self.step_seconds[-20:]
        eta = (self.total_steps - step) * sum(recent) / len(recent) if recent else None
        self.reporter.report(
            ProgressEvent(
                kind=kind,
                step=step,
                max_steps=self.total_steps,
                epoch=step / self.steps_per_epoch,
                num_epochs=self.num_epochs,
                loss=self.loss,
                val_loss=self.val_loss,
                lr=self.lr,
                tokens_per_second=self.tokens_per_second,
                eta_seconds=eta,
                **fields,
            )
        )

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.total_steps = state.max_steps or self.total_steps
        self._step_began = time.perf_counter()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._step_began = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step_seconds.append(time.perf_counter() - self._step_began)
        logs_now = args.logging_steps and (state.global_step % args.logging_steps == 0 or state.global_step == 1)
        if not logs_now:  # a logged step is reported from on_log, with its fresh loss
            self.emit("step", state.global_step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        if "num_tokens" in logs:
            now, tokens = time.perf_counter(), float(logs["num_tokens"])
            if self._tokens is not None and now > self._tokens[0] and tokens > self._tokens[1]:
                self.tokens_per_second = (tokens - self._tokens[1]) / (now - self._tokens[0])
            self._tokens = (now, tokens)
        if "loss" in logs:
            self.loss = float(logs["loss"])
            self.lr = float(logs["learning_rate"]) if "learning_rate" in logs else self.lr
            self.history.append({"step": state.global_step, "loss": self.loss})
            self.emit("step", state.global_step)
        if "eval_loss" in logs:
            self.val_loss = float(logs["eval_loss"])
            self.history.append({"step": state.global_step, "val_loss": self.val_loss})
            self.emit("validation", state.global_step)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.emit("checkpoint", state.global_step, checkpoint_path=str(folder))
