"""What the operator does for a CustomizationJob, step by step (kopf calls these from operator.py).

launch: validate (same code as the CLI) -> resolve references -> render -> create the
children that are missing -> record layout and conditions. follow: read the workload and
its pods -> phase and conditions -> on success, create the output Model. Every step can be
repeated: children have deterministic names and creating an existing one is a no-op, so an
operator killed at any point and started again ends in the same state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf

from kubetune.api.common import GROUP_VERSION
from kubetune.api.resources import (
    TERMINAL_PHASES,
    CustomizationJobSpec,
    CustomizationJobStatus,
    MemoryStatus,
    OutputStatus,
    Phase,
)
from kubetune.handlers.events import announce_phase
from kubetune.handlers.kube import Kube
from kubetune.handlers.metrics import LAUNCH_LATENCY, PHASES, VALIDATION_FAILURES
from kubetune.handlers.settings import ClusterSettings, KubetuneSettings
from kubetune.handlers.waiting import WaitingJobs
from kubetune.planning.memory.estimate import estimate_from_resolved
from kubetune.planning.memory.verdict import check_memory, memory_report
from kubetune.planning.references import Catalog, cluster_source_problem, reference_uses
from kubetune.planning.resolved import base_model_reference, output_model_details, output_name, output_type
from kubetune.planning.validation import JobReport, validate_fileset, validate_job, validate_model
from kubetune.render.child_status import ChildState, batch_job_state, condition, merge_conditions, pytorchjob_state
from kubetune.render.children import ChildNames, JobInput, render_children

log = logging.getLogger(__name__)

PLURALS = {"Model": "models", "FileSet": "filesets"}


@dataclass(frozen=True)
class Operator:
    kube: Kube
    settings: KubetuneSettings
    waiting: WaitingJobs = field(default_factory=WaitingJobs)


def manifest_of(body: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a kopf body that validation reads (plain dicts, no kopf views)."""
    meta = body.get("metadata") or {}
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace") or "default"},
        "spec": _plain(body.get("spec")),
    }


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def catalog_for(kube: Kube, report: JobReport, allowed_host_paths: Sequence[str] = ()) -> Catalog:
    """The Models and FileSets a (schema-valid) job names, as the operator last saw them."""
    catalog = Catalog(authoritative=True)
    section = report.section
    if section is None:
        return catalog
    for ref in reference_uses(section, report.namespace):
        obj = kube.get_reference(PLURALS[ref.kind], ref.key.namespace, ref.key.name)
        if obj is None:
            continue
        parsed, errors = (validate_model if ref.kind == "Model" else validate_fileset)(obj.get("spec"))
        problem = cluster_source_problem(parsed.source, allowed_host_paths) if parsed is not None else None
        if parsed is None or problem:
            catalog.invalid[ref.key] = problem or (f"{errors[0].path}: {errors[0].message}" if errors else "invalid")
        elif ref.kind == "Model":
            catalog.models[(ref.key.namespace, ref.key.name)] = parsed  # type: ignore[assignment]
        else:
            catalog.filesets[(ref.key.namespace, ref.key.name)] = parsed  # type: ignore[assignment]
    return catalog


def validate_with_references(
    kube: Kube, manifest: Mapping[str, Any], cluster: ClusterSettings
) -> tuple[JobReport, MemoryStatus | None]:
    """The full validation: schema, rules, references, and the memory pre-flight.

    Returns the report and `status.memoryEstimate` (None when numParameters is unknown). A job
    that cannot fit the configured GPU size is an error; one that may not fit, a warning.
    """
    gpu_memory_gib, gpu_type = cluster.gpu_memory_gib, cluster.gpu_type
    report = validate_job(manifest, gpu_type=gpu_type)
    if not report.valid:
        return report, None
    report = validate_job(manifest, catalog_for(kube, report, cluster.allowed_host_paths), gpu_type)
    section = report.section
    if not report.valid or section is None or report.layout is None or report.references is None:
        return report, None
    estimate = estimate_from_resolved(section, report.layout, report.references.resolved)
    if estimate is not None and gpu_memory_gib is not None:
        finding = check_memory(estimate, gpu_memory_gib).finding()
        if finding is not None:
            (report.errors if finding.reason == "MemoryCannotFit" else report.warnings).append(finding)
    return report, memory_report(estimate, gpu_memory_gib)


