"""The unsloth run's reporters and its log notes.

Reporters are the shared ones (`kubetune_trainer.progress`, `metrics`, `kube_status`):
a progress bar, the progress file, Prometheus, W&B/MLflow when the job names them, and
the job's `status.progress` when the operator asked for it (KUBETUNE_PROGRESS=kubernetes).
A single process, so no rank logic.

Notes (device, dtypes, what unsloth's CPU fallback changed or kept) are gathered while
loading and sent as one `start` event once the step count is known: the console bar
takes its length from the first event it sees.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from kubetune.planning.resolved import ResolvedJob
from kubetune_trainer.config import RunOptions
from kubetune_trainer.progress import ConsoleReporter, MultiReporter, ProgressEvent
from kubetune_trainer.reporters import job_reporter

PREFIX = "kubetune-trainer (unsloth)"


def make_reporter(job: ResolvedJob, options: RunOptions) -> MultiReporter:
    return job_reporter(job, options)


class Notes:
    """Log lines gathered before the first progress event."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)

    def extend(self, lines: Iterable[str]) -> None:
        self.lines.extend(lines)

    def flush(self, reporter: MultiReporter, max_steps: int) -> None:
        """One `start` event with every note; printed too when no console bar shows it."""
        text = "\n".join(self.lines)
        reporter.report(ProgressEvent(kind="start", step=0, max_steps=max_steps, message=text))
        if not any(isinstance(r, ConsoleReporter) for r in reporter.reporters):
            for line in text.splitlines():
                print(f"{PREFIX}: {line}", file=sys.stderr)
        self.lines.clear()
