"""The trainer's backends, one package each, behind one small protocol.

`automodel/` (torch + transformers + peft, SFT and distillation, multi-node) and
`unsloth/` (unsloth + TRL, one GPU) know nothing of each other (an import-linter
contract): each is a module with a `run` function, looked up here by the job's
`backend`. A backend is imported only when a job asks for it, because importing
unsloth patches transformers for the whole process.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from kubetune.api.resources import Backend as BackendName
from kubetune.planning.resolved import ResolvedJob
from kubetune_trainer.config import RunOptions


class Backend(Protocol):
    """What a backend package offers: train the job, return the result folder (every rank)."""

    def run(self, job: ResolvedJob, options: RunOptions) -> Path: ...


def _automodel() -> Backend:
    from kubetune_trainer.backends import automodel

    return automodel


def _unsloth() -> Backend:
    from kubetune_trainer.backends import unsloth

    return unsloth


_LOADERS: dict[BackendName, Callable[[], Backend]] = {"automodel": _automodel, "unsloth": _unsloth}


def backend_for(name: BackendName) -> Backend:
    """The backend a job names (imported now, not before; the name was validated with the job)."""
    return _LOADERS[name]()
