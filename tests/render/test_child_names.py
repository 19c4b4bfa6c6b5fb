"""Every child of every job gets a name valid for its kind and unique to its job.

A table of jobs with 1- to 63-character names, letter- and digit-first, pairs that differ
only in their last character, and Model/FileSet/output names with dots, each rendered the
way `kubetune render` (and the operator) renders it. The rules are written here as regular
expressions, independently of the code under test (k8s.io/apimachinery/pkg/util/validation).
"""

from __future__ import annotations

import io
import re
from collections import defaultdict
from typing import Any

import pytest
import yaml

from kubetune.cli.documents import load_text
from kubetune.cli.render import run_render
from kubetune.cli.validate import validate_documents
from kubetune.planning.resolved import output_name
from kubetune.render.children import ChildNames

DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
DNS1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
QUALIFIED_NAME = re.compile(
    r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
)
NUM_NODES = 4096  # the most a job may ask for: worker Services up to `<name>-worker-4094`


def is_label(name: str) -> bool:
    return len(name) <= 63 and DNS1123_LABEL.fullmatch(name) is not None


def is_subdomain(name: str) -> bool:
    return len(name) <= 253 and DNS1123_SUBDOMAIN.fullmatch(name) is not None


def is_dns1035(name: str) -> bool:
    return len(name) <= 63 and DNS1035_LABEL.fullmatch(name) is not None


def _pytorchjob_ok(name: str) -> bool:
    # The training-operator's webhook wants a DNS-1035 label, and it names a Service (and a
    # pod) after every replica: each of those must be a DNS-1035 label of at most 63 too.
    replicas = [f"{name}-master-0", *(f"{name}-worker-{i}" for i in (0, NUM_NODES - 2))]
    return is_dns1035(name) and all(is_dns1035(replica) for replica in replicas)


def _batch_job_ok(name: str) -> bool:
    # A Job's name goes into its pods' `job-name` label: a subdomain that is also a label value.
    return is_subdomain(name) and len(name) <= 63


NAME_RULES = {
    "ServiceAccount": is_subdomain,
    "Role": is_subdomain,
    "RoleBinding": is_subdomain,
    "ConfigMap": is_subdomain,
    "PersistentVolumeClaim": is_subdomain,
    "PyTorchJob": _pytorchjob_ok,
    "Job": _batch_job_ok,
}


def _job_names() -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    names = set()
    for length in range(1, 64):
        body = "".join(letters[(i * 7) % len(letters)] for i in range(length))
        names.add(("q" + body)[:length])  # letter first
        names.add(("7" + body)[:length])  # digit first
        names.add("a" * length)
        if length > 2:
            names.add("a" * (length - 1) + "b")  # differs from a*length only at the end
            names.add("1" * (length - 1) + "z")
            names.add(("x-" * 32)[: length - 1] + "9")  # a hyphen where a cut may fall
    return sorted(n for n in names if is_label(n))


JOB_NAMES = _job_names()

BUNDLE = """
apiVersion: kubetune.io/v1alpha1
kind: Model
metadata: {{name: llama-3.1-8b-instruct, namespace: team-a}}
spec: {{source: {{pvc: {{claimName: models.v2, path: /llama}}}}, tokenizer: llama3, numParameters: 8000000000}}
---
apiVersion: kubetune.io/v1alpha1
kind: FileSet
metadata: {{name: chats.2024-v1, namespace: team-a}}
spec: {{source: {{pvc: {{claimName: datasets, path: /chats}}}}}}
---
apiVersion: kubetune.io/v1alpha1
kind: CustomizationJob
metadata: {{name: "{name}", namespace: team-a}}
spec:
  {backend}
"""
AUTOMODEL = """automodel:
    model: llama-3.1-8b-instruct
    dataset: {{training: chats.2024-v1}}
    parallelism: {{num_nodes: 2, num_gpus_per_node: 8}}
    batch: {{global_batch_size: 16, micro_batch_size: 1}}
    {output}"""
UNSLOTH = """unsloth:
    model: {{name: llama-3.1-8b-instruct}}
    dataset: {{path: team-a/chats.2024-v1}}
    {output}"""


def _bundle(name: str, backend: str, output: str = "") -> str:
    section = (AUTOMODEL if backend == "automodel" else UNSLOTH).format(output=output)
    return BUNDLE.format(name=name, backend=section)


