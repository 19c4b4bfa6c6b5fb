"""kopf glue: which events call which step of `reconcile.py`. No logic lives here.

- CustomizationJob created / resumed / changed -> `launch` (validate, resolve, create
  children, sync suspend); a timer retries jobs that wait for a Model/FileSet.
- PyTorchJob / batch Job / pod of a job changed -> `follow` (phase, conditions, output).
- Model / FileSet added -> nudge the jobs that wait for it (`waiting.py` maps each
  Model/FileSet to the jobs waiting for it, so no event lists every job).
- CustomizationJob deleted -> record `Cancelled` (kopf's finalizer holds the deletion until
  then); the children go by garbage collection (owner references).
- Optional validating webhook: the same validator at admission, and the hostPath rule of
  Models and FileSets (allowedHostPaths).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import random
from collections.abc import Mapping
from typing import Any, cast

import kopf
from kubernetes import client

from kubetune.api.common import API_GROUP, API_VERSION
from kubetune.api.resources import TERMINAL_PHASES, CustomizationJobStatus
from kubetune.handlers import metrics
from kubetune.handlers.events import announce_phase
from kubetune.handlers.kube import PLURALS, Kube, load_config
from kubetune.handlers.peering import choose_peering
from kubetune.handlers.reconcile import (
    WORKLOADS,
    Operator,
    follow,
    launch,
    manifest_of,
    nudge_waiting_jobs,
    validate_with_references,
)
from kubetune.handlers.settings import KubetuneSettings, settings_from_env
from kubetune.planning.references import ObjectKey, cluster_source_problem
from kubetune.planning.rules import IMMUTABLE_MESSAGE, backend_changed
from kubetune.planning.validation import validate_fileset, validate_model
from kubetune.render.child_status import condition, merge_conditions
from kubetune.render.children import ChildNames

log = logging.getLogger(__name__)

JOBS = (API_GROUP, API_VERSION, "customizationjobs")
MANAGED = {"app.kubernetes.io/managed-by": "kubetune"}
RESYNC_SECONDS = 30.0
KOPF_WORKERS_PER_THREAD = 4
WORKLOAD_KINDS = {kind for _, kind in WORKLOADS.values()}


class LeanDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """kopf's own diff base (same annotation, same essence), built without deep-copying what
    kopf then throws away: `metadata.managedFields` and `status`. kopf builds it on every event
    of a job; the copy was the operator's top CPU cost in a burst (bench/operator_launch.py)."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        if extra_fields:  # they may point anywhere in the body: kopf's way, then
            return super().build(body=body, extra_fields=extra_fields)
        meta = body.get("metadata", {})
        lean: dict[str, Any] = {
            key: _JsonCopied(value) if isinstance(value, Mapping) else value
            for key, value in body.items()
            if key not in ("metadata", "status")
        }
        lean["metadata"] = {key: meta[key] for key in ("labels", "annotations", "ownerReferences") if key in meta}
        return super().build(body=kopf.Body(cast(kopf.RawBody, lean)), extra_fields=None)


class _JsonCopied(dict[str, Any]):
    """A stanza that kopf's `copy.deepcopy` copies by a JSON round trip (C code, several
    times faster on a spec with the CRD's defaults filled in) into a plain dict: it came
    from JSON, so the copy is exact."""

    def __deepcopy__(self, memo: dict[int, Any]) -> dict[str, Any]:
        copied: dict[str, Any] = json.loads(json.dumps(self))
        return copied


class LeanProgressStorage(kopf.SmartProgressStorage):
    """kopf's own progress storage (annotations, and the status for older records), whose
    `clear` deep-copies only the stanzas its storages edit (`metadata`, `status`), not the
    whole essence once per storage: with the CRD's defaults a job's spec is a few hundred
    values, and that copy on every event was the next-largest CPU cost in a burst. The spec
    is shared with the essence it came from, which kopf only reads."""

    EDITED = ("metadata", "status")

    def clear(self, *, essence: kopf.BodyEssence) -> kopf.BodyEssence:
        edited = cast(kopf.BodyEssence, {key: value for key, value in essence.items() if key in self.EDITED})
        cleared = super().clear(essence=edited)
        rest = {key: value for key, value in essence.items() if key not in self.EDITED}
        return cast(kopf.BodyEssence, {**rest, **cleared})


def _op(memo: Any) -> Operator:
    op: Operator = memo.op
    return op


