"""Launch latency of the operator against a real API server, next to the API server's own floor.

Latency = the job's create request is sent -> its PyTorchJob (the last child) is seen on a
watch, measured by this process, so it includes the operator's reaction, validation,
reference reads, rendering and the child creations. Scenarios: 1 job, then `--jobs` jobs at
once (created by 16 client threads).

The floor, in the same run right after the operator stops: the same burst of jobs, but this
process creates each job's children itself (the exact objects the operator renders, in its
order) with `--workers` threads — the operator's handler concurrency — as soon as the job's
create returns. That is what an operator with no overhead of its own would reach on this API
server and machine, so `p99 / floor` is the operator's own cost. Also prints the operator's
peak RSS (the process and its children).

Run: `.venv/bin/python bench/operator_launch.py [--jobs 200] [--profile operator.pstats]`
(starts its own control plane from the cached binaries, like the e2e tests). `--profile`
runs the operator under yappi (bench/profiled_operator.py) and prints its hottest functions.
"""

from __future__ import annotations

import argparse
import copy
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from kubernetes import client, config, watch
from kubernetes.dynamic import DynamicClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.controlplane import ControlPlane, crd_files, find_bin_dir, install_manifests, running  # noqa: E402
from tests.e2e.operator_process import install_peering, operator_process  # noqa: E402

from kubetune.handlers.kube import Kube  # noqa: E402
from kubetune.handlers.reconcile import validate_with_references  # noqa: E402
from kubetune.handlers.settings import ClusterSettings, WatchSettings  # noqa: E402
from kubetune.render.children import JobInput, render_children  # noqa: E402

GV = ("kubetune.io", "v1alpha1")
CLIENT_THREADS = 16  # threads that send the burst of job creates
UID_PLACEHOLDER = "00000000-0000-0000-0000-000000000000"
SETTLE_SECONDS = 5  # after the burst's last PyTorchJob, before its requests are counted


def job(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "CustomizationJob",
        "metadata": {"name": name},
        "spec": {
            "automodel": {
                "model": "base",
                "dataset": {"training": "train"},
                "parallelism": {"num_nodes": 2, "num_gpus_per_node": 8},
                "batch": {"global_batch_size": 16},
            }
        },
    }


REFERENCES = (
    ("models", {"kind": "Model", "metadata": {"name": "base"}, "spec": {"source": {"pvc": {"claimName": "weights"}}}}),
    (
        "filesets",
        {
            "kind": "FileSet",
            "metadata": {"name": "train"},
            "spec": {"source": {"pvc": {"claimName": "data", "path": "/train.jsonl"}}},
        },
    ),
)


class PeakRss:
    def __init__(self, pid: int) -> None:
        self.process, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                rss = sum(p.memory_info().rss for p in [self.process, *self.process.children(recursive=True)])
            except psutil.Error:
                return
            self.peak = max(self.peak, rss)
            time.sleep(0.1)

    def stop(self) -> int:
        self._stop.set()
        return self.peak