def _render(text: str) -> list[dict[str, Any]]:
    out, err = io.StringIO(), io.StringIO()
    assert run_render(load_text(text), out, err) == 0, err.getvalue()
    return [doc for doc in yaml.safe_load_all(out.getvalue()) if doc]


def _check_metadata(child: dict[str, Any]) -> None:
    metadata = child["metadata"]
    for key, value in {**metadata.get("labels", {}), **_template_labels(child)}.items():
        assert QUALIFIED_NAME.fullmatch(key), key
        assert len(value) <= 63 and LABEL_VALUE.fullmatch(value), (key, value)
    for key in metadata.get("annotations", {}):
        assert QUALIFIED_NAME.fullmatch(key), key


def _template_labels(child: dict[str, Any]) -> dict[str, str]:
    spec = child.get("spec", {})
    templates = [r["template"] for r in spec.get("pytorchReplicaSpecs", {}).values()]
    if "template" in spec:
        templates.append(spec["template"])
    return {k: v for template in templates for k, v in template["metadata"].get("labels", {}).items()}


@pytest.mark.parametrize("backend", ["automodel", "unsloth"])
def test_every_child_name_is_valid_and_unique(backend: str) -> None:
    owners: dict[tuple[str, str], set[str]] = defaultdict(set)
    for job in JOB_NAMES:
        children = _render(_bundle(job, backend))
        assert {child["kind"] for child in children} >= {"ConfigMap", "PyTorchJob" if backend == "automodel" else "Job"}
        for child in children:
            name = child["metadata"]["name"]
            assert NAME_RULES[child["kind"]](name), f"{child['kind']} {name!r} of job {job!r}"
            _check_metadata(child)
            owners[(child["kind"], name)].add(job)
        # The operator finds the workload again by the same rule (reconcile reads it by name).
        workload = next(c for c in children if c["kind"] in ("PyTorchJob", "Job"))
        assert workload["metadata"]["name"] == ChildNames(job).workload
    shared = {key: jobs for key, jobs in owners.items() if len(jobs) > 1}
    assert not shared, f"children shared by several jobs: {list(shared.items())[:3]}"
    # Every name of the table is in it, so every length from 1 to 63 has run.
    assert {len(name) for name in JOB_NAMES} == set(range(1, 64))


def test_the_issue_cases() -> None:
    assert ChildNames("7b-tune").workload != "7b-tune-train"
    assert is_dns1035(ChildNames("7b-tune").workload)
    long_a, long_b = "a" * 63, "a" * 62 + "b"
    assert ChildNames(long_a).workload != ChildNames(long_b).workload
    assert ChildNames(long_a).config_map != ChildNames(long_b).config_map
    assert ChildNames("qwen-lora").workload == "qwen-lora-train"  # short names stay readable


@pytest.mark.parametrize("name", ["llama-3.1-8b-instruct", "a", "qwen3.5-" + "x" * 240])
def test_dotted_output_names(name: str) -> None:
    assert is_subdomain(name)
    for backend in ("automodel", "unsloth"):
        text = _bundle("job", backend, output=f"output: {{name: {name}}}")
        _, reports = validate_documents(load_text(text))
        report = reports[0][1]
        assert report.valid, report.errors
        assert report.section is not None and output_name(report.section, "job") == name
        _render(text)


@pytest.mark.parametrize("job", ["a" * 63, "7" * 63, "x"])
def test_default_output_name_is_a_model_name(job: str) -> None:
    _, reports = validate_documents(load_text(_bundle(job, "unsloth")))
    section = reports[0][1].section
    assert section is not None and is_subdomain(output_name(section, job))


@pytest.mark.parametrize(
    ("reference", "valid"),
    [
        ("llama-3.1-8b-instruct", True),
        ("team-a/llama-3.1-8b-instruct", True),
        ("team.a/llama", False),  # the workspace is a namespace: no dots
        ("Llama-3.1", False),
        ("llama..3", False),
        ("llama-3.1.", False),
        ("a/b/c", False),
        ("x" * 254, False),
    ],
)
def test_references_follow_the_object_name_rule(reference: str, valid: bool) -> None:
    text = _bundle("job", "automodel").replace("model: llama-3.1-8b-instruct", f"model: {reference}")
    _, reports = validate_documents(load_text(text))
    errors = [e for e in reports[0][1].errors if e.path == "spec.automodel.model"]
    assert (not errors) == valid, errors