def register(registry: kopf.OperatorRegistry, config: KubetuneSettings) -> None:
    """Register every handler on `registry` (a function, so tests and `kubetune operator` share it)."""

    def reconcile_job(body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, **_: Any) -> None:
        with metrics.RECONCILE_DURATION.time():
            status = launch(_op(memo), body).wire()
        patch.status.update(status)
        announce_phase(body, body.get("status"), status)

    for decorator in (kopf.on.resume, kopf.on.create, kopf.on.update):
        decorator(*JOBS, registry=registry, id="launch")(reconcile_job)

    def waiting(status: Mapping[str, Any], **_: Any) -> bool:
        return status.get("phase") == "Created"

    # The first tick waits a full interval: launch has just looked when the job became Created.
    kopf.timer(
        *JOBS,
        registry=registry,
        id="recheck-references",
        interval=config.watch.reference_retry_seconds,
        initial_delay=config.watch.reference_retry_seconds,
        when=waiting,
    )(reconcile_job)

    def child_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        job_name = body.metadata.labels.get("kubetune.io/job")
        namespace = body.metadata.namespace
        if not job_name or not namespace:
            return
        is_workload = body.get("kind") in WORKLOAD_KINDS and body.metadata.name == ChildNames(job_name).workload
        if is_workload and not body.get("status"):
            return  # just created, no controller has looked at it: the launch said so already
        op = _op(memo)
        job = op.kube.get_object("customizationjobs", namespace, job_name)
        if job is not None:
            follow(op, job, seen=body)

    for resource in (("kubeflow.org", "v1", "pytorchjobs"), ("batch", "v1", "jobs"), ("", "v1", "pods")):
        kopf.on.event(*resource, registry=registry, labels=MANAGED, id="follow")(child_changed)

    # Level-triggered as well: a child event that came while this replica was not (yet) the
    # active one (kopf peering during a rollout) is never delivered again, so unfinished
    # jobs are re-read from their children now and then (an unschedulable pod changes no more).
    def unfinished(status: Mapping[str, Any], **_: Any) -> bool:
        return status.get("phase") in ("Pending", "Running", "Suspended")

    def resync(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        op = _op(memo)  # the newest version: the timer's body may predate a cancel or a patch
        job = op.kube.get_object("customizationjobs", body.metadata.namespace or "default", body.metadata.name or "")
        if job is not None:
            follow(op, job)

    # Not at once: the job was just launched, and a burst of jobs would double its API calls.
    kopf.timer(
        *JOBS, registry=registry, id="resync", interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS, when=unfinished
    )(resync)

    def reference_added(body: kopf.Body, event: Mapping[str, Any], memo: kopf.Memo, **_: Any) -> None:
        op = _op(memo)
        plural = PLURALS.get(str(body.get("kind")), "")
        # First remember it, then nudge: the nudged jobs read their references from memory.
        op.kube.remember(plural, dict(body), deleted=event.get("type") == "DELETED")
        if event.get("type") in ("ADDED", "MODIFIED", None):
            key = ObjectKey(str(body.get("kind")), body.metadata.namespace or "default", body.metadata.name or "")  # type: ignore[arg-type]
            nudge_waiting_jobs(op, op.waiting.waiting_for(key))

    for plural in ("models", "filesets"):
        kopf.on.event(API_GROUP, API_VERSION, plural, registry=registry, id="nudge")(reference_added)

    def cancelled(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        status = body.get("status") or {}
        _op(memo).waiting.done((body.metadata.namespace or "default", body.metadata.name or ""))
        metrics.PHASES.forget(body.metadata.uid or "")
        if status.get("phase") in TERMINAL_PHASES:
            return
        cancel = CustomizationJobStatus(
            phase="Cancelled",
            conditions=merge_conditions(
                status.get("conditions"),
                [condition("Complete", False, "Cancelled", "the job was deleted; its children are garbage-collected")],
            ),
        ).wire()
        _op(memo).kube.patch_job_status(body.metadata.namespace or "default", body.metadata.name or "", cancel)
        announce_phase(body, status, cancel)

    kopf.on.delete(*JOBS, registry=registry, id="cancel")(cancelled)

    if config.webhook.enabled:

        def admit(body: kopf.Body, warnings: list[str], memo: kopf.Memo, **kwargs: Any) -> None:
            old = kwargs.get("old")  # kopf passes the old object on UPDATE
            if old and old.get("spec") and backend_changed(old.get("spec"), body.get("spec")):
                raise kopf.AdmissionError(IMMUTABLE_MESSAGE, code=422)
            op = _op(memo)
            report, _ = validate_with_references(op.kube, manifest_of(body), op.settings.cluster)
            if not report.valid:
                metrics.VALIDATION_FAILURES.labels(reason=report.errors[0].reason).inc()
                raise kopf.AdmissionError("\n".join(f"{e.path}: {e.message}" for e in report.errors), code=422)
            warnings.extend(f"{w.path}: {w.message}" for w in report.warnings)

        kopf.on.validate(*JOBS, registry=registry, id="validate")(admit)

        def admit_source(body: kopf.Body, **_: Any) -> None:
            # A hostPath the operator would refuse at reconcile is refused here already: at
            # `kubectl apply` of the Model or FileSet, not later at the job that names it.
            validate = validate_model if body.get("kind") == "Model" else validate_fileset
            parsed, _errors = validate(body.get("spec"))  # schema errors are the CRD's to report
            problem = cluster_source_problem(parsed.source, config.cluster.allowed_host_paths) if parsed else None
            if problem:
                raise kopf.AdmissionError(problem, code=422)

        for plural, handler_id in (("models", "validate-model"), ("filesets", "validate-fileset")):
            kopf.on.validate(API_GROUP, API_VERSION, plural, registry=registry, id=handler_id)(admit_source)

    def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        load_config()
        memo.op = Operator(Kube(), config)
        settings.persistence.finalizer = "kubetune.io/finalizer"
        settings.persistence.diffbase_storage = LeanDiffBaseStorage()
        settings.persistence.progress_storage = LeanProgressStorage()
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 300
        settings.peering.lifetime = config.watch.peering_lifetime_seconds
        settings.execution.max_workers = config.watch.workers
        # A burst's memory is what kopf's workers hold (each job's body, diff and patch while
        # it waits for a handler thread): a few workers per handler thread keep them all busy.
        # An idle worker leaves after 1 s instead of 5 s.
        settings.queueing.worker_limit = KOPF_WORKERS_PER_THREAD * config.watch.workers
        settings.batching.idle_timeout = 1.0
        webhook = config.webhook
        if webhook.enabled:
            settings.admission.server = kopf.WebhookServer(
                addr="0.0.0.0",
                port=webhook.port,
                host=webhook.host,
                certfile=webhook.cert_file,
                pkeyfile=webhook.key_file,
                cafile=webhook.ca_file,
            )
            if webhook.managed:
                settings.admission.managed = "validate.kubetune.io"

    kopf.on.startup(registry=registry)(startup)

    # kopf answers /healthz only while its watch loop runs, with what the probes return.
    def jobs_known(**_: Any) -> int:
        return metrics.PHASES.known()

    kopf.on.probe(registry=registry, id="jobs_known")(jobs_known)
    # kopf registers its credential sources on its default registry only; this one needs them too.
    kopf.on.login(registry=registry)(kopf.login_via_client)


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives each thread its own malloc arena, and memory freed in one is rarely handed
    back: with a burst spread over the handler threads, resident memory grows with the thread
    count. Two arenas (MALLOC_ARENA_MAX=2, set before any thread starts) limit that."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc (e.g. musl, macOS): nothing to tune
    m_arena_max = -8  # from glibc's malloc.h
    libc.mallopt(m_arena_max, arenas)


def run(settings: KubetuneSettings | None = None) -> None:
    """Run the operator until interrupted (`kubetune operator`)."""
    _limit_malloc_arenas()
    settings = settings or settings_from_env()
    watch = settings.watch
    kopf.configure(verbose=watch.verbose)
    logging.getLogger("urllib3").setLevel(logging.WARNING)  # one line per API call drowns the handlers' log
    load_config()
    peering = choose_peering(client.ApiClient(), watch.peering, watch.namespaces)
    registry = kopf.OperatorRegistry()
    register(registry, settings)
    if settings.endpoints.metrics_port:
        metrics.serve(settings.endpoints.metrics_port)
    health = settings.endpoints.health_port
    # Replicas peer through one KopfPeering object; distinct priorities make exactly one active.
    asyncio.run(
        kopf.operator(
            registry=registry,
            clusterwide=not watch.namespaces,
            namespaces=watch.namespaces,
            liveness_endpoint=f"http://0.0.0.0:{health}/healthz" if health else None,
            priority=random.randint(1, 2**31 - 1),
            peering_name=peering.name,
            standalone=peering.name is None,
            memo=kopf.Memo(),
        )
    )
