"""The job's phase and conditions, derived from its children's real status (pure).

The operator hands in what the API server holds — the PyTorchJob's or batch Job's status
and the training pods — and gets back the phase and the condition to record. A failed
pod's reason (OOMKilled, an exit code, an image pull error, Unschedulable) is surfaced in
the condition's reason and message, not hidden behind a generic "Failed".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubetune.api.resources import Condition, Phase

_WAITING_PROBLEMS = {
    "ErrImagePull": "cannot pull the trainer image",
    "ImagePullBackOff": "cannot pull the trainer image",
    "InvalidImageName": "the trainer image name is invalid",
    "CreateContainerConfigError": "the container cannot be configured",
    "CrashLoopBackOff": "the trainer keeps crashing",
}


@dataclass(frozen=True)
class PodProblem:
    reason: str
    message: str


@dataclass(frozen=True)
class ChildState:
    phase: Phase
    reason: str
    message: str


def condition(type_: str, status: bool, reason: str, message: str, now: datetime | None = None) -> Condition:
    stamp = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Condition(
        type=type_, status="True" if status else "False", reason=reason, message=message, lastTransitionTime=stamp
    )


def merge_conditions(old: Sequence[Mapping[str, Any]] | None, new: Iterable[Condition]) -> list[Condition]:
    """Replace conditions by type; keep a condition's lastTransitionTime while its status is unchanged.

    `old` is what the API server holds (taken as it is: a condition written by an older
    operator is kept, not re-validated).
    """
    merged = {str(c.get("type")): Condition.model_construct(**c) for c in old or []}
    for cond in new:
        previous = merged.get(cond.type)
        if previous is not None and previous.status == cond.status and previous.lastTransitionTime:
            cond = cond.model_copy(update={"lastTransitionTime": previous.lastTransitionTime})
        merged[cond.type] = cond
    return list(merged.values())


def pod_problem(pods: Sequence[Mapping[str, Any]]) -> PodProblem | None:
    """The most telling problem among a job's pods: terminated with an error > stuck waiting > unschedulable."""
    waiting: PodProblem | None = None
    unschedulable: PodProblem | None = None
    for pod in pods:
        name = pod.get("metadata", {}).get("name", "?")
        status = pod.get("status", {}) or {}
        for container in status.get("containerStatuses", []) or []:
            state = container.get("state", {}) or {}
            last = container.get("lastState", {}) or {}
            terminated = state.get("terminated") or last.get("terminated")
            if terminated and terminated.get("exitCode", 0) != 0:
                reason = terminated.get("reason") or "Error"
                code = terminated.get("exitCode")
                if reason == "OOMKilled":
                    message = (
                        f"pod {name}: container {container.get('name')} ran out of memory (OOMKilled, exit "
                        f"code {code}); lower batch.micro_batch_size or max_seq_length, use more GPUs, or "
                        "LoRA / 4-bit loading"
                    )
                else:
                    detail = f": {terminated['message'].strip()}" if terminated.get("message") else ""
                    message = (
                        f"pod {name}: container {container.get('name')} exited with code {code} ({reason}){detail}"
                    )
                    reason = "ExitCode" if reason == "Error" else reason
                return PodProblem(reason, message)
            waiting_state = state.get("waiting") or {}
            if waiting_state.get("reason") in _WAITING_PROBLEMS and waiting is None:
                reason = waiting_state["reason"]
                detail = f": {waiting_state['message']}" if waiting_state.get("message") else ""
                waiting = PodProblem(reason, f"pod {name}: {_WAITING_PROBLEMS[reason]} ({reason}){detail}")
        for cond in status.get("conditions", []) or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and unschedulable is None:
                unschedulable = PodProblem(
                    cond.get("reason") or "Unschedulable",
                    f"pod {name} cannot be scheduled: {cond.get('message') or 'no node fits'}",
                )
    return waiting or unschedulable


def _latest_true(conditions: Sequence[Mapping[str, Any]] | None) -> Mapping[str, Any] | None:
    true = [c for c in conditions or [] if c.get("status") == "True"]
    return (
        max(true, key=lambda c: str(c.get("lastTransitionTime") or c.get("lastUpdateTime") or ""), default=None)
        if true
        else None
    )


def pytorchjob_state(status: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]]) -> ChildState:
    """Phase of a Kubeflow PyTorchJob from its conditions (training-operator v1) and its pods."""
    conditions = (status or {}).get("conditions") or []
    by_type = {c.get("type"): c for c in conditions if c.get("status") == "True"}
    problem = pod_problem(pods)
    if "Succeeded" in by_type:
        return ChildState("Completed", "Succeeded", by_type["Succeeded"].get("message") or "training finished")
    if "Failed" in by_type:
        if problem:
            return ChildState("Failed", problem.reason, problem.message)
        cond = by_type["Failed"]
        return ChildState("Failed", cond.get("reason") or "Failed", cond.get("message") or "the PyTorchJob failed")
    if "Suspended" in by_type:
        return ChildState("Suspended", "Suspended", "the PyTorchJob is suspended (spec.suspend: true)")
    latest = _latest_true(conditions)
    if latest is not None and latest.get("type") in ("Running", "Restarting"):
        if latest.get("type") == "Restarting" and problem:
            return ChildState("Running", problem.reason, f"restarting after: {problem.message}")
        return ChildState(
            "Running", str(latest.get("reason") or latest.get("type")), latest.get("message") or "training is running"
        )
    if problem:
        return ChildState("Pending", problem.reason, problem.message)
    return ChildState("Pending", "WaitingForPods", "the PyTorchJob is created; waiting for its pods to start")


def batch_job_state(status: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]]) -> ChildState:
    """Phase of a batch/v1 Job (the unsloth backend) from its status and its pod."""
    status = status or {}
    by_type = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    problem = pod_problem(pods)
    if "Complete" in by_type or "SuccessCriteriaMet" in by_type:
        return ChildState("Completed", "Succeeded", "training finished")
    if "Failed" in by_type or "FailureTarget" in by_type:
        cond = by_type.get("Failed") or by_type["FailureTarget"]
        if problem:
            return ChildState("Failed", problem.reason, problem.message)
        return ChildState("Failed", cond.get("reason") or "Failed", cond.get("message") or "the Job failed")
    if "Suspended" in by_type:
        return ChildState("Suspended", "Suspended", "the Job is suspended (spec.suspend: true)")
    running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
    if running and (status.get("active") or 0) > 0:
        return ChildState("Running", "Running", "training is running")
    if problem:
        return ChildState("Pending", problem.reason, problem.message)
    return ChildState("Pending", "WaitingForPods", "the Job is created; waiting for its pod to start")