def _errors_text(report: JobReport) -> str:
    return "; ".join(f"{error.path}: {error.message}" for error in report.errors)


def launch(op: Operator, body: Mapping[str, Any]) -> CustomizationJobStatus:
    """Validate, resolve and create the children; returns the status to merge."""
    meta = body["metadata"]
    name, namespace, uid = meta["name"], meta.get("namespace", "default"), meta["uid"]
    status = dict(body.get("status") or {})
    op.waiting.done((namespace, name))  # until it is found waiting again, below
    if status.get("phase") in TERMINAL_PHASES:
        return CustomizationJobStatus()  # a finished job is never relaunched
    report, memory = validate_with_references(op.kube, manifest_of(body), op.settings.cluster)
    conditions = status.get("conditions")
    if not report.valid:
        reason = report.errors[0].reason
        VALIDATION_FAILURES.labels(reason=reason).inc()
        PHASES.set(uid, "Failed", report.backend or "unknown")
        return CustomizationJobStatus(
            phase="Failed",
            backend=report.backend,
            memoryEstimate=memory,
            conditions=merge_conditions(
                conditions,
                [
                    condition("Validated", False, reason, _errors_text(report)),
                    condition("Failed", True, reason, _errors_text(report)),
                ],
            ),
        )
    assert report.spec is not None and report.layout is not None and report.references is not None
    backend = report.spec.backend
    if report.references.missing:
        message = "; ".join(
            f"{ref.path}: {ref.key} does not exist yet; the job starts when it is created"
            for ref in report.references.missing
        )
        # The job waits: a timer re-checks Created jobs, and a new Model/FileSet nudges them.
        op.waiting.wait((namespace, name), (ref.key for ref in report.references.missing))
        PHASES.set(uid, "Created", backend or "unknown")
        return CustomizationJobStatus(
            phase="Created",
            backend=backend,
            conditions=merge_conditions(
                conditions,
                [
                    condition("Validated", True, "Valid", "the job is valid"),
                    condition("ReferencesResolved", False, "ReferenceNotFound", message),
                ],
            ),
        )

    sources = {role: target.source for role, target in report.references.resolved.items()}
    job = JobInput(name, namespace, uid, report.spec, report.layout, sources)
    created_any = False
    for child in render_children(job, op.settings.trainer):
        created, existing = op.kube.create_if_absent(child)
        created_any |= created
        _check_owned(existing, uid, child)
    if created_any or status.get("phase") in (None, "Created"):
        created_at = meta.get("creationTimestamp")
        if created_at:
            started = datetime.fromisoformat(str(created_at).replace("Z", "+00:00"))
            LAUNCH_LATENCY.observe(max(0.0, (datetime.now(UTC) - started).total_seconds()))
    if not created_any:  # new children carry spec.suspend already; old ones may predate a change
        _sync_suspend(op, job)
    phase: Phase = "Pending" if status.get("phase") in (None, "Created") else status["phase"]
    if report.spec.suspend:
        phase = "Suspended"
    elif phase == "Suspended":
        phase = "Pending"  # resumed: the trainer restarts from its newest checkpoint
    PHASES.set(uid, phase, backend or "unknown")
    new_conditions = [
        condition("Validated", True, "Valid", "the job is valid"),
        condition("ReferencesResolved", True, "Resolved", "every Model and FileSet exists"),
        condition("Launched", True, "ChildrenCreated", f"created {ChildNames(name).workload} and its config"),
        condition(
            "Suspended",
            report.spec.suspend,
            "SuspendRequested" if report.spec.suspend else "NotSuspended",
            "spec.suspend is true" if report.spec.suspend else "spec.suspend is false",
        ),
    ]
    if phase == "Pending" and status.get("phase") in (None, "Created"):
        # What `follow` says of a workload no controller has picked up yet: said here, in the
        # launch's own status write, follow's first look at the new workload has nothing to add.
        new_conditions += _status_for(workload_state(backend, None, []), {}).conditions or []
    memory_warnings = [w for w in report.warnings if w.reason == "MemoryTight"]
    if memory is not None and memory.verdict is not None:
        fits = not memory_warnings
        new_conditions.append(
            condition(
                "MemoryFits",
                fits,
                "MemoryFits" if fits else "MemoryTight",
                memory_warnings[0].message if memory_warnings else memory.message or "",
            )
        )
    return CustomizationJobStatus(
        phase=phase,
        memoryEstimate=memory,
        backend=backend,
        layout=report.layout,
        observedGeneration=meta.get("generation"),
        conditions=merge_conditions(conditions, new_conditions),
    )


