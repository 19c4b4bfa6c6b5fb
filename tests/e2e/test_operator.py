"""The operator end to end: `kubetune operator` as a process against the real API server.

There is no kubelet or training-operator here, so the tests play their part through the
API: they set the PyTorchJob's / Job's status and create pods with the status a kubelet
would report, exactly the objects the operator reads.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config, watch

from .controlplane import ControlPlane
from .operator_process import OperatorProcess, get_json, install_peering, operator_process, wait_for

pytestmark = pytest.mark.e2e

GV = "kubetune.io/v1alpha1"


def model(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": GV,
        "kind": "Model",
        "metadata": {"name": name},
        "spec": {"source": {"hostPath": {"path": f"/models/{name}"}}, **spec},
    }


def fileset(name: str) -> dict[str, Any]:
    return {
        "apiVersion": GV,
        "kind": "FileSet",
        "metadata": {"name": name},
        "spec": {"source": {"pvc": {"claimName": "datasets", "path": f"/{name}.jsonl"}}},
    }


def automodel_job(name: str, **section: Any) -> dict[str, Any]:
    body = {
        "model": "base",
        "dataset": {"training": "train"},
        "parallelism": {"num_nodes": 2, "num_gpus_per_node": 2},
        "batch": {"global_batch_size": 8, "micro_batch_size": 1},
        **section,
    }
    return {"apiVersion": GV, "kind": "CustomizationJob", "metadata": {"name": name}, "spec": {"automodel": body}}


def unsloth_job(name: str) -> dict[str, Any]:
    return {
        "apiVersion": GV,
        "kind": "CustomizationJob",
        "metadata": {"name": name},
        "spec": {
            "unsloth": {"model": {"name": "base"}, "dataset": {"path": "train"}, "output": {"name": f"{name}-adapter"}}
        },
    }


def apply(cp: ControlPlane, namespace: str, *objects: dict[str, Any]) -> None:
    for obj in objects:
        cp.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(obj), check=True)


def job_status(cp: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    job = get_json(cp, "ctj", name, "-n", namespace) or {}
    status: dict[str, Any] = job.get("status") or {}
    return status


def wait_phase(cp: ControlPlane, namespace: str, name: str, phase: str, timeout: float = 30) -> dict[str, Any]:
    return wait_for(
        f"job {name} to reach {phase}",
        lambda: (s := job_status(cp, namespace, name)).get("phase") == phase and s,
        timeout=timeout,
    )


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status.get("conditions", [])}


def set_status(cp: ControlPlane, namespace: str, kind: str, name: str, status: dict[str, Any]) -> None:
    cp.kubectl(
        "patch",
        kind,
        name,
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
        check=True,
    )


def add_pod(cp: ControlPlane, namespace: str, job: str, pod: str, status: dict[str, Any]) -> None:
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod, "labels": {"app.kubernetes.io/managed-by": "kubetune", "kubetune.io/job": job}},
        "spec": {"containers": [{"name": "pytorch", "image": "trainer:test"}]},
    }
    apply(cp, namespace, manifest)
    set_status(cp, namespace, "pod", pod, status)


PYTORCHJOB_RUNNING = {
    "conditions": [
        {
            "type": "Created",
            "status": "True",
            "reason": "PyTorchJobCreated",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        },
        {
            "type": "Running",
            "status": "True",
            "reason": "PyTorchJobRunning",
            "message": "running",
            "lastTransitionTime": "2026-01-01T00:00:05Z",
        },
    ]
}


@pytest.fixture(scope="module")
def operator(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    install_peering(control_plane)
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    with operator_process(control_plane, log, KUBETUNE_GPU_MEMORY_GIB="80") as process:
        yield process


@pytest.fixture
def refs(control_plane: ControlPlane, namespace: str) -> str:
    apply(control_plane, namespace, model("base", tokenizer="llama3", numParameters=1_000_000_000), fileset("train"))
    return namespace


def test_automodel_job_launches_a_pytorchjob(control_plane: ControlPlane, operator: OperatorProcess, refs: str) -> None:
    apply(control_plane, refs, automodel_job("lora"))
    status = wait_phase(control_plane, refs, "lora", "Pending")
    assert status["layout"]["totalGpus"] == 4 and status["layout"]["gradientAccumulationSteps"] == 2
    assert conditions(status)["Launched"]["status"] == "True"
    pytorchjob = get_json(control_plane, "pytorchjob", "lora-train", "-n", refs)
    assert pytorchjob is not None, "the real PyTorchJob schema accepted what the operator rendered"
    replicas = pytorchjob["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 1)
    job_uid = get_json(control_plane, "ctj", "lora", "-n", refs)["metadata"]["uid"]  # type: ignore[index]
    for kind, name in (
        ("configmap", "lora-config"),
        ("serviceaccount", "lora-trainer"),
        ("role", "lora-progress"),
        ("rolebinding", "lora-progress"),
        ("pvc", "lora-output"),
    ):
        child = get_json(control_plane, kind, name, "-n", refs)
        assert child is not None, f"{kind} {name} missing"
        assert child["metadata"]["ownerReferences"][0]["uid"] == job_uid
    header = control_plane.kubectl("get", "ctj", "lora", "-n", refs, check=True).stdout.split()
    assert "automodel" in header and "Pending" in header


def test_a_launch_writes_its_status_once_and_reads_no_pods(
    control_plane: ControlPlane, operator: OperatorProcess, refs: str
) -> None:
    """A new workload's watch event finds nothing to add (the launch said it already), and no
    pods are listed for a workload no controller has picked up: a burst of launches costs the
    API server only what the launch needs. Counted from the audit log, in the job's namespace
    only, so other tests' jobs and namespace deletions do not count."""
    apply(control_plane, refs, automodel_job("lean"))
    status = wait_phase(control_plane, refs, "lean", "Pending")
    running = conditions(status)["Running"]
    assert (running["status"], running["reason"]) == ("False", "WaitingForPods")
    time.sleep(3)  # the PyTorchJob's own watch event reaches the operator meanwhile
    sent = control_plane.namespace_requests(refs)
    assert sent["create pytorchjobs"] == 1, sent
    assert sent["patch customizationjobs/status"] == 1, sent
    assert sent["list pods"] == 0 and sent["get pytorchjobs"] == 0, sent


