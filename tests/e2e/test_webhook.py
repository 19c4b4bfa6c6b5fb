"""Admission: the validating webhook refuses at `kubectl apply` what needs other objects to judge."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from .controlplane import ControlPlane
from .operator_process import OperatorProcess, free_port, get_json, install_peering, operator_process, wait_for
from .test_operator import automodel_job, fileset, model

pytestmark = pytest.mark.e2e

WEBHOOK = "validate.kubetune.io"


@pytest.fixture(scope="module")
def webhook_operator(
    control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    install_peering(control_plane)
    pki = control_plane.ca_path.parent  # the fixture's CA signed a serving cert for 127.0.0.1
    env = {
        "KUBETUNE_WEBHOOK_ENABLED": "true",
        "KUBETUNE_WEBHOOK_MANAGED": "true",  # no Service here: kopf registers itself by URL
        "KUBETUNE_WEBHOOK_HOST": "127.0.0.1",
        "KUBETUNE_WEBHOOK_PORT": str(free_port()),
        "KUBETUNE_WEBHOOK_CERT_FILE": str(pki / "apiserver.crt"),
        "KUBETUNE_WEBHOOK_KEY_FILE": str(pki / "apiserver.key"),
        "KUBETUNE_WEBHOOK_CA_FILE": str(control_plane.ca_path),
    }
    try:
        with operator_process(control_plane, tmp_path_factory.mktemp("webhook") / "operator.log", **env) as process:
            wait_for(
                "the ValidatingWebhookConfiguration",
                lambda: get_json(control_plane, "validatingwebhookconfiguration", WEBHOOK),
                timeout=60,
            )
            yield process
    finally:
        # Without its server, a leftover webhook would refuse every later job in this session.
        control_plane.kubectl("delete", "validatingwebhookconfiguration", WEBHOOK, "--ignore-not-found")


def _apply(cp: ControlPlane, namespace: str, obj: dict[str, object]) -> tuple[int, str]:
    result = cp.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(obj))
    return result.returncode, result.stdout + result.stderr


@pytest.mark.usefixtures("webhook_operator")
def test_webhook_refuses_a_tokenizer_mismatch_at_apply(control_plane: ControlPlane, namespace: str) -> None:
    for obj in (model("base", tokenizer="llama3"), model("teacher", tokenizer="qwen3"), fileset("train")):
        assert _apply(control_plane, namespace, obj)[0] == 0
    job = automodel_job("distill", training={"training_type": "distillation", "teacher_model": "teacher"})
    code, output = _apply(control_plane, namespace, job)
    assert code != 0, output
    assert "spec.automodel.training.teacher_model: student and teacher must share a tokenizer" in output
    assert get_json(control_plane, "ctj", "distill", "-n", namespace) is None


@pytest.mark.usefixtures("webhook_operator")
def test_webhook_warns_about_missing_references(control_plane: ControlPlane, namespace: str) -> None:
    code, output = _apply(control_plane, namespace, automodel_job("early"))
    assert code == 0, output
    assert "Warning: spec.automodel.model: Model " + namespace + "/base was not found" in output


@pytest.mark.usefixtures("webhook_operator")
def test_webhook_refuses_a_model_on_a_host_path_not_allowed(control_plane: ControlPlane, namespace: str) -> None:
    """Refused at `kubectl apply` of the Model or FileSet itself. A job naming one stored before
    the setting changed is refused at its own admission (tests/handlers/test_admission_fuzz.py)
    and when the operator launches it (tests/e2e/test_operator.py)."""
    for obj in (model("socket"), fileset("socket")):
        obj = {**obj, "spec": {"source": {"hostPath": {"path": "/run/containerd/containerd.sock"}}}}
        code, output = _apply(control_plane, namespace, obj)
        assert code != 0, output
        assert "'/run/containerd/containerd.sock' is not allowed in this cluster" in output
        assert "allowedHostPaths" in output
    allowed = model("allowed")  # under /models, which the tests' operator allows
    assert _apply(control_plane, namespace, allowed)[0] == 0
