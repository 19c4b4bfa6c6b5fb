"""Prometheus metrics and the health endpoint of the operator.

`kubetune_jobs{phase,backend}` is a gauge over the jobs the operator currently knows,
kept from the phases it writes (and sees on restart), not from a second list call.
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.split("?")[0] == "/metrics":
            body, kind = generate_latest(REGISTRY), CONTENT_TYPE_LATEST
        elif self.path.split("?")[0] in ("/healthz", "/readyz"):
            body, kind = b"ok\n", "text/plain"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # scrapes every few seconds would flood the operator's log


def serve(port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Serve /metrics and /healthz on a daemon thread; returns the server (port 0 = any free port)."""
    server = ThreadingHTTPServer((host, port), _Handler)
    threading.Thread(target=server.serve_forever, name="kubetune-metrics", daemon=True).start()
    return server