def test_unsloth_job_launches_a_batch_job(control_plane: ControlPlane, operator: OperatorProcess, refs: str) -> None:
    apply(control_plane, refs, unsloth_job("qlora"))
    wait_phase(control_plane, refs, "qlora", "Pending")
    job = get_json(control_plane, "job.batch", "qlora-train", "-n", refs)
    assert job is not None
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}


def test_a_job_waits_for_a_missing_model_then_starts(
    control_plane: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    apply(control_plane, namespace, fileset("train"), automodel_job("waiting"))
    status = wait_phase(control_plane, namespace, "waiting", "Created")
    wait_for(
        "the ReferencesResolved=False condition",
        lambda: conditions(job_status(control_plane, namespace, "waiting")).get("ReferencesResolved"),
    )
    resolved = conditions(job_status(control_plane, namespace, "waiting"))["ReferencesResolved"]
    assert resolved["status"] == "False" and "Model " + namespace + "/base does not exist yet" in resolved["message"]
    assert get_json(control_plane, "pytorchjob", "waiting-train", "-n", namespace) is None
    del status
    apply(control_plane, namespace, model("base"))
    wait_phase(control_plane, namespace, "waiting", "Pending", timeout=20)


def test_reference_rules_fail_the_job_with_the_reason(
    control_plane: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    apply(
        control_plane,
        namespace,
        model("base", tokenizer="llama3"),
        model("teacher", tokenizer="qwen3"),
        fileset("train"),
        automodel_job("distill", training={"training_type": "distillation", "teacher_model": "teacher"}),
    )
    status = wait_phase(control_plane, namespace, "distill", "Failed")
    validated = conditions(status)["Validated"]
    assert (validated["status"], validated["reason"]) == ("False", "TokenizerMismatch")
    assert "spec.automodel.training.teacher_model" in validated["message"]


def test_child_status_drives_the_phase_and_oom_is_reported(
    control_plane: ControlPlane, operator: OperatorProcess, refs: str
) -> None:
    apply(control_plane, refs, automodel_job("oom"))
    wait_phase(control_plane, refs, "oom", "Pending")
    set_status(control_plane, refs, "pytorchjob", "oom-train", PYTORCHJOB_RUNNING)
    add_pod(control_plane, refs, "oom", "oom-train-master-0", {"phase": "Running"})
    wait_phase(control_plane, refs, "oom", "Running")
    add_pod(
        control_plane,
        refs,
        "oom",
        "oom-train-worker-0",
        {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "name": "pytorch",
                    "image": "trainer:test",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
                }
            ],
        },
    )
    set_status(
        control_plane,
        refs,
        "pytorchjob",
        "oom-train",
        {
            "conditions": [
                *PYTORCHJOB_RUNNING["conditions"],
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "PyTorchJobFailed",
                    "message": "worker 0 failed",
                    "lastTransitionTime": "2026-01-01T00:01:00Z",
                },
            ]
        },
    )
    status = wait_phase(control_plane, refs, "oom", "Failed")
    failed = conditions(status)["Failed"]
    assert failed["reason"] == "OOMKilled" and "oom-train-worker-0" in failed["message"]


