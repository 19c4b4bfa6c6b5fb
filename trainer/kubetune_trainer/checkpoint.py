"""Checkpoint folders on the output volume: atomic, newest-complete-wins, and SIGTERM.

Backend-neutral. Layout under `<output>/checkpoints/`:

    step-00000012/            a complete checkpoint (it holds `checkpoint.json`)
    .step-00000016.partial/   being written; never loaded, removed on the next start

A checkpoint is written into a `.partial` folder, `checkpoint.json` is written last, and
the folder is renamed to its final name: a crash at any moment leaves either a complete
checkpoint or a partial folder that `latest()` ignores. What goes inside is the backend's
business (`write` callback); this module also captures and restores the RNG state, and
turns SIGTERM (preemption, `kubectl delete`, node drain) into a flag the training loop
polls after each optimizer step so that it can write one last checkpoint and exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import torch

META_FILE = "checkpoint.json"
_COMPLETE = re.compile(r"^step-(\d{8})$")
EXIT_PREEMPTED = 143
"""Exit status after a SIGTERM checkpoint (128 + SIGTERM), so Kubernetes restarts the pod."""


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was written and the process should exit 143."""


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    meta: dict[str, Any]


class CheckpointStore:
    def __init__(self, root: str | Path, keep: int = 2) -> None:
        self.root = Path(root)
        self.keep = keep

    def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint, or None."""
        if not self.root.is_dir():
            return None
        for path in sorted(self.root.iterdir(), reverse=True):
            match = _COMPLETE.match(path.name)
            meta_file = path / META_FILE
            if match and meta_file.is_file():
                return Checkpoint(int(match.group(1)), path, json.loads(meta_file.read_text(encoding="utf-8")))
        return None

    def remove_partial(self) -> None:
        """Delete leftovers of an interrupted write (call on rank 0 before training)."""
        if self.root.is_dir():
            for path in self.root.glob(".step-*.partial"):
                shutil.rmtree(path, ignore_errors=True)

    def partial_path(self, step: int) -> Path:
        return self.root / f".step-{step:08d}.partial"

    def final_path(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def commit(self, step: int, meta: dict[str, Any]) -> Path:
        """Seal a fully written partial folder (rank 0, after every rank has written)."""
        partial, final = self.partial_path(step), self.final_path(step)
        meta_file = partial / META_FILE
        with meta_file.open("w", encoding="utf-8") as handle:
            json.dump({"step": step, **meta}, handle, indent=2)
            handle.flush()
            os.fsync(handle.fileno())
        if final.exists():  # the same step written again (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        partial.rename(final)
        self._prune()
        return final

    def _prune(self) -> None:
        complete = sorted(p for p in self.root.iterdir() if _COMPLETE.match(p.name) and (p / META_FILE).is_file())
        for path in complete[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(path: Path, rank: int) -> None:
    torch.save(capture_rng(), path / f"rng-rank{rank:05d}.pt")


def load_rng(path: Path, rank: int) -> None:
    file = path / f"rng-rank{rank:05d}.pt"
    if file.is_file():  # a checkpoint from a different world size: keep the fresh seeds
        restore_rng(torch.load(file, weights_only=False))


# --------------------------------------------------------------------------- SIGTERM


class Preemption:
    """Records SIGTERM, SIGUSR1 and a first Ctrl-C instead of dying at once (a second Ctrl-C stops now)."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> Preemption:
        for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            # Outside the main thread (e.g. a test runner thread) no handler can be installed.
            with contextlib.suppress(ValueError):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()
