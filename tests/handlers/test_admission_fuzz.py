"""The admission webhook's handler never crashes: a refusal is an AdmissionReview with code 422.

The request goes through kopf's own admission entry point (what its HTTP server calls for
every POST) with the operator's registry, so what is checked is the answer the API server
gets: `allowed: true`, or `allowed: false` with status code 422 and one `path: message` line
per error. A handler that raised anything else would show as code 500. FUZZ_EXAMPLES (10,000)
mutated jobs, CREATE and UPDATE, against mutated Models/FileSets in the "cluster"; about
80 s of CPU (measured: 366 s wall on this 2-core machine under a load of ~10).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any, cast

import kopf
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kopf._cogs.structs import references
from kopf._core.engines.admission import serve_admission_request
from kopf._core.engines.indexing import OperatorIndexers
from kopf._core.reactor.inventory import ResourceMemories

from kubetune.handlers.kube import Kube
from kubetune.handlers.operator import register
from kubetune.handlers.reconcile import Operator
from kubetune.handlers.settings import KubetuneSettings, WebhookSettings

from ..manifests_fuzz import EXAMPLE_JOBS, EXAMPLE_OBJECTS, FUZZ_SETTINGS, mutated

PLURALS = {"Model": "models", "FileSet": "filesets"}
JOBS = references.Resource(
    group="kubetune.io", version="v1alpha1", plural="customizationjobs", kind="CustomizationJob", namespaced=True
)


class ObjectsKube:
    """The part of `Kube` validation reads (get_reference), answered from a dict of objects."""

    def __init__(self, objects: list[Any]) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        for obj in objects:
            metadata = obj.get("metadata") if isinstance(obj, dict) else None
            kind = obj.get("kind") if isinstance(obj, dict) else None
            if (
                isinstance(metadata, dict)
                and isinstance(kind, str)
                and kind in PLURALS
                and isinstance(metadata.get("name"), str)
            ):
                key = (PLURALS[kind], str(metadata.get("namespace") or "team-a"), metadata["name"])
                self.objects[key] = obj

    def get_reference(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((plural, namespace, name))


class Webhook:
    """kopf's admission entry point with the operator's handlers registered."""

    def __init__(self) -> None:
        self.config = KubetuneSettings(webhook=WebhookSettings(enabled=True))
        self.registry = kopf.OperatorRegistry()
        register(self.registry, self.config)
        self.loop = asyncio.new_event_loop()
        self.insights = references.Insights(webhook_resources={JOBS})
        self.indices = OperatorIndexers().indices

    def review(self, kube: ObjectsKube, request: dict[str, Any]) -> dict[str, Any]:
        memo = kopf.Memo(op=Operator(cast(Kube, kube), self.config))
        response = serve_admission_request(
            cast(Any, request),
            settings=kopf.OperatorSettings(),
            # kopf keeps a memo per object uid (copied from memobase once): a fresh store per
            # review, or a later review would see the first review's objects.
            memories=ResourceMemories(),
            memobase=memo,
            registry=self.registry,
            insights=self.insights,
            indices=self.indices,
        )
        return cast(dict[str, Any], self.loop.run_until_complete(response))


@pytest.fixture(scope="module")
def webhook() -> Iterator[Webhook]:
    logging.getLogger("kopf").setLevel(logging.CRITICAL)  # every refusal is an ERROR line of kopf's
    hook = Webhook()
    yield hook
    hook.loop.close()


def _as_stored(document: Any, uid: str) -> dict[str, Any]:
    """What the API server sends: always an object with metadata (name, namespace, uid)."""
    obj = dict(document) if isinstance(document, dict) else {"spec": document}
    metadata = obj.get("metadata")
    metadata = dict(metadata) if isinstance(metadata, dict) else {}
    name = metadata.get("name")
    metadata.update(name=name if isinstance(name, str) else "fuzzed", namespace="team-a", uid=uid)
    obj["metadata"] = metadata
    return obj


def _request(new: Any, old: Any | None) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "uid": "fuzz-request",
        "kind": {"group": "kubetune.io", "version": "v1alpha1", "kind": "CustomizationJob"},
        "resource": {"group": "kubetune.io", "version": "v1alpha1", "resource": "customizationjobs"},
        "namespace": "team-a",
        "operation": "CREATE" if old is None else "UPDATE",
        "userInfo": {"username": "fuzz"},
        "object": _as_stored(new, "uid-1"),
    }
    if old is not None:
        payload["oldObject"] = _as_stored(old, "uid-1")
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": payload}


# JSON on the wire has no NaN or infinity: `finite=True`.
_OBJECTS = st.lists(mutated(EXAMPLE_OBJECTS, finite=True), max_size=1)
_OLD = st.one_of(st.none(), st.sampled_from(EXAMPLE_JOBS))


@FUZZ_SETTINGS
@given(new=mutated(EXAMPLE_JOBS, finite=True), old=_OLD, objects=_OBJECTS)
def test_every_request_gets_an_answer(webhook: Webhook, new: Any, old: Any, objects: list[Any]) -> None:
    kube = ObjectsKube([{**obj, "metadata": {**obj["metadata"], "namespace": "team-a"}} for obj in EXAMPLE_OBJECTS])
    kube.objects.update(ObjectsKube(objects).objects)
    review = webhook.review(kube, _request(new, old))
    answer = review["response"]
    assert answer["uid"] == "fuzz-request"
    if answer["allowed"]:
        assert "status" not in answer
        return
    status = answer["status"]
    assert status["code"] == 422, status["message"]
    for line in status["message"].splitlines():
        path, _, message = line.partition(": ")
        assert path and message, line


def test_a_refusal_names_the_field(webhook: Webhook) -> None:
    """The property above holds for refusals too: a known bad job is refused with its path."""
    job = {
        **EXAMPLE_JOBS[0],
        "spec": {"automodel": {**EXAMPLE_JOBS[0]["spec"]["automodel"], "training": {"finetuning_type": ["lora"]}}},
    }
    answer = webhook.review(ObjectsKube([]), _request(job, None))["response"]
    assert answer["allowed"] is False
    assert answer["status"]["code"] == 422
    assert "spec.automodel.training.finetuning_type: must be one of" in answer["status"]["message"]


def test_a_job_on_a_host_path_outside_allowed_host_paths_is_refused(webhook: Webhook) -> None:
    job = EXAMPLE_JOBS[0]  # names Model qwen3-1-7b in team-a
    model = next(o for o in EXAMPLE_OBJECTS if o["metadata"]["name"] == job["spec"]["automodel"]["model"])
    on_node = {**model, "spec": {**model["spec"], "source": {"hostPath": {"path": "/var/lib/kubelet"}}}}
    kube = ObjectsKube([*EXAMPLE_OBJECTS, on_node])
    answer = webhook.review(kube, _request(job, None))["response"]
    assert answer["allowed"] is False and answer["status"]["code"] == 422
    assert "spec.automodel.model: Model team-a/qwen3-1-7b is invalid" in answer["status"]["message"]
    assert "allowedHostPaths" in answer["status"]["message"]