@dataclass(frozen=True)
class Row:
    label: str
    latencies: list[float]
    wall: float

    def p(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def prepare_namespace(core: client.CoreV1Api, custom: client.CustomObjectsApi, namespace: str) -> None:
    core.create_namespace({"metadata": {"name": namespace}})
    for plural, body in REFERENCES:
        custom.create_namespaced_custom_object(*GV, namespace, plural, {"apiVersion": "kubetune.io/v1alpha1", **body})


def launch(
    namespace: str,
    names: list[str],
    custom: client.CustomObjectsApi,
    after_create: Callable[[dict[str, Any]], None] | None = None,
) -> list[float]:
    """Create the jobs at once; seconds from each create request to its PyTorchJob on a watch."""
    seen: dict[str, float] = {}
    ready = threading.Event()

    def watch_children() -> None:
        stream = watch.Watch()
        ready.set()
        for event in stream.stream(
            custom.list_namespaced_custom_object, "kubeflow.org", "v1", namespace, "pytorchjobs", timeout_seconds=900
        ):
            name = event["object"]["metadata"]["labels"]["kubetune.io/job"]
            seen.setdefault(name, time.monotonic())
            if len(seen) == len(names):
                stream.stop()

    watcher = threading.Thread(target=watch_children, daemon=True)
    watcher.start()
    ready.wait()
    time.sleep(0.5)  # let the watch connect before the first create
    sent: dict[str, float] = {}

    def create(name: str) -> None:
        sent[name] = time.monotonic()
        created = custom.create_namespaced_custom_object(*GV, namespace, "customizationjobs", job(name))
        if after_create is not None:
            after_create(created)

    with ThreadPoolExecutor(max_workers=CLIENT_THREADS) as pool:
        list(pool.map(create, names))
    watcher.join(timeout=900)
    missing = [n for n in names if n not in seen]
    if missing:
        raise SystemExit(f"{len(missing)} jobs got no PyTorchJob within 15 minutes, e.g. {missing[:3]}")
    return [seen[n] - sent[n] for n in names]


def rendered_children(namespace: str) -> list[dict[str, Any]]:
    """The children the operator renders for the bench's job (owner uid left as a placeholder)."""
    manifest = {**job("job-0000"), "metadata": {"name": "job-0000", "namespace": namespace}}
    report, _ = validate_with_references(Kube(), manifest, ClusterSettings())
    assert report.valid and report.spec and report.layout and report.references, report.errors
    sources = {role: target.source for role, target in report.references.resolved.items()}
    job_input = JobInput("job-0000", namespace, UID_PLACEHOLDER, report.spec, report.layout, sources)
    return render_children(job_input)


def renamed(children: list[dict[str, Any]], created_job: dict[str, Any]) -> list[dict[str, Any]]:
    """The template's children for another job: its name in every name and label, its uid as owner."""
    name, uid = created_job["metadata"]["name"], created_job["metadata"]["uid"]

    def swap(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        if isinstance(value, str):
            return value.replace("job-0000", name).replace(UID_PLACEHOLDER, uid)
        return value

    return [swap(copy.deepcopy(child)) for child in children]


def floor(cp: ControlPlane, count: int, workers: int) -> tuple[Row, Counter[str], Counter[str]]:
    """The burst with this process as a zero-overhead operator (`workers` threads create children)."""
    namespace = f"floor-{count}"
    custom, core = client.CustomObjectsApi(), client.CoreV1Api()
    prepare_namespace(core, custom, namespace)
    template = rendered_children(namespace)
    dynamic = DynamicClient(client.ApiClient())
    resources = {
        (c["apiVersion"], c["kind"]): dynamic.resources.get(api_version=c["apiVersion"], kind=c["kind"])
        for c in template
    }
    pending: list[Future[None]] = []

    def create_children(created_job: dict[str, Any]) -> None:
        for child in renamed(template, created_job):
            resources[(child["apiVersion"], child["kind"])].create(body=child, namespace=namespace)

    before = cp.served_requests()
    with ThreadPoolExecutor(max_workers=workers) as children_pool:
        started = time.monotonic()
        latencies = launch(
            namespace,
            [f"job-{i:04d}" for i in range(count)],
            custom,
            lambda created: pending.append(children_pool.submit(create_children, created)),
        )
        wall = time.monotonic() - started
    for future in pending:
        future.result()  # surface a refused create
    return Row(f"floor, {count} jobs", latencies, wall), before, cp.served_requests()


def print_requests(label: str, before: Counter[str], after: Counter[str], jobs: int) -> None:
    """The requests sent during a burst, per job, busiest first."""
    sent = after - before
    per_job = ", ".join(f"{key} {count / jobs:.1f}" for key, count in sent.most_common() if count >= jobs / 10)
    print(f"{label}: {sum(sent.values()) / jobs:.1f} requests per job ({per_job})")


def save_profile(pid: int, out: Path, log: Path) -> None:
    """Ask the profiled operator for its profile (SIGUSR1) and print its summary."""
    out.unlink(missing_ok=True)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 300
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(1)
    print(out.read_text(errors="replace") if out.suffix == ".txt" else log.read_text(errors="replace")[-12000:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--workers", type=int, default=WatchSettings().workers, help="handler threads")
    parser.add_argument("--profile", type=Path, help="run the operator under yappi; write pstats here")
    parser.add_argument("--profile-memory", type=Path, help="run the operator under tracemalloc; write its top here")
    parser.add_argument("--no-floor", action="store_true", help="skip the floor (e.g. for a memory-only run)")
    parser.add_argument(
        "--operator-from",
        type=Path,
        help="run the operator of another checkout (e.g. main) against this bench, for a before/after",
    )
    args = parser.parse_args()
    rows: list[Row] = []
    command = None
    profile = args.profile or args.profile_memory
    if profile:
        command = [sys.executable, str(ROOT / "bench" / "profiled_operator.py"), str(profile.resolve())]
        command += ["--memory"] if args.profile_memory else []
    with tempfile.TemporaryDirectory() as tmp, running(find_bin_dir(), Path(tmp)) as cp:
        install_manifests(cp, crd_files())
        install_peering(cp)
        config.load_kube_config(str(cp.kubeconfig))
        custom, core = client.CustomObjectsApi(), client.CoreV1Api()
        log = Path(tmp) / "operator.log"
        env = {"KUBETUNE_WORKERS": str(args.workers)}
        if args.operator_from:
            checkout = args.operator_from.resolve()
            env["PYTHONPATH"] = f"{checkout / 'operator'}:{checkout / 'trainer'}"
        with operator_process(cp, log, command, **env) as operator:
            assert operator.process is not None
            rss = PeakRss(operator.process.pid)
            for label, count in (("1 job", 1), (f"{args.jobs} jobs at once", args.jobs)):
                namespace = f"bench-{count}"
                prepare_namespace(core, custom, namespace)
                before = cp.served_requests()
                started = time.monotonic()
                latencies = launch(namespace, [f"job-{i:04d}" for i in range(count)], custom)
                rows.append(Row(label, latencies, time.monotonic() - started))
            time.sleep(SETTLE_SECONDS)  # the status writes that follow the launch
            burst_requests = (before, cp.served_requests())
            peak = rss.stop()
            if profile:
                save_profile(operator.process.pid, profile, log)
        if not args.no_floor:
            floor_row, *floor_requests = floor(cp, args.jobs, args.workers)
            rows.append(floor_row)
    print(f"\noperator launch latency (create request -> PyTorchJob seen), real kube-apiserver {cp.bin_dir.name}")
    print(f"{'scenario':<22} {'jobs':>5} {'p50 s':>8} {'p95 s':>8} {'p99 s':>8} {'max s':>8} {'jobs/s':>8}")
    for row in rows:
        count = len(row.latencies)
        print(
            f"{row.label:<22} {count:>5} {row.p(50):>8.3f} {row.p(95):>8.3f} {row.p(99):>8.3f} "
            f"{max(row.latencies):>8.3f} {count / row.wall:>8.1f}"
        )
    if not args.no_floor:
        burst, base = rows[1], rows[2]
        print(f"p99 / floor: {burst.p(99) / base.p(99):.2f}×  ({args.workers} handler threads, floor as many)")
    print(f"operator peak RSS: {peak / 2**20:.0f} MiB")
    print_requests(f"operator, {args.jobs} jobs (+{SETTLE_SECONDS} s)", *burst_requests, args.jobs)
    if not args.no_floor:
        print_requests("floor", *floor_requests, args.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
