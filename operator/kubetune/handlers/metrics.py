"""Prometheus metrics of the operator (the health endpoint is kopf's own, see operator.py).

`kubetune_jobs{phase,backend}` is a gauge over the jobs the operator currently knows,
kept from the phases it writes (and sees on restart), not from a second list call.
"""

from __future__ import annotations

import threading
from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()
JOBS = Gauge("kubetune_jobs", "CustomizationJobs by phase and backend", ["phase", "backend"], registry=REGISTRY)
VALIDATION_FAILURES = Counter(
    "kubetune_validation_failures",
    "Jobs refused by validation, by the first rule they broke",
    ["reason"],
    registry=REGISTRY,
)
RECONCILE_DURATION = Histogram(
    "kubetune_reconcile_duration_seconds",
    "Time to reconcile one CustomizationJob event",
    registry=REGISTRY,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
LAUNCH_LATENCY = Histogram(
    "kubetune_launch_latency_seconds",
    "Job created -> all children created",
    registry=REGISTRY,
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
)


class JobPhases:
    """Phase and backend of each job by uid; the gauge is recomputed from it on every change."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, tuple[str, str]] = {}

    def set(self, uid: str, phase: str, backend: str) -> None:
        with self._lock:
            self._jobs[uid] = (phase, backend)
            self._publish()

    def known(self) -> int:
        """How many jobs this replica has seen (the health probe reports it)."""
        with self._lock:
            return len(self._jobs)

    def forget(self, uid: str) -> None:
        with self._lock:
            self._jobs.pop(uid, None)
            self._publish()

    def _publish(self) -> None:
        counts = Tally(self._jobs.values())
        JOBS.clear()
        for (phase, backend), count in counts.items():
            JOBS.labels(phase=phase, backend=backend).set(count)


PHASES = JobPhases()


def serve(port: int, host: str = "0.0.0.0") -> None:
    """Serve /metrics on a daemon thread (prometheus_client's own server)."""
    start_http_server(port, addr=host, registry=REGISTRY)
