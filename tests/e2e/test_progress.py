"""Progress from a trainer process with the job's own credentials reaches `kubectl get ctj`.

The reporter runs as a local process (no kubelet here) with a token of the job's
ServiceAccount, which the operator created with a Role limited to this job's status.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from .controlplane import ControlPlane
from .operator_process import OperatorProcess, install_peering, operator_process
from .test_operator import apply, automodel_job, fileset, job_status, model, wait_phase

pytestmark = pytest.mark.e2e

REPORTER = textwrap.dedent(
    """
    import json, sys
    from kubetune_trainer.kube_status import ApiCredentials, KubernetesStatusReporter
    from kubetune_trainer.progress import ProgressEvent

    server, token, ca, namespace, name, interval, steps = sys.argv[1:8]
    reporter = KubernetesStatusReporter(namespace, name, ApiCredentials(server, token, ca), float(interval))
    for step in range(1, int(steps) + 1):
        reporter.report(ProgressEvent("step", step=step, max_steps=int(steps), epoch=step / int(steps),
                                      loss=2.0 / step, lr=1e-4, tokens_per_second=1234.5, eta_seconds=1.0))
    reporter.report(ProgressEvent("end", step=int(steps), max_steps=int(steps), epoch=1.0, loss=2.0 / int(steps)))
    reporter.close()
    print(json.dumps({"failures": reporter.failures}))
    """
)


@pytest.fixture(scope="module")
def operator(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    install_peering(control_plane)
    with operator_process(control_plane, tmp_path_factory.mktemp("operator") / "operator.log") as process:
        yield process


def _token(cp: ControlPlane, namespace: str, service_account: str) -> str:
    return cp.kubectl("create", "token", service_account, "-n", namespace, check=True).stdout.strip()


def _report(cp: ControlPlane, token: str, namespace: str, job: str, interval: float, steps: int) -> dict[str, int]:
    result = subprocess.run(
        [sys.executable, "-c", REPORTER, cp.server, token, str(cp.ca_path), namespace, job, str(interval), str(steps)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    outcome: dict[str, int] = json.loads(result.stdout.strip().splitlines()[-1])
    return outcome


def test_progress_reaches_the_job_status(
    control_plane: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    apply(control_plane, namespace, model("base"), fileset("train"), automodel_job("watched"))
    wait_phase(control_plane, namespace, "watched", "Pending")
    token = _token(control_plane, namespace, "watched-trainer")
    # interval 60 s: only the first step and the final values may be sent
    assert _report(control_plane, token, namespace, "watched", 60, 5) == {"failures": 0}
    progress = job_status(control_plane, namespace, "watched")["progress"]
    assert (progress["step"], progress["maxSteps"], progress["percentageDone"]) == (5, 5, 100.0)
    assert progress["trainLoss"] == pytest.approx(0.4) and progress["epoch"] == 1.0
    columns = control_plane.kubectl("get", "ctj", "watched", "-n", namespace, "--no-headers", check=True).stdout.split()
    assert columns[3:5] == ["100", "0.4"], columns
    # the operator's own status keys survive the trainer's merge patches
    assert job_status(control_plane, namespace, "watched")["layout"]["totalGpus"] == 4


def test_the_trainer_token_reaches_only_its_own_job(
    control_plane: ControlPlane, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    apply(control_plane, namespace, model("base"), fileset("train"), automodel_job("mine"), automodel_job("other"))
    wait_phase(control_plane, namespace, "mine", "Pending")
    wait_phase(control_plane, namespace, "other", "Pending")
    token = _token(control_plane, namespace, "mine-trainer")
    assert _report(control_plane, token, namespace, "other", 0, 1) == {"failures": 2}  # step + end: both 403
    kubeconfig = tmp_path / "trainer.kubeconfig"
    kubeconfig.write_text(control_plane.kubeconfig.read_text().replace(control_plane.admin_token, token))

    def can(*args: str) -> str:
        return control_plane.kubectl("auth", "can-i", *args, "-n", namespace, kubeconfig=kubeconfig).stdout.strip()

    assert can("patch", "customizationjobs.kubetune.io/mine", "--subresource=status") == "yes"
    assert can("patch", "customizationjobs.kubetune.io/other", "--subresource=status") == "no"
    assert can("patch", "customizationjobs.kubetune.io/mine") == "no"  # spec stays the user's
    assert can("list", "secrets") == "no"
    assert can("create", "pods") == "no"