def _check_owned(existing: Mapping[str, Any], uid: str, child: Mapping[str, Any]) -> None:
    owners = (
        existing.get("metadata", {}).get("owner_references")
        or existing.get("metadata", {}).get("ownerReferences")
        or []
    )
    if not any(owner.get("uid") == uid for owner in owners):
        kind, child_name = child["kind"], child["metadata"]["name"]
        raise kopf.PermanentError(
            f"{kind} {child_name} already exists and does not belong to this job: delete or rename it, "
            "then re-create the job"
        )


def _sync_suspend(op: Operator, job: JobInput) -> None:
    """Make the workload's suspend flag match spec.suspend (PyTorchJob runPolicy / Job spec)."""
    workload = ChildNames(job.name).workload
    if job.spec.backend == "automodel":
        op.kube.merge_patch(
            "kubeflow.org/v1",
            "PyTorchJob",
            job.namespace,
            workload,
            {"spec": {"runPolicy": {"suspend": job.spec.suspend}}},
        )
    else:
        op.kube.merge_patch("batch/v1", "Job", job.namespace, workload, {"spec": {"suspend": job.spec.suspend}})


WORKLOADS = {"automodel": ("kubeflow.org/v1", "PyTorchJob"), "unsloth": ("batch/v1", "Job")}
"""The child that runs a backend's training: (apiVersion, kind)."""


def workload_state(backend: str | None, workload_status: Mapping[str, Any] | None, pods: Sequence[Any]) -> ChildState:
    """The phase a backend's workload is in, from its status and its pods."""
    if backend == "automodel":
        return pytorchjob_state(workload_status, pods)
    return batch_job_state(workload_status, pods)


def follow(op: Operator, job: Mapping[str, Any], seen: Mapping[str, Any] | None = None) -> None:
    """Copy the workload's real state into the job's status (and record the output on success).
    `seen`: the child whose watch event called this, used as it is when it is the workload."""
    meta = job["metadata"]
    name, namespace, uid = meta["name"], meta.get("namespace", "default"), meta["uid"]
    status = job.get("status") or {}
    if status.get("phase") in TERMINAL_PHASES or status.get("phase") in (None, "Created"):
        return
    if meta.get("deletionTimestamp"):
        return  # being deleted: the cancel handler records Cancelled; never race it
    spec = CustomizationJobSpec.model_validate(manifest_of(job)["spec"])
    api_version, kind = WORKLOADS[spec.backend or "automodel"]
    workload = ChildNames(name).workload
    seen_meta = (seen or {}).get("metadata") or {}
    if seen is not None and seen.get("kind") == kind and seen_meta.get("name") == workload:
        child: Mapping[str, Any] | None = seen
    else:
        child = op.kube.get(api_version, kind, namespace, workload)
    if child is None:
        return  # launch recreates it
    # Its controller creates the pods and then writes the status (which calls this again):
    # no status yet, no pods to list (a burst of launches would list each job's pods for nothing).
    pods = op.kube.list_pods(namespace, name) if child.get("status") else []
    state = workload_state(spec.backend, child.get("status"), pods)
    if spec.suspend and state.phase not in TERMINAL_PHASES:
        state = ChildState("Suspended", "Suspended", "suspended (spec.suspend: true)")
    new = _status_for(state, status)
    if state.phase == "Completed":
        new.output = record_output(op, job, spec)
    patch = new.wire()
    if (
        patch.get("phase") == status.get("phase")
        and patch.get("conditions") == status.get("conditions")
        and "output" not in patch
    ):
        return
    PHASES.set(uid, state.phase, spec.backend or "unknown")
    op.kube.patch_job_status(namespace, name, patch)
    announce_phase(job, status, patch)


