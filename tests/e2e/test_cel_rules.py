"""The rule table through the real API server: CRD schema + CEL rules + strict field validation.

The same rows as tests/planning/test_rules.py (tests/cases.py): every row the Python
validator refuses, the API server refuses at the same field path (with the same message
for cross-field rules); every row it accepts, the API server accepts.
"""

from __future__ import annotations

import json
import re

import pytest

from kubetune.planning.rules import IMMUTABLE_MESSAGE, RULES
from tests.cases import RULE_CASES, UNKNOWN_FIELD_CASES, Case, automodel, unsloth

from .controlplane import ControlPlane

pytestmark = pytest.mark.e2e

_INVALID = re.compile(r"(?:^|\s)(spec(?:\.[A-Za-z0-9_]+|\[\d+\])*): ")
_UNKNOWN = re.compile(r'unknown field "([^"]+)"')


def _create(cp: ControlPlane, namespace: str, manifest: dict[str, object], dry_run: bool = True) -> tuple[int, str]:
    args = ["create", "-n", namespace, "--validate=strict", "-o", "json", "-f", "-"]
    if dry_run:
        args.insert(1, "--dry-run=server")
    result = cp.kubectl(*args, stdin=json.dumps(manifest))
    return result.returncode, result.stdout + result.stderr


def _refused_paths(output: str) -> list[str]:
    paths = _INVALID.findall(output)
    return paths + _UNKNOWN.findall(output)


@pytest.fixture(scope="module")
def cases_namespace(control_plane: ControlPlane) -> str:
    control_plane.kubectl("create", "namespace", "cel-cases", check=True)
    return "cel-cases"


@pytest.mark.parametrize("case", RULE_CASES + UNKNOWN_FIELD_CASES, ids=lambda c: c.id)
def test_api_server_agrees_with_the_python_validator(
    control_plane: ControlPlane, cases_namespace: str, case: Case
) -> None:
    code, output = _create(control_plane, cases_namespace, case.manifest)
    if not case.server:  # documented gap: the operator's validator refuses these rows
        assert code == 0, output
        return
    if case.valid:
        assert code == 0, output
        return
    assert code != 0, f"the API server accepted a job the validator refuses:\n{output}"
    assert case.path in _refused_paths(output), output
    if case.rule is not None:
        message = next(r.message for r in RULES if r.name == case.rule and r.path == case.path)
        assert message in output, output


def test_the_api_server_fills_the_seed_defaults(control_plane: ControlPlane, cases_namespace: str) -> None:
    code, output = _create(control_plane, cases_namespace, automodel(), dry_run=False)
    assert code == 0, output
    spec = json.loads(output)["spec"]["automodel"]
    assert spec["optimizer"] == {"learning_rate": 5e-6, "weight_decay": 0.01, "warmup_steps": 0}
    assert spec["batch"] == {"global_batch_size": 8, "micro_batch_size": 1, "sequence_packing": False}
    assert spec["parallelism"]["num_gpus_per_node"] == 1 and "expert_parallel_size" not in spec["parallelism"]
    assert spec["training"]["finetuning_type"] == "lora" and "lora" not in spec["training"]


def test_unsloth_defaults_and_nulls(control_plane: ControlPlane, cases_namespace: str) -> None:
    manifest = unsloth(schedule={"max_steps": None})
    manifest["metadata"]["name"] = "unsloth-defaults"
    code, output = _create(control_plane, cases_namespace, manifest, dry_run=False)
    assert code == 0, output
    spec = json.loads(output)["spec"]["unsloth"]
    assert spec["model"]["load_in_4bit"] is True
    assert spec["training"]["use_gradient_checkpointing"] == "unsloth"
    assert spec["optimizer"] == {"learning_rate": 2e-4, "weight_decay": 0.0, "optim": "adamw_8bit"}
    assert "max_steps" not in spec["schedule"]  # an explicit null is pruned: absent means null


def test_printer_columns(control_plane: ControlPlane, cases_namespace: str) -> None:
    result = control_plane.kubectl("get", "ctj", "-n", cases_namespace, check=True)
    header = result.stdout.splitlines()[0].split()
    assert header == ["NAME", "BACKEND", "PHASE", "PROGRESS", "LOSS", "AGE"]


def _apply(cp: ControlPlane, namespace: str, obj: dict[str, object]) -> tuple[int, str]:
    result = cp.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(obj))
    return result.returncode, result.stdout + result.stderr


def test_the_backend_section_is_immutable(control_plane: ControlPlane, cases_namespace: str) -> None:
    namespace = cases_namespace
    assert not control_plane.kubectl("get", "validatingwebhookconfigurations", "-o", "name").stdout.strip()
    job = automodel()
    job["metadata"]["name"] = "fixed"
    assert _apply(control_plane, namespace, job)[0] == 0
    changed = automodel(optimizer={"learning_rate": 1e-3})
    changed["metadata"]["name"] = "fixed"
    code, output = _apply(control_plane, namespace, changed)
    assert code != 0 and IMMUTABLE_MESSAGE in output, output
    swapped = {**job, "spec": {"unsloth": {"model": {"name": "base"}, "dataset": {"path": "train"}}}}
    code, output = _apply(control_plane, namespace, swapped)
    assert code != 0 and IMMUTABLE_MESSAGE in output, output
    suspended = {**job, "spec": {**job["spec"], "suspend": True}}
    assert _apply(control_plane, namespace, suspended)[0] == 0, "suspend stays mutable"
