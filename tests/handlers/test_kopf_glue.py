"""The operator's replacements for kopf and kubernetes-client internals give the same answers."""

from __future__ import annotations

import json
from typing import Any, cast

import kopf
import pytest

from kubetune.api.resources import CustomizationJobSpec, Source
from kubetune.handlers.kube import Kube, object_path
from kubetune.handlers.operator import LeanDiffBaseStorage, LeanProgressStorage
from kubetune.planning.layout import compute_layout
from kubetune.render.children import JobInput, render_children

BODY: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "CustomizationJob",
    "metadata": {
        "name": "job",
        "namespace": "team-a",
        "uid": "u-1",
        "generation": 3,
        "labels": {"team": "a"},
        "annotations": {
            "kubetune.io/recheck": "123.4",
            "kopf.zalando.org/last-handled-configuration": json.dumps({"spec": {"suspend": False}}),
            "kubectl.kubernetes.io/last-applied-configuration": "{}",
        },
        "finalizers": ["kubetune.io/finalizer"],
        "managedFields": [{"manager": "kopf", "fieldsV1": {"f:status": {"f:phase": {}}}}],
    },
    "spec": {"automodel": {"model": "base", "dataset": {"training": "train"}}, "suspend": False},
    "status": {"phase": "Pending", "conditions": [{"type": "Validated", "status": "True"}]},
}


@pytest.mark.parametrize(
    "body",
    [
        BODY,
        {**BODY, "metadata": {"name": "bare", "uid": "u-2"}},
        {**BODY, "status": None},
        {**BODY, "metadata": {**BODY["metadata"], "ownerReferences": [{"kind": "Deployment", "uid": "d"}]}},
    ],
)
def test_lean_diff_base_is_kopfs_essence(body: dict[str, Any]) -> None:
    raw = cast(kopf.RawBody, body)
    lean = LeanDiffBaseStorage().build(body=kopf.Body(raw))
    assert lean == kopf.AnnotationsDiffBaseStorage().build(body=kopf.Body(raw))
    assert type(lean["spec"]) is dict  # a plain copy, not shared with the body
    assert lean["spec"] == body["spec"] and lean["spec"] is not body["spec"]


def test_extra_fields_fall_back_to_kopfs_way() -> None:
    raw = cast(kopf.RawBody, BODY)
    fields = ["status.phase"]
    lean = LeanDiffBaseStorage().build(body=kopf.Body(raw), extra_fields=fields)
    assert lean == kopf.AnnotationsDiffBaseStorage().build(body=kopf.Body(raw), extra_fields=fields)
    assert lean["status"] == {"phase": "Pending"}


PROGRESS = {
    "kopf.zalando.org/launch": json.dumps({"started": "2026-12-01T00:00:00", "retries": 1}),
    "kopf.zalando.org/touch-dummy": "x",
}


@pytest.mark.parametrize(
    "essence",
    [
        {"spec": BODY["spec"], "metadata": {"labels": {"team": "a"}, "annotations": {**PROGRESS, "a": "b"}}},
        {"spec": BODY["spec"], "metadata": {"annotations": PROGRESS}},
        {"spec": BODY["spec"], "status": {"kopf": {"progress": {"launch": {"retries": 1}}}, "phase": "Running"}},
        {"spec": BODY["spec"]},
    ],
)
def test_lean_progress_clear_is_kopfs(essence: dict[str, Any]) -> None:
    before = json.dumps(essence, sort_keys=True)
    lean = LeanProgressStorage().clear(essence=cast(kopf.BodyEssence, essence))
    assert lean == kopf.SmartProgressStorage().clear(essence=cast(kopf.BodyEssence, essence))
    assert json.dumps(essence, sort_keys=True) == before  # the essence it was given is unchanged


@pytest.mark.parametrize(
    ("api_version", "kind", "name", "path"),
    [
        ("v1", "ConfigMap", "c", "/api/v1/namespaces/ns/configmaps/c"),
        ("v1", "PersistentVolumeClaim", None, "/api/v1/namespaces/ns/persistentvolumeclaims"),
        (
            "rbac.authorization.k8s.io/v1",
            "RoleBinding",
            "r",
            "/apis/rbac.authorization.k8s.io/v1/namespaces/ns/rolebindings/r",
        ),
        ("kubeflow.org/v1", "PyTorchJob", "p", "/apis/kubeflow.org/v1/namespaces/ns/pytorchjobs/p"),
        ("batch/v1", "Job", "j", "/apis/batch/v1/namespaces/ns/jobs/j"),
    ],
)
def test_object_paths(api_version: str, kind: str, name: str | None, path: str) -> None:
    assert object_path(api_version, kind, "ns", name) == path


@pytest.mark.parametrize(
    "section",
    [
        {"automodel": {"model": "m", "dataset": {"training": "d"}}},
        {"unsloth": {"model": {"name": "m"}, "dataset": {"path": "d"}}},
    ],
)
def test_every_child_kind_has_a_path(section: dict[str, Any]) -> None:
    spec = CustomizationJobSpec.model_validate(section)
    backend = spec.automodel or spec.unsloth
    assert backend is not None
    pvc = Source.model_validate({"pvc": {"claimName": "inputs", "path": "x"}})
    job = JobInput("j", "ns", "uid", spec, compute_layout(backend), {"model": pvc, "training": pvc})
    for child in render_children(job):
        name = child["metadata"]["name"]
        assert object_path(child["apiVersion"], child["kind"], "ns", name).endswith(f"/{name}")


def test_references_are_read_as_the_watch_last_delivered_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seen on the watch: no API read; updated by the next event; forgotten when deleted, and
    read from the API server when never seen (this unit test counts those reads; the e2e
    tests resolve references against the real API server)."""
    from kubernetes import client

    kube = Kube(client.ApiClient())
    reads: list[tuple[str, str, str]] = []

    def api_read(plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        reads.append((plural, namespace, name))
        return None

    monkeypatch.setattr(kube, "get_object", api_read)
    first = {"kind": "Model", "metadata": {"namespace": "ns", "name": "base"}, "spec": {"tokenizer": "a"}}
    second = {**first, "spec": {"tokenizer": "b"}}
    kube.remember("models", first, deleted=False)
    assert kube.get_reference("models", "ns", "base") == first
    kube.remember("models", second, deleted=False)
    assert kube.get_reference("models", "ns", "base") == second
    assert reads == []
    kube.remember("models", second, deleted=True)
    assert kube.get_reference("models", "ns", "base") is None
    assert kube.get_reference("filesets", "ns", "base") is None
    assert reads == [("models", "ns", "base"), ("filesets", "ns", "base")]