def _status_for(state: ChildState, status: Mapping[str, Any]) -> CustomizationJobStatus:
    new = [condition("Running", state.phase == "Running", state.reason, state.message)]
    if state.phase == "Completed":
        new = [
            condition("Running", False, "Finished", "training finished"),
            condition("Complete", True, state.reason, state.message),
        ]
    elif state.phase == "Failed":
        new = [
            condition("Running", False, state.reason, state.message),
            condition("Failed", True, state.reason, state.message),
        ]
    elif state.phase == "Pending":
        new = [condition("Running", False, state.reason, state.message)]
    return CustomizationJobStatus(phase=state.phase, conditions=merge_conditions(status.get("conditions"), new))


def record_output(op: Operator, job: Mapping[str, Any], spec: CustomizationJobSpec) -> OutputStatus:
    """Create the output Model (adapter or full weights) that points at the result on the output claim."""
    meta = job["metadata"]
    name, namespace, uid = meta["name"], meta.get("namespace", "default"), meta["uid"]
    section = spec.automodel or spec.unsloth
    assert section is not None
    result_name, kind = output_name(section, name), output_type(section)
    storage = spec.storage
    claim = storage.claimName if storage and storage.claimName else ChildNames(name).output_claim
    prefix = f"/{namespace}/{name}" if storage and storage.claimName else ""
    path = f"{prefix}/{result_name}"
    base_ref = base_model_reference(section)
    base_namespace, _, base_name = base_ref.rpartition("/")
    base = op.kube.get_object("models", base_namespace or namespace, base_name) or {}
    base_spec = base.get("spec") or {}
    model_spec: dict[str, Any] = {"source": {"pvc": {"claimName": claim, "path": path}}}
    if base_spec.get("tokenizer"):
        model_spec["tokenizer"] = base_spec["tokenizer"]
    if kind == "adapter":
        model_spec["adapter"] = {"baseModel": base_ref}
    elif base_spec.get("numParameters"):
        model_spec["numParameters"] = base_spec["numParameters"]
    model_spec.update(output_model_details(section, f"{namespace}/{name}", (job.get("status") or {}).get("progress")))
    model = {
        "apiVersion": GROUP_VERSION,
        "kind": "Model",
        "metadata": {
            "name": result_name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "kubetune", "kubetune.io/job": name},
            "annotations": {"kubetune.io/created-by-job": f"{namespace}/{name}", "kubetune.io/job-uid": uid},
        },
        "spec": model_spec,
    }
    # Not owned by the job: the trained model outlives it.
    op.kube.create_if_absent(model)
    return OutputStatus(name=result_name, type=kind, path=path)


def nudge_waiting_jobs(op: Operator, jobs: Iterable[tuple[str, str]]) -> int:
    """A Model/FileSet appeared: touch the jobs that wait for it so they re-check now."""
    touched = sorted(set(jobs))
    for namespace, name in touched:
        op.kube.annotate_job(namespace, name, {"kubetune.io/recheck": str(time.time())})
    return len(touched)
