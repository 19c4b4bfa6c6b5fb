"""Which jobs wait for which Model or FileSet, so that a new one nudges exactly those jobs.

Filled by `launch`, which has just resolved the job's references (no second validation of
every new job, as a kopf index needed); emptied when the job launches, fails or is deleted.
An operator that starts (or takes over from another replica) refills it as kopf resumes
every job. Not a kopf index on purpose: kopf holds every handler until an index has seen
all listed objects, which with a bounded number of kopf workers can wait forever (the
workers holding the first jobs wait for the index; the rest never get a worker to fill it).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from kubetune.planning.references import ObjectKey

JobKey = tuple[str, str]
"""(namespace, name) of a CustomizationJob."""


class WaitingJobs:
    """A thread-safe two-way map job <-> the Models/FileSets it waits for."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs_by_reference: dict[ObjectKey, set[JobKey]] = {}
        self._references_by_job: dict[JobKey, set[ObjectKey]] = {}

    def wait(self, job: JobKey, references: Iterable[ObjectKey]) -> None:
        """`job` waits for exactly `references` (what it waited for before is forgotten)."""
        with self._lock:
            self._forget(job)
            keys = set(references)
            if not keys:
                return
            self._references_by_job[job] = keys
            for key in keys:
                self._jobs_by_reference.setdefault(key, set()).add(job)

    def done(self, job: JobKey) -> None:
        """`job` waits for nothing (launched, failed or deleted)."""
        with self._lock:
            self._forget(job)

    def waiting_for(self, reference: ObjectKey) -> list[JobKey]:
        with self._lock:
            return sorted(self._jobs_by_reference.get(reference, ()))

    def __len__(self) -> int:
        with self._lock:
            return len(self._references_by_job)

    def _forget(self, job: JobKey) -> None:
        for key in self._references_by_job.pop(job, ()):
            jobs = self._jobs_by_reference.get(key)
            if jobs is not None:
                jobs.discard(job)
                if not jobs:
                    del self._jobs_by_reference[key]
