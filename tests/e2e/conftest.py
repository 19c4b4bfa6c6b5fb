"""Fixtures for e2e tests: one real control plane per pytest session.

``control_plane`` (session) starts etcd, kube-apiserver and kube-controller-manager on
127.0.0.1, installs the CRDs (``crds/*.yaml`` and the vendored Kubeflow PyTorchJob CRD),
exports ``KUBECONFIG`` (admin) for this process and its children, puts the control-plane
bin dir (kubectl, helm) first on ``PATH``, and stops everything at the end of the session.
The binaries come from ``$KUBETUNE_CP_BIN`` or ``tools/controlplane/build.sh`` (cached).
Missing binaries fail the tests; they are never skipped.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from .cluster import Cluster, running_cluster
from .controlplane import ControlPlane, crd_files, find_bin_dir, install_manifests, running
from .procs import ControlPlaneError


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A running control plane; see ``tests/e2e/controlplane.py:ControlPlane``."""
    stack = ExitStack()
    error = ""
    try:
        bin_dir = find_bin_dir()
        cp = stack.enter_context(running(bin_dir, tmp_path_factory.mktemp("controlplane")))
        install_manifests(cp, crd_files())
    except ControlPlaneError as exc:
        error = str(exc)
        stack.close()
    except BaseException:  # KeyboardInterrupt during startup too: stop what started
        stack.close()
        raise
    if error:  # outside the except block: one clean message, no exception chain
        pytest.fail(f"e2e control plane unavailable: {error}", pytrace=False)
    saved = {k: os.environ.get(k) for k in ("KUBECONFIG", "PATH")}
    os.environ["KUBECONFIG"] = str(cp.kubeconfig)
    os.environ["PATH"] = f"{cp.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    try:
        with stack:
            yield cp
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def namespace(control_plane: ControlPlane) -> Iterator[str]:
    """A fresh namespace ``e2e-<random>``, deleted (without waiting) after the test."""
    name = f"e2e-{secrets.token_hex(4)}"
    control_plane.kubectl("create", "namespace", name, check=True)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A one-node cluster that runs real pods, with kubetune installed by its chart; see
    ``tests/e2e/cluster.py``. Separate from ``control_plane`` (whose tests write pod and
    PyTorchJob statuses themselves): here only the kubelet and the controllers do."""
    stack = ExitStack()
    error = ""
    try:
        running = stack.enter_context(running_cluster(tmp_path_factory.mktemp("cluster")))
    except ControlPlaneError as exc:
        error = str(exc)
        stack.close()
    except BaseException:
        stack.close()
        raise
    if error:
        pytest.fail(f"e2e cluster unavailable: {error}", pytrace=False)
    with stack:
        yield running


@pytest.fixture
def cluster_namespace(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace in ``cluster``, deleted (without waiting) after the test."""
    name = f"e2e-{secrets.token_hex(4)}"
    cluster.kubectl("create", "namespace", name, check=True)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found")
