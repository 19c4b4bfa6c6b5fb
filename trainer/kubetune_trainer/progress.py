"""Progress reporting: one small interface, several sinks.

A training loop (either backend) emits `ProgressEvent`s through a `Reporter`. Only rank 0
reports; other ranks get `NullReporter`. Sinks shipped here:

- `ConsoleReporter`: a tqdm progress bar (for `kubetune run` and interactive use);
- `LogLinesReporter`: plain log lines, throttled, for `kubectl logs` and CI logs, where a
  bar's carriage returns would pile up into one unreadable line;
- `JsonLinesReporter`: one JSON object per event appended to a file (tests, log shippers,
  and the operator's transport, which tails it or replaces it with a status patcher);
- `MultiReporter`: fan-out to several sinks.

`kubetune_trainer.metrics.PrometheusReporter` exports the same events as gauges.

The cluster transport (patching `CustomizationJob.status.progress`) implements the same
Protocol; `ProgressEvent.to_status()` builds the operator's `status.progress` model.
A reporter must never raise into the training loop for a transport problem: it logs and
carries on (training matters more than its progress bar).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO

from tqdm import tqdm  # type: ignore[import-untyped]

from kubetune.api.resources import ProgressStatus

EventKind = Literal["start", "step", "validation", "checkpoint", "end"]


@dataclass(frozen=True)
class ProgressEvent:
    """A snapshot of training progress. Fields not known yet are None."""

    kind: EventKind
    step: int
    max_steps: int
    epoch: float = 0.0
    """Fractional epoch: 1.5 = halfway through the second epoch."""
    num_epochs: int = 1
    loss: float | None = None
    val_loss: float | None = None
    lr: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    checkpoint_path: str | None = None
    message: str | None = None
    extra: dict[str, float] = field(default_factory=dict)
    """Mode-specific scalars (e.g. `kl` and `ce` for distillation)."""
    time: float = field(default_factory=time.time)

    @property
    def percentage_done(self) -> float:
        return 100.0 * self.step / self.max_steps if self.max_steps else 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["percentage_done"] = round(self.percentage_done, 2)
        return data

    def to_status(self) -> ProgressStatus:
        """`status.progress` of a CustomizationJob (the operator's model; unknown values stay unset)."""
        return ProgressStatus(
            step=self.step,
            maxSteps=self.max_steps,
            epoch=round(self.epoch, 4),
            numEpochs=self.num_epochs,
            percentageDone=round(self.percentage_done, 2),
            trainLoss=self.loss,
            valLoss=self.val_loss,
            trainLr=self.lr,
            tokensPerSecond=self.tokens_per_second,
            etaSeconds=self.eta_seconds,
            checkpointPath=self.checkpoint_path,
            updatedAt=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.time)),
        )


class Reporter(Protocol):
    """Receives progress events from rank 0. Implementations must not raise."""

    def report(self, event: ProgressEvent) -> None:
        """Called at start, after every optimizer step, validation, checkpoint, and at the end."""

    def close(self) -> None:
        """Flush and release resources; called once, also when training fails."""


class NullReporter:
    def report(self, event: ProgressEvent) -> None:
        pass

    def close(self) -> None:
        pass


class MultiReporter:
    def __init__(self, reporters: list[Reporter]) -> None:
        self.reporters = reporters

    def report(self, event: ProgressEvent) -> None:
        for reporter in self.reporters:
            reporter.report(event)

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()