def test_success_creates_the_output_model(control_plane: ControlPlane, operator: OperatorProcess, refs: str) -> None:
    job = unsloth_job("done")
    job["spec"]["unsloth"]["output"]["description"] = "support bot, v1"
    apply(control_plane, refs, job)
    wait_phase(control_plane, refs, "done", "Pending")
    # the trainer's last progress patch (its RBAC allows exactly this) carries the final losses
    control_plane.kubectl(
        "patch",
        "ctj",
        "done",
        "-n",
        refs,
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status":{"progress":{"trainLoss":0.25,"valLoss":0.5}}}',
        check=True,
    )
    set_status(
        control_plane,
        refs,
        "job.batch",
        "done-train",
        {
            "conditions": [
                {
                    "type": "Complete",
                    "status": "True",
                    "lastProbeTime": "2026-01-01T00:00:00Z",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                },
                {
                    "type": "SuccessCriteriaMet",
                    "status": "True",
                    "lastProbeTime": "2026-01-01T00:00:00Z",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                },
            ],
            "startTime": "2026-01-01T00:00:00Z",
            "completionTime": "2026-01-01T00:00:00Z",
            "succeeded": 1,
        },
    )
    status = wait_phase(control_plane, refs, "done", "Completed")
    assert status["output"] == {"name": "done-adapter", "type": "adapter", "path": "/done-adapter"}
    output = get_json(control_plane, "models.kubetune.io", "done-adapter", "-n", refs)
    assert output is not None
    assert output["spec"]["adapter"] == {"baseModel": "base"}
    assert output["spec"]["source"] == {"pvc": {"claimName": "done-output", "path": "/done-adapter"}}
    assert output["spec"]["tokenizer"] == "llama3"
    assert output["spec"]["description"] == "support bot, v1"
    assert output["spec"]["training"] == {
        "job": f"{refs}/done",
        "baseModel": "base",
        "backend": "unsloth",
        "trainingType": "sft",
        "finetuningType": "lora",
        "finalLoss": 0.25,
        "finalValLoss": 0.5,
    }


def test_suspend_and_resume(control_plane: ControlPlane, operator: OperatorProcess, refs: str) -> None:
    apply(control_plane, refs, automodel_job("pause"))
    wait_phase(control_plane, refs, "pause", "Pending")
    control_plane.kubectl(
        "patch", "ctj", "pause", "-n", refs, "--type=merge", "-p", '{"spec":{"suspend":true}}', check=True
    )
    wait_phase(control_plane, refs, "pause", "Suspended")
    wait_for(
        "runPolicy.suspend=true",
        lambda: (
            (get_json(control_plane, "pytorchjob", "pause-train", "-n", refs) or {})["spec"]["runPolicy"].get("suspend")
            is True
        ),
    )
    control_plane.kubectl(
        "patch", "ctj", "pause", "-n", refs, "--type=merge", "-p", '{"spec":{"suspend":false}}', check=True
    )
    wait_phase(control_plane, refs, "pause", "Pending")
    pytorchjob = get_json(control_plane, "pytorchjob", "pause-train", "-n", refs)
    assert pytorchjob is not None and pytorchjob["spec"]["runPolicy"]["suspend"] is False


