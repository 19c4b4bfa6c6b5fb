"""kopf glue: which events call which step of `reconcile.py`. No logic lives here.

- CustomizationJob created / resumed / changed -> `launch` (validate, resolve, create
  children, sync suspend); a timer retries jobs that wait for a Model/FileSet.
- PyTorchJob / batch Job / pod of a job changed -> `follow` (phase, conditions, output).
- Model / FileSet added -> nudge the jobs that wait for it.
- CustomizationJob deleted -> record `Cancelled` (kopf's finalizer holds the deletion until
  then); the children go by garbage collection (owner references).
- Optional validating webhook: the same validator at admission, and the hostPath rule of
  Models and FileSets (allowedHostPaths).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from typing import Any

import kopf

from kubetune.api.common import API_GROUP, API_VERSION
from kubetune.api.resources import TERMINAL_PHASES
from kubetune.handlers import metrics
from kubetune.handlers.events import announce_phase
from kubetune.handlers.kube import Kube, load_config
from kubetune.handlers.reconcile import (
    Operator,
    follow,
    launch,
    manifest_of,
    nudge_waiting_jobs,
    validate_with_references,
)
from kubetune.handlers.settings import OperatorSettings, settings_from_env
from kubetune.planning.lifecycle import condition, merge_conditions
from kubetune.planning.references import cluster_source_problem
from kubetune.planning.rules import IMMUTABLE_MESSAGE, backend_changed
from kubetune.planning.validation import validate_fileset, validate_model

log = logging.getLogger(__name__)

JOBS = (API_GROUP, API_VERSION, "customizationjobs")
MANAGED = {"app.kubernetes.io/managed-by": "kubetune"}
RESYNC_SECONDS = 30.0


def _op(memo: Any) -> Operator:
    op: Operator = memo.op
    return op


def register(registry: kopf.OperatorRegistry, config: OperatorSettings) -> None:
    """Register every handler on `registry` (a function, so tests and `kubetune operator` share it)."""

    def reconcile_job(body: kopf.Body, memo: kopf.Memo, patch: kopf.Patch, **_: Any) -> None:
        with metrics.RECONCILE_DURATION.time():
            status = launch(_op(memo), body)
        patch.status.update(status)
        announce_phase(body, body.get("status"), status)

    for decorator in (kopf.on.resume, kopf.on.create, kopf.on.update):
        decorator(*JOBS, registry=registry, id="launch")(reconcile_job)

    def waiting(status: Mapping[str, Any], **_: Any) -> bool:
        return status.get("phase") == "Created"

    kopf.timer(
        *JOBS, registry=registry, id="recheck-references", interval=config.reference_retry_seconds, when=waiting
    )(reconcile_job)

    def child_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        job_name = body.metadata.labels.get("kubetune.io/job")
        namespace = body.metadata.namespace
        if not job_name or not namespace:
            return
        op = _op(memo)
        job = op.kube.get_object("customizationjobs", namespace, job_name)
        if job is not None:
            follow(op, job)

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

    kopf.timer(*JOBS, registry=registry, id="resync", interval=RESYNC_SECONDS, when=unfinished)(resync)

    def reference_added(body: kopf.Body, event: Mapping[str, Any], memo: kopf.Memo, **_: Any) -> None:
        if event.get("type") in ("ADDED", "MODIFIED", None):
            nudge_waiting_jobs(
                _op(memo), str(body.get("kind")), body.metadata.namespace or "default", body.metadata.name or ""
            )

    for plural in ("models", "filesets"):
        kopf.on.event(API_GROUP, API_VERSION, plural, registry=registry, id="nudge")(reference_added)

    def cancelled(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        status = body.get("status") or {}
        metrics.PHASES.forget(body.metadata.uid or "")
        if status.get("phase") in TERMINAL_PHASES:
            return
        cancel = {
            "phase": "Cancelled",
            "conditions": merge_conditions(
                status.get("conditions"),
                [condition("Complete", False, "Cancelled", "the job was deleted; its children are garbage-collected")],
            ),
        }
        _op(memo).kube.patch_job_status(body.metadata.namespace or "default", body.metadata.name or "", cancel)
        announce_phase(body, status, cancel)

    kopf.on.delete(*JOBS, registry=registry, id="cancel")(cancelled)

    if config.webhook:

        def admit(body: kopf.Body, warnings: list[str], memo: kopf.Memo, **kwargs: Any) -> None:
            old = kwargs.get("old")  # kopf passes the old object on UPDATE
            if old and old.get("spec") and backend_changed(old.get("spec"), body.get("spec")):
                raise kopf.AdmissionError(IMMUTABLE_MESSAGE, code=422)
            op = _op(memo)
            report, _ = validate_with_references(
                op.kube,
                manifest_of(body),
                op.settings.gpu_memory_gib,
                op.settings.allowed_host_paths,
                op.settings.gpu_type,
            )
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
            problem = cluster_source_problem(parsed.source, config.allowed_host_paths) if parsed else None
            if problem:
                raise kopf.AdmissionError(problem, code=422)

        for plural, handler_id in (("models", "validate-model"), ("filesets", "validate-fileset")):
            kopf.on.validate(API_GROUP, API_VERSION, plural, registry=registry, id=handler_id)(admit_source)

    def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        load_config()
        memo.op = Operator(Kube(), config)
        settings.persistence.finalizer = "kubetune.io/finalizer"
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 300
        settings.peering.lifetime = config.peering_lifetime_seconds
        if config.webhook:
            settings.admission.server = kopf.WebhookServer(
                addr="0.0.0.0",
                port=config.webhook_port,
                host=config.webhook_host,
                certfile=config.webhook_cert_file,
                pkeyfile=config.webhook_key_file,
                cafile=config.webhook_ca_file,
            )
            if config.webhook_managed:
                settings.admission.managed = "validate.kubetune.io"

    kopf.on.startup(registry=registry)(startup)
    # kopf registers its credential sources on its default registry only; this one needs them too.
    kopf.on.login(registry=registry)(kopf.login_via_client)


def run(settings: OperatorSettings | None = None) -> None:
    """Run the operator until interrupted (`kubetune operator`)."""
    settings = settings or settings_from_env()
    kopf.configure(verbose=settings.verbose)
    logging.getLogger("urllib3").setLevel(logging.WARNING)  # one line per API call drowns the handlers' log
    registry = kopf.OperatorRegistry()
    register(registry, settings)
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    # Replicas peer through one KopfPeering object; distinct priorities make exactly one active.
    asyncio.run(
        kopf.operator(
            registry=registry,
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            priority=random.randint(1, 2**31 - 1),
            peering_name=settings.peering,
            standalone=False,
            memo=kopf.Memo(),
        )
    )
