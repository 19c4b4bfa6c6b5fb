"""The reporters a job's main process uses, the same for both backends.

A console bar on a terminal, else log lines (pods, CI); JSON lines (kubetune run, tests),
Prometheus (KUBETUNE_METRICS_PORT), the job's own status in a cluster
(KUBETUNE_PROGRESS=kubernetes, see kube_status.py) and the requested experiment trackers.
"""

from __future__ import annotations

import sys

from kubetune.api.resources import TrackingStatus
from kubetune.planning.resolved import ResolvedJob
from kubetune_trainer.config import RunOptions
from kubetune_trainer.kube_status import reporter_from_env
from kubetune_trainer.metrics import PrometheusReporter
from kubetune_trainer.progress import ConsoleReporter, JsonLinesReporter, LogLinesReporter, MultiReporter, Reporter
from kubetune_trainer.tracking import start_trackers


def job_reporter(job: ResolvedJob, options: RunOptions) -> MultiReporter:
    reporters: list[Reporter] = []
    if options.progress_bar:
        bar = sys.stderr.isatty()
        reporters.append(ConsoleReporter(description=job.output.name) if bar else LogLinesReporter())
    if options.progress_file:
        reporters.append(JsonLinesReporter(options.progress_file))
    if options.metrics_port:
        reporters.append(PrometheusReporter(options.metrics_port, job.job.namespace, job.job.name))
    cluster = reporter_from_env()
    if cluster is not None:
        reporters.append(cluster)
    trackers = start_trackers(job)
    urls = {name: tracker.run_url for name, tracker in trackers.items()}
    for name, url in urls.items():  # in the log of `kubetune run` and of the pod
        print(f"kubetune: {name} run: {url}", file=sys.stderr, flush=True)
    if cluster is not None and urls:
        tracking = TrackingStatus(mlflowRunUrl=urls.get("mlflow"), wandbRunUrl=urls.get("wandb"))
        cluster.publish({"tracking": tracking.wire()})
    return MultiReporter([*reporters, *trackers.values()])