def test_delete_cancels_and_garbage_collects(control_plane: ControlPlane, operator: OperatorProcess, refs: str) -> None:
    apply(control_plane, refs, automodel_job("gone"))
    wait_phase(control_plane, refs, "gone", "Pending")
    # Watch the job while it is deleted: the operator's finalizer records Cancelled first.
    api = client.CustomObjectsApi(config.new_client_from_config(str(control_plane.kubeconfig)))
    phases: list[tuple[str, str | None]] = []
    watching = threading.Event()

    def watch_job() -> None:
        stream = watch.Watch()
        for event in stream.stream(
            api.list_namespaced_custom_object,
            "kubetune.io",
            "v1alpha1",
            refs,
            "customizationjobs",
            field_selector="metadata.name=gone",
            timeout_seconds=60,
        ):
            phases.append((event["type"], (event["object"].get("status") or {}).get("phase")))
            watching.set()
            if event["type"] == "DELETED":
                stream.stop()

    watcher = threading.Thread(target=watch_job, daemon=True)
    watcher.start()
    assert watching.wait(30), "the watch did not start"
    control_plane.kubectl("delete", "ctj", "gone", "-n", refs, "--wait=true", "--timeout=30s", check=True)
    watcher.join(30)
    # The object's last state before it went is in the DELETED event.
    assert phases and phases[-1] == ("DELETED", "Cancelled"), phases
    for kind, name in (("pytorchjob", "gone-train"), ("configmap", "gone-config"), ("role", "gone-progress")):
        wait_for(
            f"{kind} {name} to be garbage-collected",
            lambda kind=kind, name=name: get_json(control_plane, kind, name, "-n", refs) is None,
            timeout=60,
        )


def test_a_killed_operator_creates_no_duplicates(
    control_plane: ControlPlane, operator: OperatorProcess, refs: str, tmp_path: Path
) -> None:
    operator.kill()
    try:
        apply(control_plane, refs, automodel_job("restart"))
        with operator_process(control_plane, tmp_path / "first.log") as first:
            wait_for("the first children", lambda: get_json(control_plane, "configmap", "restart-config", "-n", refs))
            first.kill()  # mid-reconcile or just after: either way
        with operator_process(control_plane, tmp_path / "second.log"):
            wait_phase(control_plane, refs, "restart", "Pending")
            for kind in ("pytorchjob", "configmap", "serviceaccount", "role", "rolebinding", "pvc"):
                items = (get_json(control_plane, kind, "-n", refs, "-l", "kubetune.io/job=restart") or {})["items"]
                assert len(items) == 1, f"{len(items)} {kind}s for one job"
    finally:
        operator.start()


