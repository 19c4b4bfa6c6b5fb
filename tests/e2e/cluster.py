"""A one-node Kubernetes cluster that runs real pods, with kubetune installed by its chart.

``running_cluster`` builds (or reuses) every binary and image, then starts, in order:
the control plane (``controlplane.py``, every controller), the node (``node.py``:
containerd + runc, kubelet, kube-proxy, kube-scheduler), the images imported into
containerd, CoreDNS, host-directory storage, the Kubeflow training-operator and
kubetune's Helm chart (``addons.py``). The e2e fixture ``cluster`` and
``scripts/cluster.sh up`` (``python -m tests.e2e.cluster up``) are this same code.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import addons
from .controlplane import REPO_ROOT, ClusterNetwork, ControlPlane, find_bin_dir, running
from .images import Image, project_images
from .node import Node, detect_host_ip, running_node
from .procs import ControlPlaneError, log_tails, serve_until_interrupted

STORAGE_VOLUMES = 40
GPUS = 8


@dataclass(frozen=True)
class Cluster:
    cp: ControlPlane
    node: Node
    network: ClusterNetwork
    images: dict[str, Image]
    """Every image imported into the node, by name (trainer, operator, coredns, ...)."""
    operator_namespace: str = "kubetune-system"

    @property
    def workdir(self) -> Path:
        return self.cp.workdir

    def kubectl(self, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.cp.kubectl(*args, **kwargs)  # type: ignore[arg-type]


def find_node_bin_dir(repo_root: Path = REPO_ROOT) -> Path:
    """``tools/node/build.sh`` (a no-op when cached): containerd, runc, CoreDNS, ..."""
    script = repo_root / "tools" / "node" / "build.sh"
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        tail = "\n".join(res.stderr.splitlines()[-30:])
        raise ControlPlaneError(f"`bash {script}` failed (exit {res.returncode}):\n{tail}")
    return Path(res.stdout.strip().splitlines()[-1])


def _step(message: str) -> float:
    print(f"cluster: {message}", file=sys.stderr, flush=True)
    return time.monotonic()


@contextmanager
def running_cluster(workdir: Path, *, install_kubetune: bool = True) -> Iterator[Cluster]:
    """Build what is missing, start everything, stop everything on exit. Raises
    ControlPlaneError with every component's log tail when something does not start."""
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = _step("building or reusing binaries and images (cached after the first run)")
    kube_bin, node_bin = find_bin_dir(), find_node_bin_dir()
    images = {**addons.node_images(node_bin, workdir / "images"), **project_images()}
    network = ClusterNetwork(host_ip=detect_host_ip())
    t1 = _step(f"binaries and images ready after {time.monotonic() - t0:.0f} s; starting the cluster")
    with ExitStack() as stack:
        try:
            cp = stack.enter_context(running(kube_bin, workdir, network))
            node = stack.enter_context(running_node(cp, kube_bin, node_bin, workdir, network, gpus=GPUS))
            _step(f"node {node.name} Ready; importing images")
            for image in images.values():
                node.import_image(image)
            _step("CoreDNS, storage, training-operator")
            addons.install_coredns(cp, network, images["coredns"].ref)
            addons.install_storage(cp, workdir / "volumes", STORAGE_VOLUMES)
            addons.install_training_operator(
                cp, node_bin, workdir, images["training-operator"].ref, images["pytorch-init"].ref
            )
            if install_kubetune:
                _step("kubetune (helm install charts/kubetune)")
                addons.install_kubetune(cp, images["operator"].ref, images["trainer"].ref)
                addons.stage_examples(cp)
        except ControlPlaneError as exc:
            tails = log_tails(workdir)  # before the processes stop: what they said while failing
            stack.close()
            raise ControlPlaneError(f"{exc}\n{tails}") from exc
        _step(f"cluster up after {time.monotonic() - t1:.0f} s")
        yield Cluster(cp, node, network, images)


def _debug_session(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/cluster.sh", description="Run a one-node cluster with kubetune installed until Ctrl-C."
    )
    parser.add_argument("command", choices=["up"], help="start and wait for Ctrl-C")
    parser.add_argument("--workdir", type=Path, help="keep certs, kubeconfigs, logs and volumes here")
    parser.add_argument("--no-kubetune", action="store_true", help="leave kubetune out (install it yourself)")
    args = parser.parse_args(argv)
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="kubetune-cluster-"))).resolve()

    def announce(cluster: Cluster) -> None:
        cp = cluster.cp
        print(f"cluster up: {cp.server}, node {cluster.node.name} (logs in {workdir})")
        print(f"export KUBECONFIG={cp.kubeconfig}")
        print(f"export PATH={cp.bin_dir}:$PATH     # kubectl, helm")
        print(f"# trainer image: {cluster.images['trainer'].ref}")
        print("# try: kubectl apply -f examples/cluster-quickstart.yaml; kubectl get ctj -w")

    return serve_until_interrupted(running_cluster(workdir, install_kubetune=not args.no_kubetune), announce)


if __name__ == "__main__":
    sys.exit(_debug_session())
