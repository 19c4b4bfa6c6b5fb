"""`kubetune operator` out of the box: a cluster with only `crds/` applied, no kopf peering.

Its own control plane (the session one gets kopf's peering CRDs from other tests). Without
the peering resources the operator runs standalone, says so, and launches jobs; a peering
named in KUBETUNE_PEERING that does not exist stops it with an error naming what is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .controlplane import ControlPlane, crd_files, find_bin_dir, install_manifests, running
from .operator_process import operator_process
from .test_operator import apply, automodel_job, fileset, get_json, job_status, model, wait_phase

pytestmark = pytest.mark.e2e

PEERING_CRDS = Path(__file__).resolve().parents[2] / "third_party" / "kopf" / "peering.yaml"


@pytest.fixture(scope="module")
def bare_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with running(find_bin_dir(), tmp_path_factory.mktemp("bare")) as cp:
        install_manifests(cp, crd_files())  # crds/ and the PyTorchJob CRD, nothing of kopf's
        yield cp


def run_operator(cp: ControlPlane, peering: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "KUBECONFIG": str(cp.kubeconfig),
        "KUBETUNE_METRICS_PORT": "0",
        "KUBETUNE_HEALTH_PORT": "0",
        "KUBETUNE_PEERING": peering,
    }
    kubetune = Path(sys.executable).parent / "kubetune"
    return subprocess.run([str(kubetune), "operator"], env=env, capture_output=True, text=True, timeout=60)


def rechecked(cp: ControlPlane, job: str) -> str | None:
    """The operator's nudge annotation on a job (None: never nudged)."""
    annotations = (get_json(cp, "ctj", job, "-n", "solo") or {})["metadata"].get("annotations", {})
    return annotations.get("kubetune.io/recheck")


def test_without_peering_it_runs_standalone_and_launches(bare_cluster: ControlPlane, tmp_path: Path) -> None:
    cp = bare_cluster
    cp.kubectl("create", "namespace", "solo", check=True)
    log = tmp_path / "operator.log"
    # No timer re-check within the test: only the watch on Models can start a waiting job.
    with operator_process(cp, log, KUBETUNE_REFERENCE_RETRY_SECONDS="600"):
        apply(cp, "solo", model("base"), fileset("train"), automodel_job("solo"))
        wait_phase(cp, "solo", "solo", "Pending")
        assert get_json(cp, "pytorchjob", "solo-train", "-n", "solo") is not None

        # A new Model nudges exactly the jobs waiting for it (kopf's index of waiting jobs).
        apply(cp, "solo", automodel_job("waiter", model="late"), automodel_job("other", model="never"))
        wait_phase(cp, "solo", "waiter", "Created")
        wait_phase(cp, "solo", "other", "Created")
        before = {name: rechecked(cp, name) for name in ("solo", "other")}
        apply(cp, "solo", model("late"))
        wait_phase(cp, "solo", "waiter", "Pending", timeout=30)
        assert {name: rechecked(cp, name) for name in ("solo", "other")} == before  # untouched
        assert job_status(cp, "solo", "other")["phase"] == "Created"
    text = log.read_text()
    assert "running standalone, without kopf peering" in text
    assert "clusterkopfpeerings.kopf.dev is not installed" in text


def test_a_named_peering_that_is_missing_is_an_error(bare_cluster: ControlPlane) -> None:
    result = run_operator(bare_cluster, "team-peering")
    assert result.returncode != 0
    assert "KUBETUNE_PEERING='team-peering'" in result.stderr
    assert "the CRD clusterkopfpeerings.kopf.dev is not installed" in result.stderr
    assert "Traceback" not in result.stderr

    bare_cluster.kubectl("apply", "-f", str(PEERING_CRDS), check=True)
    bare_cluster.kubectl(
        "wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev", "--timeout=30s", check=True
    )
    result = run_operator(bare_cluster, "team-peering")
    assert result.returncode != 0
    assert "ClusterKopfPeering team-peering does not exist" in result.stderr
