"""The operator's replacements for kopf and kubernetes-client internals give the same answers."""

from __future__ import annotations

import json
from typing import Any, cast

import kopf
import pytest

from kubetune.api.resources import CustomizationJobSpec, Source
from kubetune.handlers.kube import object_path
from kubetune.handlers.operator import LeanDiffBaseStorage
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
    assert LeanDiffBaseStorage().build(body=kopf.Body(raw)) == kopf.AnnotationsDiffBaseStorage().build(
        body=kopf.Body(raw)
    )


def test_extra_fields_fall_back_to_kopfs_way() -> None:
    raw = cast(kopf.RawBody, BODY)
    fields = ["status.phase"]
    lean = LeanDiffBaseStorage().build(body=kopf.Body(raw), extra_fields=fields)
    assert lean == kopf.AnnotationsDiffBaseStorage().build(body=kopf.Body(raw), extra_fields=fields)
    assert lean["status"] == {"phase": "Pending"}


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
