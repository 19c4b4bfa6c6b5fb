"""What users hit on a real cluster, with real pods: a two-node job's rendezvous, deleting a
running job, a trainer image that cannot be pulled, a job bigger than any node.

Every status here comes from the kubelet, the scheduler, the training-operator, the
operator pod or the trainer; the tests only apply manifests and read.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from .addons import CHART, claim_host_path, wait_for, wait_rollout
from .cluster import Cluster
from .pods import (
    TINY_AUTOMODEL,
    apply_objects,
    diagnostics,
    get_object,
    input_references,
    job_condition,
    job_manifest,
    progress_losses,
    stage_inputs,
    trainer_pods,
    wait_terminal,
    wait_training,
)

pytestmark = pytest.mark.e2e


def _layout(num_nodes: int, gpus: int = 1) -> dict[str, object]:
    # The global batch must split evenly over the data-parallel ranks (micro 4 each).
    batch = {"global_batch_size": max(8, 4 * num_nodes * gpus), "micro_batch_size": 4}
    return {**TINY_AUTOMODEL, "batch": batch, "parallelism": {"num_nodes": num_nodes, "num_gpus_per_node": gpus}}


def test_a_two_node_job_rendezvous_and_matches_one_process(cluster: Cluster, cluster_namespace: str) -> None:
    """Master + Worker pods meet through the training-operator's Service and variables; data
    parallel over two pods gives the one-process run's loss at every step. In a namespace that
    enforces Pod Security `restricted`: the Worker's init container (the training-operator's,
    from docs/training-operator-init-container.yaml) is admitted too."""
    ns = cluster_namespace
    cluster.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted", check=True)
    stage_inputs(cluster, ns)
    apply_objects(
        cluster,
        [
            *input_references(ns),
            job_manifest(ns, "one", "automodel", _layout(1)),
            job_manifest(ns, "two", "automodel", _layout(2)),
        ],
    )
    for name in ("one", "two"):
        job, _ = wait_terminal(cluster, ns, name)
        assert job["status"]["phase"] == "Completed", f"{name}: {job['status']}\n{diagnostics(cluster, ns)}"
    pods = {p["metadata"]["name"]: p for p in trainer_pods(cluster, ns, "two")}
    assert set(pods) == {"two-train-master-0", "two-train-worker-0"}
    assert [c["name"] for c in pods["two-train-worker-0"]["spec"]["initContainers"]] == ["init-pytorch"]
    for pod in pods.values():
        assert pod["status"]["phase"] == "Succeeded", pod["status"]
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["PET_NNODES"] == "2" and env["MASTER_ADDR"] == "two-train-master-0", env
    assert get_object(cluster, "customizationjob", ns, "two")["status"]["layout"]["dataParallelSize"] == 2

    one = progress_losses(claim_host_path(cluster.cp, ns, "one-output"))
    two = progress_losses(claim_host_path(cluster.cp, ns, "two-output"))
    steps = get_object(cluster, "customizationjob", ns, "two")["status"]["progress"]["maxSteps"]
    assert sorted(one) == sorted(two) == list(range(1, steps + 1)), (one, two)
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-4), (step, one, two)


def test_deleting_a_running_job_cancels_it_and_stops_its_pods(cluster: Cluster, cluster_namespace: str) -> None:
    ns = cluster_namespace
    stage_inputs(cluster, ns)
    long_run = {**TINY_AUTOMODEL, "schedule": {"epochs": 500, "seed": 1}}  # hours at this pace: never finishes
    apply_objects(cluster, [*input_references(ns), job_manifest(ns, "gone", "automodel", long_run)])
    wait_training(cluster, ns, "gone")
    # Watch the job while it is deleted: the operator's finalizer records Cancelled first.
    phases: list[tuple[str, str | None]] = []
    watcher = cluster.cp.kubectl_popen("get", "ctj", "gone", "-n", ns, "--watch", "--output-watch-events", "-o", "json")
    watching = threading.Event()

    def read() -> None:
        for event in _watch_events(watcher.stdout):
            phases.append(event)
            watching.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert watching.wait(60), "the watch did not start"  # deleting before it would miss the events
        deleted = cluster.kubectl("delete", "ctj", "gone", "-n", ns, "--timeout=120s", timeout=150)
        assert deleted.returncode == 0, deleted.stderr
        reader.join(30)
    finally:
        watcher.kill()
    assert phases and phases[-1] == ("DELETED", "Cancelled"), phases
    # The kubelet stops the trainer, garbage collection takes every child with it.
    wait_for(lambda: not trainer_pods(cluster, ns, "gone"), 120, "the trainer pod to be gone")
    for kind, name in (("pytorchjob", "gone-train"), ("pvc", "gone-output"), ("configmap", "gone-config")):
        wait_for(
            lambda kind=kind, name=name: cluster.kubectl("get", kind, name, "-n", ns).returncode != 0,
            120,
            f"{kind} {name} to be garbage-collected",
        )


def _watch_events(stream: object) -> Iterator[tuple[str, str | None]]:
    """(event type, phase) from `kubectl get --watch --output-watch-events -o json`."""
    decoder = json.JSONDecoder()
    buffer = ""
    for chunk in iter(lambda: stream.readline(), ""):  # type: ignore[attr-defined]
        buffer += chunk
        while buffer.strip():
            try:
                event, end = decoder.raw_decode(buffer.lstrip())
            except json.JSONDecodeError:
                break
            buffer = buffer.lstrip()[end:]
            yield event["type"], (event["object"].get("status") or {}).get("phase")


@contextmanager
def chart_values(cluster: Cluster, values: dict[str, object]) -> Iterator[None]:
    """`helm upgrade --reuse-values` with ``values`` (the operator pod restarts with them);
    afterwards back to the values the cluster was installed with."""
    _helm_upgrade(cluster, values, reuse=True)
    try:
        yield
    finally:
        _helm_upgrade(cluster, {}, reuse=False)


def _helm_upgrade(cluster: Cluster, values: dict[str, object], *, reuse: bool) -> None:
    path = cluster.workdir / "helm-upgrade-values.yaml"
    path.write_text(yaml.safe_dump(values))
    installed = cluster.workdir / "helm-values-kubetune.yaml"  # what install_kubetune used
    argv = ["upgrade", "kubetune", str(CHART), "-n", cluster.operator_namespace, "-f", str(installed)]
    argv += ["--reuse-values", "-f", str(path)] if reuse else ["--reset-values", "-f", str(installed)]
    res = cluster.cp.helm(*argv)
    assert res.returncode == 0, res.stderr
    wait_rollout(cluster.cp, cluster.operator_namespace, "kubetune")


@pytest.fixture
def missing_trainer_image(cluster: Cluster) -> Iterator[str]:
    """The chart upgraded to a trainer image that no registry has."""
    with chart_values(cluster, {"trainer": {"image": {"tag": "does-not-exist", "pullPolicy": "IfNotPresent"}}}):
        yield "does-not-exist"


def test_a_trainer_image_that_cannot_be_pulled_is_named(
    cluster: Cluster, cluster_namespace: str, missing_trainer_image: str
) -> None:
    ns = cluster_namespace
    stage_inputs(cluster, ns)
    apply_objects(cluster, [*input_references(ns), job_manifest(ns, "nopull", "automodel", dict(TINY_AUTOMODEL))])

    def pull_problem() -> dict[str, object] | None:
        cond = job_condition(cluster, ns, "nopull", "Running")
        return cond if cond and cond["reason"] in ("ErrImagePull", "ImagePullBackOff") else None

    cond = wait_for(pull_problem, 180, "a condition naming the image pull error")
    assert "cannot pull the trainer image" in str(cond["message"]), cond
    assert missing_trainer_image in str(cond["message"]), cond


def test_more_gpus_than_any_node_has_is_unschedulable(cluster: Cluster, cluster_namespace: str) -> None:
    ns = cluster_namespace
    stage_inputs(cluster, ns)
    apply_objects(cluster, [*input_references(ns), job_manifest(ns, "huge", "automodel", _layout(1, gpus=16))])

    def unschedulable() -> dict[str, object] | None:
        cond = job_condition(cluster, ns, "huge", "Running")
        return cond if cond and cond["reason"] == "Unschedulable" else None

    cond = wait_for(unschedulable, 180, "a condition naming Unschedulable")
    assert "nvidia.com/gpu" in str(cond["message"]), cond
    assert get_object(cluster, "customizationjob", ns, "huge")["status"]["phase"] == "Pending"


def test_a_container_over_its_memory_limit_is_oomkilled_and_says_what_to_change(
    cluster: Cluster, cluster_namespace: str
) -> None:
    """The kernel kills the trainer at the chart's memory limit; the job fails with reason
    OOMKilled and a message naming the knobs, never a bare exit code."""
    ns = cluster_namespace
    stage_inputs(cluster, ns)
    tight = {"trainer": {"resources": {"limits": {"memory": "200Mi"}}}, "backoffLimit": 0}
    with chart_values(cluster, tight):
        apply_objects(cluster, [*input_references(ns), job_manifest(ns, "oom", "automodel", dict(TINY_AUTOMODEL))])
        job, _ = wait_terminal(cluster, ns, "oom")
    status = job["status"]
    assert status["phase"] == "Failed", f"{status}\n{diagnostics(cluster, ns)}"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "OOMKilled", failed
    for knob in ("micro_batch_size", "max_seq_length", "more GPUs"):
        assert knob in failed["message"], failed
    # The failed PyTorchJob's pods are gone (backoff limit reached); its template says why.
    pytorchjob = get_object(cluster, "pytorchjob", ns, "oom-train")
    container = pytorchjob["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["memory"] == "200Mi"


def _events(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "progress.jsonl").read_text().splitlines()]


def _step_events(folder: Path) -> list[int]:
    return [int(e["step"]) for e in _events(folder) if e["kind"] == "step"]


def _resumed_at(folder: Path) -> list[int]:
    """The step each resumed pod started from (its `start` event says "resumed from ...")."""
    return [int(e["step"]) for e in _events(folder) if e["kind"] == "start" and "resumed" in str(e["message"])]


def test_a_preempted_pod_resumes_from_its_checkpoint_with_the_same_losses(
    cluster: Cluster, cluster_namespace: str
) -> None:
    """The trainer pod is deleted mid-run (what a preemption or node drain does): it saves on
    SIGTERM, the training-operator recreates the pod, the new pod resumes from the newest
    checkpoint, and the run ends where an uninterrupted one does."""
    ns = cluster_namespace
    stage_inputs(cluster, ns)
    section = {**TINY_AUTOMODEL, "schedule": {"epochs": 40, "seed": 1}}  # 280 steps
    apply_objects(
        cluster,
        [*input_references(ns), job_manifest(ns, "steady", "automodel", section),
         job_manifest(ns, "preempted", "automodel", section)],
    )  # fmt: skip
    wait_training(cluster, ns, "preempted")
    first = trainer_pods(cluster, ns, "preempted")[0]["metadata"]["uid"]
    deleted = cluster.kubectl("delete", "pod", "preempted-train-master-0", "-n", ns, "--wait=false")
    assert deleted.returncode == 0, deleted.stderr
    for name in ("steady", "preempted"):
        job, _ = wait_terminal(cluster, ns, name)
        assert job["status"]["phase"] == "Completed", f"{name}: {job['status']}\n{diagnostics(cluster, ns)}"
    (pod,) = trainer_pods(cluster, ns, "preempted")
    assert pod["metadata"]["uid"] != first, "the training-operator did not recreate the pod"

    folder = claim_host_path(cluster.cp, ns, "preempted-output")
    # Both pods appended to progress.jsonl: the second one resumed from the checkpoint the
    # first wrote on SIGTERM (not from step 0), and the step count continues from there.
    (resumed,) = _resumed_at(folder)
    steps = _step_events(folder)
    assert resumed > 0 and steps[steps.index(resumed) + 1] == resumed + 1, (resumed, steps)
    last = get_object(cluster, "customizationjob", ns, "preempted")["status"]["progress"]["maxSteps"]
    steady = progress_losses(claim_host_path(cluster.cp, ns, "steady-output"))
    preempted = progress_losses(folder)
    assert max(preempted) == max(steady) == last
    assert preempted[last] == pytest.approx(steady[last], abs=1e-4)


def test_suspend_stops_the_pods_after_a_checkpoint_and_resume_continues(
    cluster: Cluster, cluster_namespace: str
) -> None:
    ns = cluster_namespace
    stage_inputs(cluster, ns)
    section = {**TINY_AUTOMODEL, "schedule": {"epochs": 40, "seed": 1}}  # 280 steps
    apply_objects(cluster, [*input_references(ns), job_manifest(ns, "paused", "automodel", section)])
    wait_training(cluster, ns, "paused")
    patch = cluster.kubectl("patch", "ctj", "paused", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    assert patch.returncode == 0, patch.stderr
    wait_for(
        lambda: (
            get_object(cluster, "customizationjob", ns, "paused")["status"]["phase"] == "Suspended"
            and not trainer_pods(cluster, ns, "paused")
        ),
        120,
        "phase Suspended and no trainer pod",
    )
    folder = claim_host_path(cluster.cp, ns, "paused-output")
    saved = sorted(p.name for p in (folder / "checkpoints").iterdir())
    assert saved, "the trainer saved no checkpoint on SIGTERM"
    last_step = _step_events(folder)[-1]

    patch = cluster.kubectl("patch", "ctj", "paused", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    assert patch.returncode == 0, patch.stderr
    job, _ = wait_terminal(cluster, ns, "paused")
    assert job["status"]["phase"] == "Completed", f"{job['status']}\n{diagnostics(cluster, ns)}"
    (resumed,) = _resumed_at(folder)
    assert 0 < resumed <= last_step, f"resumed at step {resumed} after {last_step} (checkpoints {saved})"
    steps = _step_events(folder)
    assert steps[-1] == job["status"]["progress"]["maxSteps"], steps[-5:]


def test_an_operator_pod_deleted_during_a_burst_of_50_jobs_leaves_none_behind(
    cluster: Cluster, cluster_namespace: str
) -> None:
    """The operator pod dies (deleted) while 50 jobs are being created; its replacement from
    the Deployment launches every one, with exactly one set of children each. The jobs are
    suspended, so the launch is the whole work (no pods compete for the 2 CPUs)."""
    ns = cluster_namespace
    stage_inputs(cluster, ns)
    names = [f"burst-{i:02d}" for i in range(50)]
    section = dict(TINY_AUTOMODEL)
    jobs = [job_manifest(ns, name, "automodel", section) for name in names]
    for job in jobs:
        job["spec"]["suspend"] = True
    apply_objects(cluster, [*input_references(ns), *jobs[:15]])
    selector = "app.kubernetes.io/name=kubetune,app.kubernetes.io/component=operator"
    old = cluster.kubectl("get", "pods", "-n", cluster.operator_namespace, "-l", selector, "-o", "name").stdout.split()
    killed = cluster.kubectl("delete", "pods", "-n", cluster.operator_namespace, "-l", selector, "--wait=false")
    assert killed.returncode == 0 and old, killed.stderr
    apply_objects(cluster, jobs[15:])

    def launched() -> bool:
        items = json.loads(cluster.kubectl("get", "ctj", "-n", ns, "-o", "json").stdout)["items"]
        return len(items) == 50 and all((j.get("status") or {}).get("phase") == "Suspended" for j in items)

    wait_for(launched, 600, "all 50 jobs launched and Suspended", interval_s=3)
    new = cluster.kubectl("get", "pods", "-n", cluster.operator_namespace, "-l", selector, "-o", "name").stdout.split()
    assert new and not set(new) & set(old), (old, new)
    for kind in ("pytorchjob", "configmap", "serviceaccount", "role", "rolebinding", "pvc"):
        items = json.loads(cluster.kubectl("get", kind, "-n", ns, "-l", "kubetune.io/job", "-o", "json").stdout)
        owners = sorted(item["metadata"]["labels"]["kubetune.io/job"] for item in items["items"])
        assert owners == names, f"{kind}: {len(owners)} for 50 jobs"
    assert not trainer_pods(cluster, ns, "burst-00")
