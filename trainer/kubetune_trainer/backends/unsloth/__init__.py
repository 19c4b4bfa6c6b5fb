"""The unsloth backend: `unsloth.FastLanguageModel` + TRL's `SFTTrainer` on one GPU (or CPU).

Importing this package does not import unsloth: `sft.run` does, first thing, so that
unsloth patches transformers/TRL/peft before they load, and so that the automodel
backend (which shares the trainer image) never imports it.
"""

from __future__ import annotations

from pathlib import Path

from kubetune.planning.resolved import ResolvedJob
from kubetune_trainer.config import RunOptions


def run(job: ResolvedJob, options: RunOptions) -> Path:
    """Train the job; returns the result folder."""
    from kubetune_trainer.backends.unsloth import sft

    return sft.run(job, options)