class ConsoleReporter:
    """A tqdm bar over optimizer steps, with loss, lr and tokens/s in its postfix."""

    def __init__(self, stream: TextIO | None = None, description: str = "training") -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.description = description
        self.bar: tqdm[Any] | None = None
        self.last_val_loss: float | None = None
        self.postfix: dict[str, str] = {}

    def report(self, event: ProgressEvent) -> None:
        if self.bar is None:
            self.bar = tqdm(
                total=event.max_steps,
                initial=event.step,
                desc=self.description,
                unit="step",
                file=self.stream,
                dynamic_ncols=True,
            )
        if event.val_loss is not None:
            self.last_val_loss = event.val_loss
        if event.kind == "step":
            self.bar.update(event.step - self.bar.n)
            postfix: dict[str, str] = {"epoch": f"{event.epoch:.2f}"}
            if event.loss is not None:
                postfix["loss"] = f"{event.loss:.4f}"
            if self.last_val_loss is not None:
                postfix["val_loss"] = f"{self.last_val_loss:.4f}"
            if event.lr is not None:
                postfix["lr"] = f"{event.lr:.2e}"
            if event.tokens_per_second is not None:
                postfix["tok/s"] = f"{event.tokens_per_second:,.0f}"
            self.postfix = postfix
            self.bar.set_postfix(postfix, refresh=False)
        elif event.kind == "validation" and event.val_loss is not None:
            self.postfix["val_loss"] = f"{event.val_loss:.4f}"
            self.bar.set_postfix(self.postfix, refresh=True)
            self.bar.write(f"step {event.step}: val_loss {event.val_loss:.4f}", file=self.stream)
        elif event.kind == "checkpoint" and event.checkpoint_path:
            self.bar.write(f"step {event.step}: checkpoint {event.checkpoint_path}", file=self.stream)
        elif event.kind in ("start", "end") and event.message:
            self.bar.write(event.message, file=self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class LogLinesReporter:
    """One line per step at most every ``interval_s`` (the first and last step always),
    plus every validation, checkpoint, start and end message."""

    def __init__(self, stream: TextIO | None = None, interval_s: float = 10.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self.last_line = 0.0

    def _write(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def report(self, event: ProgressEvent) -> None:
        if event.kind == "step":
            now = time.monotonic()
            first_or_last = event.step <= 1 or event.step == event.max_steps
            if not first_or_last and now - self.last_line < self.interval_s:
                return
            self.last_line = now
            parts = [f"step {event.step}/{event.max_steps} ({event.percentage_done:.1f}%)", f"epoch {event.epoch:.2f}"]
            if event.loss is not None:
                parts.append(f"loss {event.loss:.4f}")
            if event.lr is not None:
                parts.append(f"lr {event.lr:.2e}")
            if event.tokens_per_second is not None:
                parts.append(f"{event.tokens_per_second:,.0f} tok/s")
            if event.eta_seconds is not None and event.step < event.max_steps:
                parts.append(f"eta {_duration(event.eta_seconds)}")
            self._write(", ".join(parts))
        elif event.kind == "validation" and event.val_loss is not None:
            self._write(f"step {event.step}: val_loss {event.val_loss:.4f}")
        elif event.kind == "checkpoint" and event.checkpoint_path:
            self._write(f"step {event.step}: checkpoint {event.checkpoint_path}")
        elif event.kind in ("start", "end") and event.message:
            self._write(event.message)

    def close(self) -> None:
        pass


class JsonLinesReporter:
    """Appends each event as one JSON line; the file survives restarts (resume appends)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file: TextIO | None = self.path.open("a", encoding="utf-8")

    def report(self, event: ProgressEvent) -> None:
        if self.file is None:
            return
        try:
            self.file.write(json.dumps(event.to_json()) + "\n")
            self.file.flush()
        except OSError as error:  # a full disk must not kill training
            print(f"kubetune: progress file {self.path}: {error}", file=sys.stderr)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def read_events(path: str | Path) -> list[ProgressEvent]:
    """Parse a JsonLinesReporter file back into events (tests and tools)."""
    events = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        data = json.loads(line)
        data.pop("percentage_done", None)
        events.append(ProgressEvent(**data))
    return events


class Throughput:
    """Tokens/s and ETA from a moving window of step times."""

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self.samples: list[tuple[float, int]] = []

    def add(self, seconds: float, tokens: int) -> None:
        self.samples.append((seconds, tokens))
        del self.samples[: -self.window]

    def tokens_per_second(self) -> float | None:
        seconds = sum(s for s, _ in self.samples)
        return sum(t for _, t in self.samples) / seconds if seconds > 0 else None

    def eta(self, steps_left: int) -> float | None:
        if not self.samples:
            return None
        return steps_left * sum(s for s, _ in self.samples) / len(self.samples)
