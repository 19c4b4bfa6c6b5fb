"""The automodel backend: SFT and logit distillation with torch + transformers + peft."""

from __future__ import annotations

from pathlib import Path

from kubetune.planning.resolved import ResolvedJob
from kubetune_trainer.config import RunOptions, automodel_section


def run(job: ResolvedJob, options: RunOptions) -> Path:
    """Train the job; returns the result folder (on every rank)."""
    section = automodel_section(job)
    if section.training.training_type == "distillation":
        from kubetune_trainer.backends.automodel import distill

        return distill.run(job, options)
    from kubetune_trainer.backends.automodel import sft

    return sft.run(job, options)
