"""Launch latency of the operator against a real API server: 1 job, then 200 jobs at once.

Latency = the job's create request is sent -> its PyTorchJob (the last child) is seen on a
watch, measured by this process, so it includes the operator's reaction, validation,
reference reads, rendering and the six child creations. Also prints the operator's peak
RSS. Run: `.venv/bin/python bench/operator_launch.py [--jobs 200]` (starts its own
control plane from the cached binaries, like the e2e tests).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
from kubernetes import client, config, watch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.controlplane import crd_files, find_bin_dir, install_manifests, running  # noqa: E402
from tests.e2e.operator_process import install_peering, operator_process  # noqa: E402

GV = ("kubetune.io", "v1alpha1")


def job(name: str) -> dict[str, object]:
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


def launch(namespace: str, names: list[str], custom: client.CustomObjectsApi) -> list[float]:
    seen: dict[str, float] = {}
    ready = threading.Event()

    def watch_children() -> None:
        stream = watch.Watch()
        ready.set()
        for event in stream.stream(
            custom.list_namespaced_custom_object, "kubeflow.org", "v1", namespace, "pytorchjobs", timeout_seconds=600
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
        custom.create_namespaced_custom_object(*GV, namespace, "customizationjobs", job(name))

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(create, names))
    watcher.join(timeout=600)
    missing = [n for n in names if n not in seen]
    if missing:
        raise SystemExit(f"{len(missing)} jobs got no PyTorchJob within 10 minutes, e.g. {missing[:3]}")
    return [seen[n] - sent[n] for n in names]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=200)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, running(find_bin_dir(), Path(tmp)) as cp:
        install_manifests(cp, crd_files())
        install_peering(cp)
        config.load_kube_config(str(cp.kubeconfig))
        custom, core = client.CustomObjectsApi(), client.CoreV1Api()
        with operator_process(cp, Path(tmp) / "operator.log") as operator:
            assert operator.process is not None
            rss = PeakRss(operator.process.pid)
            for label, count in (("1 job", 1), (f"{args.jobs} jobs at once", args.jobs)):
                namespace = f"bench-{count}"
                core.create_namespace({"metadata": {"name": namespace}})
                for plural, body in (
                    (
                        "models",
                        {
                            "apiVersion": "kubetune.io/v1alpha1",
                            "kind": "Model",
                            "metadata": {"name": "base"},
                            "spec": {"source": {"hostPath": {"path": "/models/base"}}},
                        },
                    ),
                    (
                        "filesets",
                        {
                            "apiVersion": "kubetune.io/v1alpha1",
                            "kind": "FileSet",
                            "metadata": {"name": "train"},
                            "spec": {"source": {"pvc": {"claimName": "data", "path": "/train.jsonl"}}},
                        },
                    ),
                ):
                    custom.create_namespaced_custom_object(*GV, namespace, plural, body)
                started = time.monotonic()
                latencies = launch(namespace, [f"job-{i:04d}" for i in range(count)], custom)
                wall = time.monotonic() - started
                rows.append(
                    (
                        label,
                        count,
                        percentile(latencies, 50),
                        percentile(latencies, 95),
                        percentile(latencies, 99),
                        max(latencies),
                        count / wall,
                    )
                )
            peak = rss.stop()
    print(f"\noperator launch latency (create request -> PyTorchJob seen), real kube-apiserver {cp.bin_dir.name}")
    print(f"{'scenario':<20} {'jobs':>5} {'p50 s':>8} {'p95 s':>8} {'p99 s':>8} {'max s':>8} {'jobs/s':>8}")
    for label, count, p50, p95, p99, worst, rate in rows:
        print(f"{label:<20} {count:>5} {p50:>8.3f} {p95:>8.3f} {p99:>8.3f} {worst:>8.3f} {rate:>8.1f}")
    print(f"operator peak RSS: {peak / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