def test_more_waiting_jobs_than_kopf_workers_all_start_when_their_model_appears(
    control_plane: ControlPlane, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    """An operator that starts with more jobs than kopf workers (KUBETUNE_WORKERS=1: 4 workers)
    resumes every one, and the Model they wait for nudges them all (the re-check timer is
    set out of reach, so the nudge is what starts them)."""
    names = [f"late-{i}" for i in range(10)]
    operator.kill()
    try:
        apply(control_plane, namespace, fileset("train"), *(automodel_job(name) for name in names))
        env = {"KUBETUNE_WORKERS": "1", "KUBETUNE_REFERENCE_RETRY_SECONDS": "3600"}
        with operator_process(control_plane, tmp_path / "few-workers.log", **env):
            for name in names:
                wait_phase(control_plane, namespace, name, "Created", timeout=60)
            apply(control_plane, namespace, model("base"))
            for name in names:
                wait_phase(control_plane, namespace, name, "Pending", timeout=60)
    finally:
        operator.start()


def test_metrics(control_plane: ControlPlane, operator: OperatorProcess, refs: str) -> None:
    apply(control_plane, refs, automodel_job("measured"))
    wait_phase(control_plane, refs, "measured", "Pending")
    text = operator.metrics()  # the latency is observed before the status that says Pending is written
    assert "kubetune_launch_latency_seconds_count" in text
    assert 'kubetune_jobs{backend="automodel",phase="Pending"}' in text
    assert "kubetune_reconcile_duration_seconds_count" in text


def test_two_replicas_do_not_both_act(
    control_plane: ControlPlane, operator: OperatorProcess, refs: str, tmp_path: Path
) -> None:
    with operator_process(control_plane, tmp_path / "second.log") as second:
        # Both replicas register in the kopf peering object; the one with the lower priority stands by.
        wait_for(
            "two live peers",
            lambda: len((get_json(control_plane, "clusterkopfpeering", "kubetune") or {}).get("status") or {}) == 2,
        )
        time.sleep(2)  # let each replica read the other's record
        offsets = {id(p): p.log.stat().st_size for p in (operator, second)}
        apply(control_plane, refs, automodel_job("peered"))
        wait_phase(control_plane, refs, "peered", "Pending")
        time.sleep(2)
        acted = [
            p
            for p in (operator, second)
            if "Handler 'launch' succeeded" in p.log.read_text(errors="replace")[offsets[id(p)] :]
        ]
        assert len(acted) == 1, "both replicas handled the job" if acted else "no replica handled the job"


def test_memory_preflight(control_plane: ControlPlane, operator: OperatorProcess, refs: str) -> None:
    apply(control_plane, refs, automodel_job("small"))
    status = wait_phase(control_plane, refs, "small", "Pending")
    estimate = status["memoryEstimate"]
    assert (estimate["verdict"], estimate["gpuMemoryGiB"]) == ("fits", 80.0)
    assert conditions(status)["MemoryFits"]["status"] == "True"
    apply(
        control_plane,
        refs,
        model("huge", numParameters=70_000_000_000),
        automodel_job("huge-full", model="huge", training={"finetuning_type": "all_weights"}),
    )
    status = wait_phase(control_plane, refs, "huge-full", "Failed")
    failed = conditions(status)["Validated"]
    assert failed["reason"] == "MemoryCannotFit" and "spec.automodel" in failed["message"]
    assert status["memoryEstimate"]["verdict"] == "cannot fit"
    assert get_json(control_plane, "pytorchjob", "huge-full-train", "-n", refs) is None


def test_a_host_path_outside_allowed_host_paths_fails_the_job(
    control_plane: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    """A Model may not mount any folder of the node: only those under allowedHostPaths (/models here)."""
    runtime_socket = {"source": {"hostPath": {"path": "/var/run/containerd"}}}
    apply(control_plane, namespace, {**model("base"), "spec": runtime_socket}, fileset("train"), automodel_job("peek"))
    status = wait_phase(control_plane, namespace, "peek", "Failed")
    validated = conditions(status)["Validated"]
    assert validated["reason"] == "ReferenceInvalid"
    assert "'/var/run/containerd' is not allowed in this cluster" in validated["message"]
    assert "allowedHostPaths" in validated["message"]
    assert get_json(control_plane, "pytorchjob", "peek-train", "-n", namespace) is None


def _pod_from(template: dict[str, Any], name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, **template["metadata"]},
        "spec": template["spec"],
    }


def _create_pod(cp: ControlPlane, namespace: str, pod: dict[str, Any]) -> tuple[int, str]:
    res = cp.kubectl("create", "-n", namespace, "-f", "-", stdin=json.dumps(pod))
    return res.returncode, res.stdout + res.stderr


def test_trainer_pods_pass_restricted_pod_security(
    control_plane: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    """The API server's Pod Security admission (`restricted`) admits the trainer pods as rendered.

    No training-operator or kubelet runs here, so the pods are created from the workloads'
    templates as those controllers would (the API server judges a pod, not who sends it);
    weakened copies are refused, so this test can fail.
    """
    cp = control_plane
    cp.kubectl("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted", check=True)
    on_claim = {"source": {"pvc": {"claimName": "models", "path": "/base"}}}
    apply(
        cp, namespace, {**model("base"), "spec": on_claim}, fileset("train"), automodel_job("psa"), unsloth_job("psa-u")
    )
    wait_phase(cp, namespace, "psa", "Pending")
    wait_phase(cp, namespace, "psa-u", "Pending")
    pytorchjob = get_json(cp, "pytorchjob", "psa-train", "-n", namespace)
    batch_job = get_json(cp, "job.batch", "psa-u-train", "-n", namespace)
    assert pytorchjob is not None and batch_job is not None
    templates = {
        f"psa-train-{replica.lower()}-0": spec["template"]
        for replica, spec in pytorchjob["spec"]["pytorchReplicaSpecs"].items()
    }
    templates["psa-u-train-pod"] = batch_job["spec"]["template"]
    for name, template in templates.items():
        code, out = _create_pod(cp, namespace, _pod_from(template, name))
        assert code == 0, out

    template = templates["psa-train-master-0"]
    escalating = json.loads(json.dumps(template))
    del escalating["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"]
    node_files = json.loads(json.dumps(template))
    node_files["spec"]["volumes"].append({"name": "node", "hostPath": {"path": "/models/base"}})
    for name, weakened in (("escalating", escalating), ("node-files", node_files)):
        code, out = _create_pod(cp, namespace, _pod_from(weakened, name))
        assert code != 0 and "violates PodSecurity" in out, out
