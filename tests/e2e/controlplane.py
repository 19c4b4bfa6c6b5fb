"""A real Kubernetes control plane on 127.0.0.1 for the e2e tests.

etcd, kube-apiserver and kube-controller-manager (garbage collector, namespace and
service-account controllers) run as child processes, built from source by
``tools/controlplane/build.sh``. There is no kubelet: pods are stored, never run.

Standard library only (plus the ``openssl`` CLI), so that ``python -m
tests.e2e.controlplane up`` works from any Python for a debug session.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from .certs import Certs, generate_certs
from .procs import ControlPlaneError, Process, free_port, log_tails, serve_until_interrupted, wait_http

_REQUEST_SAMPLE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_HINT = (
    "Build the control plane with `bash tools/controlplane/build.sh` (needs Go >= 1.26 and the Go "
    "module proxy; about 7-10 min cold, cached afterwards) and/or set KUBETUNE_CP_BIN to the "
    "directory it prints. See docs/testing.md."
)
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl")
# Canonical names from k8s.io/kubernetes cmd/kube-controller-manager/names.
CONTROLLERS = (
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    # Merges ClusterRoles labelled aggregate-to-edit/-view into the built-in user roles.
    "clusterrole-aggregation-controller",
    # Lifts the pvc-protection finalizer of claims no pod uses: without it a deleted namespace
    # that held a job's output claim stays Terminating, and its controller keeps retrying.
    "persistentvolumeclaim-protection-controller",
)
ADMIN_USER = "e2e-admin"
UNPRIVILEGED_USER = "e2e-user"
START_TIMEOUT_S = 120.0
AUDIT_LOG = "audit.log"
# Only what the request-counting tests read: the resources an operator touches per job. Audit
# events carry the namespace and client, so a test counts its own job's requests whatever
# other tests' jobs are doing at the same time (the API server's metrics are global).
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived", "ResponseStarted"],
    "rules": [
        {
            "level": "Metadata",
            "resources": [
                {"group": "kubetune.io", "resources": ["customizationjobs", "customizationjobs/status"]},
                {"group": "kubeflow.org", "resources": ["pytorchjobs"]},
                {"group": "", "resources": ["pods"]},
            ],
        },
        {"level": "None"},
    ],
}


@dataclass(frozen=True)
class ControlPlane:
    """A running control plane. Kubeconfigs are JSON (valid YAML)."""

    server: str
    ca_path: Path
    admin_token: str
    user_token: str
    kubeconfig: Path
    user_kubeconfig: Path
    bin_dir: Path
    workdir: Path

    def kubectl(
        self,
        *args: str,
        kubeconfig: Path | None = None,
        stdin: str | None = None,
        check: bool = False,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl (admin kubeconfig unless another is given); never raises unless check."""
        argv = [
            str(self.bin_dir / "kubectl"),
            f"--kubeconfig={kubeconfig or self.kubeconfig}",
            f"--cache-dir={self.workdir / 'kubectl-cache'}",
            *args,
        ]
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=check, timeout=timeout)

    def kubectl_popen(self, *args: str) -> subprocess.Popen[str]:
        """kubectl in the background (a ``--watch``), stdout as a text pipe; the caller kills it."""
        argv = [
            str(self.bin_dir / "kubectl"),
            f"--kubeconfig={self.kubeconfig}",
            f"--cache-dir={self.workdir / 'kubectl-cache'}",
            *args,
        ]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def helm(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Run helm against this cluster (admin kubeconfig); never raises."""
        argv = [str(self.bin_dir / "helm"), f"--kubeconfig={self.kubeconfig}", *args]
        return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)

    def served_requests(self) -> Counter[str]:
        """Requests the API server has served since it started, by "VERB resource[/subresource]"
        (its own `apiserver_request_total`; watches and discovery left out)."""
        counts: Counter[str] = Counter()
        for line in self.kubectl("get", "--raw", "/metrics", check=True).stdout.splitlines():
            sample = _REQUEST_SAMPLE.match(line)
            if sample is None:
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', sample["labels"]))
            if labels.get("verb") == "WATCH" or not labels.get("resource"):
                continue
            subresource = f"/{labels['subresource']}" if labels.get("subresource") else ""
            counts[f"{labels.get('verb')} {labels.get('resource')}{subresource}"] += int(float(sample["value"]))
        return counts

    def namespace_requests(self, namespace: str) -> Counter[str]:
        """Completed requests for custom jobs, PyTorchJobs and pods in one namespace, by
        "verb resource[/subresource]" (lower-case verbs, as the audit log writes them)."""
        counts: Counter[str] = Counter()
        log = self.workdir / AUDIT_LOG
        for line in log.read_text().splitlines() if log.exists() else []:
            event = json.loads(line)
            ref = event.get("objectRef") or {}
            if event.get("stage") != "ResponseComplete" or ref.get("namespace") != namespace:
                continue
            subresource = f"/{ref['subresource']}" if ref.get("subresource") else ""
            counts[f"{event['verb']} {ref.get('resource')}{subresource}"] += 1
        return counts

    def user_kubectl(
        self, *args: str, stdin: str | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl as the unprivileged token user ``e2e-user`` (no RBAC rights at all)."""
        return self.kubectl(*args, kubeconfig=self.user_kubeconfig, stdin=stdin, timeout=timeout)


def pinned_version(repo_root: Path = REPO_ROOT) -> str:
    """The k8s.io/kubernetes version that tools/controlplane/go.mod pins, e.g. ``v1.37.2``."""
    gomod = (repo_root / "tools" / "controlplane" / "go.mod").read_text()
    match = re.search(r"^(?:require\s+)?\s*k8s\.io/kubernetes\s+(v\S+)", gomod, re.MULTILINE)
    if match:
        return match.group(1)
    raise ControlPlaneError("k8s.io/kubernetes not found in tools/controlplane/go.mod")


def find_bin_dir(repo_root: Path = REPO_ROOT) -> Path:
    """``$KUBETUNE_CP_BIN`` if set, else the cache dir of ``build.sh`` (a no-op when cached)."""
    env = os.environ.get("KUBETUNE_CP_BIN")
    if env:
        bin_dir = Path(env)
    else:
        script = repo_root / "tools" / "controlplane" / "build.sh"
        try:
            res = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=False)
        except OSError as exc:
            raise ControlPlaneError(f"cannot run {script}: {exc}\n{BUILD_HINT}") from exc
        if res.returncode != 0:
            tail = "\n".join(res.stderr.splitlines()[-30:])
            raise ControlPlaneError(f"`bash {script}` failed (exit {res.returncode}):\n{tail}\n{BUILD_HINT}")
        bin_dir = Path(res.stdout.strip().splitlines()[-1])
    missing = [b for b in BINARIES if not os.access(bin_dir / b, os.X_OK)]
    if missing:
        raise ControlPlaneError(f"{bin_dir} lacks {', '.join(missing)}.\n{BUILD_HINT}")
    return bin_dir


def _kubeconfig(path: Path, server: str, ca: Path, user: str, token: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "kubetune-e2e",
                "cluster": {"server": server, "certificate-authority": str(ca)},
            }
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [
            {
                "name": "kubetune-e2e",
                "context": {"cluster": "kubetune-e2e", "user": user, "namespace": "default"},
            }
        ],
        "current-context": "kubetune-e2e",
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    path.chmod(0o600)
    return path


def _start_etcd(stack: ExitStack, bin_dir: Path, workdir: Path) -> str:
    client, peer = free_port(), free_port()
    url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    proc = stack.enter_context(
        Process.start(
            "etcd",
            [
                str(bin_dir / "etcd"),
                "--name=default",
                f"--data-dir={workdir / 'etcd-data'}",
                f"--listen-client-urls={url}",
                f"--advertise-client-urls={url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
            workdir,
        )
    )
    wait_http(f"{url}/health", [proc], START_TIMEOUT_S)
    return url


def _start_apiserver(
    stack: ExitStack,
    bin_dir: Path,
    workdir: Path,
    certs: Certs,
    etcd_url: str,
    admin_token: str,
    pod_network: ClusterNetwork | None,
) -> tuple[str, Process]:
    port = free_port()
    server = f"https://127.0.0.1:{port}"
    audit_policy = workdir / "audit-policy.json"
    audit_policy.write_text(json.dumps(AUDIT_POLICY, indent=2) + "\n")
    if pod_network is None:
        address = [
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            # The lease reconciler refuses a loopback address (it would publish it as the
            # endpoint of service/kubernetes, for pods, and there are no pods here).
            "--endpoint-reconciler-type=none",
        ]
    else:
        # Pods reach the API server through service/kubernetes, whose endpoint is the
        # advertised address: the machine's own, on every interface.
        address = [
            "--bind-address=0.0.0.0",
            f"--advertise-address={pod_network.host_ip}",
            "--kubelet-preferred-address-types=InternalIP",
        ]
    service_cidr = pod_network.service_cidr if pod_network else "10.0.0.0/24"
    proc = stack.enter_context(
        Process.start(
            "kube-apiserver",
            [
                str(bin_dir / "kube-apiserver"),
                f"--etcd-servers={etcd_url}",
                *address,
                f"--secure-port={port}",
                f"--cert-dir={workdir / 'apiserver-certs'}",
                f"--tls-cert-file={certs.server_cert}",
                f"--tls-private-key-file={certs.server_key}",
                f"--service-account-issuer={server}",
                f"--service-account-key-file={certs.sa_key}",
                f"--service-account-signing-key-file={certs.sa_key}",
                f"--service-cluster-ip-range={service_cidr}",
                "--authorization-mode=RBAC",
                f"--token-auth-file={certs.token_file}",
                "--allow-privileged=true",
                "--profiling=false",
                f"--audit-policy-file={audit_policy}",
                f"--audit-log-path={workdir / AUDIT_LOG}",
                "--audit-log-format=json",
                "--audit-log-maxbackup=0",
            ],
            workdir,
        )
    )
    wait_http(f"{server}/readyz", [proc], START_TIMEOUT_S, ca=certs.ca_cert, token=admin_token)
    return server, proc


def _start_controller_manager(
    stack: ExitStack, bin_dir: Path, workdir: Path, certs: Certs, kubeconfig: Path, all_controllers: bool
) -> Process:
    port = free_port()
    # With pods, every default controller (jobs, endpoints, PV binding, ...); without, only
    # the ones whose work needs no pods, so that no controller reacts to pods that never run.
    controllers = "*" if all_controllers else ",".join(CONTROLLERS)
    proc = stack.enter_context(
        Process.start(
            "kube-controller-manager",
            [
                str(bin_dir / "kube-controller-manager"),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--leader-elect=false",
                "--use-service-account-credentials=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={workdir / 'kcm-certs'}",
                f"--controllers={controllers}",
                f"--service-account-private-key-file={certs.sa_key}",
                f"--root-ca-file={certs.ca_cert}",
                "--profiling=false",
            ],
            workdir,
        )
    )
    wait_http(f"https://127.0.0.1:{port}/healthz", [proc], START_TIMEOUT_S, ca=None)
    return proc


@dataclass(frozen=True)
class ClusterNetwork:
    """Addresses of a cluster whose pods run (``node.py``). ``host_ip`` is the machine's
    own address: the API server's advertised address and the node's InternalIP, which
    pods can reach (loopback they cannot)."""

    host_ip: str
    pod_cidr: str = "10.244.0.0/16"
    service_cidr: str = "10.0.0.0/24"
    dns_ip: str = "10.0.0.10"
    bridge: str = "kubetune0"
    cluster_domain: str = "cluster.local"

    @property
    def kubernetes_service_ip(self) -> str:
        network, _ = self.service_cidr.split("/")
        return network.rsplit(".", 1)[0] + ".1"


@contextmanager
def running(bin_dir: Path, workdir: Path, pod_network: ClusterNetwork | None = None) -> Iterator[ControlPlane]:
    """Start etcd, kube-apiserver and kube-controller-manager; stop them all on exit.

    With ``pod_network`` the control plane is ready for a node (``node.py``): the API
    server listens on the machine's address too (its certificate names it and
    service/kubernetes), and the controller manager runs every controller.

    Logs are ``<workdir>/<process>.log``. Raises ControlPlaneError, with the tails of all
    logs, when startup fails (after stopping whatever had started).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:  # unwinds in reverse: KCM, apiserver, etcd
        try:
            cp = _start_all(stack, bin_dir, workdir, pod_network)
        except ControlPlaneError as exc:
            stack.close()  # stop first, so that the logs are complete
            raise ControlPlaneError(f"control plane failed to start: {exc}\n{log_tails(workdir)}") from exc
        yield cp


def _start_all(stack: ExitStack, bin_dir: Path, workdir: Path, pod_network: ClusterNetwork | None) -> ControlPlane:
    admin_token, user_token = secrets.token_hex(16), secrets.token_hex(16)
    sans: list[str] = []
    if pod_network is not None:
        sans = [f"IP:{pod_network.host_ip}", f"IP:{pod_network.kubernetes_service_ip}"]
        sans += [f"DNS:kubernetes.default.svc{suffix}" for suffix in ("", f".{pod_network.cluster_domain}")]
        sans += ["DNS:kubernetes", "DNS:kubernetes.default"]
    certs = generate_certs(
        workdir / "pki",
        tokens=[
            (admin_token, ADMIN_USER, ["system:masters"]),
            (user_token, UNPRIVILEGED_USER, []),
        ],
        extra_sans=sans,
    )
    etcd_url = _start_etcd(stack, bin_dir, workdir)
    server, apiserver = _start_apiserver(stack, bin_dir, workdir, certs, etcd_url, admin_token, pod_network)
    admin_kc = _kubeconfig(workdir / "kubeconfig", server, certs.ca_cert, ADMIN_USER, admin_token)
    user_kc = _kubeconfig(workdir / "kubeconfig-e2e-user", server, certs.ca_cert, UNPRIVILEGED_USER, user_token)
    kcm = _start_controller_manager(stack, bin_dir, workdir, certs, admin_kc, all_controllers=pod_network is not None)
    cp = ControlPlane(
        server=server,
        ca_path=certs.ca_cert,
        admin_token=admin_token,
        user_token=user_token,
        kubeconfig=admin_kc,
        user_kubeconfig=user_kc,
        bin_dir=bin_dir,
        workdir=workdir,
    )
    # The serviceaccount controller creating `default/default` proves that KCM works.
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        res = cp.kubectl("get", "serviceaccount", "default", "-n", "default", "--ignore-not-found", "-o", "name")
        if res.returncode == 0 and res.stdout.strip():
            return cp
        apiserver.check_alive()
        kcm.check_alive()
        if time.monotonic() > deadline:
            raise ControlPlaneError(
                "kube-controller-manager did not create serviceaccount default/default in "
                f"{START_TIMEOUT_S:.0f} s (kubectl rc={res.returncode}: {res.stderr.strip()})"
            )
        time.sleep(0.3)


def install_manifests(cp: ControlPlane, files: Sequence[Path], timeout_s: float = 60.0) -> list[str]:
    """Server-side apply each file; wait until every CRD among them is Established.

    Server-side apply, because big CRDs (the PyTorchJob one is ~8000 lines) exceed the
    annotation size limit of client-side apply. Tries every file, then raises one
    ControlPlaneError naming all that the apiserver refused. Returns the applied names.
    """
    names: list[str] = []
    errors: list[str] = []
    for f in files:
        res = cp.kubectl("apply", "--server-side", "--force-conflicts", "-o", "name", "-f", str(f))
        names += res.stdout.split()
        if res.returncode != 0:
            errors.append(f"kubectl apply -f {f} failed:\n{res.stderr.strip()}")
    if errors:
        raise ControlPlaneError("the apiserver refused manifests:\n" + "\n".join(errors))
    crds = [n for n in names if n.startswith("customresourcedefinition")]
    _wait_established(cp, crds, timeout_s)
    return names


def _wait_established(cp: ControlPlane, crds: Sequence[str], timeout_s: float) -> None:
    """Poll until every CRD has condition Established=True (``kubectl wait`` errors out
    instead of waiting while a new CRD has no conditions yet)."""
    deadline = time.monotonic() + timeout_s
    pending = list(crds)
    while pending:
        res = cp.kubectl("get", *pending, "-o", "json")
        if res.returncode == 0:
            data = json.loads(res.stdout)
            items = data.get("items", [data])
            done = {
                f"customresourcedefinition.apiextensions.k8s.io/{item['metadata']['name']}"
                for item in items
                for cond in item.get("status", {}).get("conditions") or []
                if cond["type"] == "Established" and cond["status"] == "True"
            }
            pending = [n for n in pending if n not in done]
        if pending and time.monotonic() > deadline:
            raise ControlPlaneError(f"CRDs not Established after {timeout_s:.0f} s: {pending} {res.stderr}")
        if pending:
            time.sleep(0.2)


def _debug_session(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.e2e.controlplane",
        description="Run the e2e control plane for a debug session until Ctrl-C.",
    )
    parser.add_argument("command", choices=["up"], help="start and wait for Ctrl-C")
    parser.add_argument("--workdir", type=Path, help="keep certs, kubeconfigs, logs here")
    parser.add_argument("--crds", action="store_true", help="also install crds/ and Kubeflow CRDs")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kubetune-cp-"))

    def announce(cp: ControlPlane) -> None:
        if args.crds:
            try:
                install_manifests(cp, crd_files())
            except ControlPlaneError as exc:  # keep it up: the refusal is worth debugging
                print(f"warning: {exc}", file=sys.stderr)
        print(f"control plane up: {cp.server} (logs in {cp.workdir})")
        print(f"export KUBECONFIG={cp.kubeconfig}   # admin (system:masters)")
        print(f"# unprivileged user: KUBECONFIG={cp.user_kubeconfig}")
        print(f"export PATH={cp.bin_dir}:$PATH     # kubectl, helm")

    try:
        bin_dir = find_bin_dir()
    except ControlPlaneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return serve_until_interrupted(running(bin_dir, workdir.resolve()), announce)


def crd_files(repo_root: Path = REPO_ROOT) -> list[Path]:
    """All YAML in ``crds/`` (may be absent) plus the vendored Kubeflow PyTorchJob CRD."""
    own = sorted(p for pat in ("*.yaml", "*.yml") for p in (repo_root / "crds").glob(pat) if p.is_file())
    return [*own, repo_root / "third_party" / "kubeflow" / "pytorchjobs.kubeflow.org.yaml"]


if __name__ == "__main__":
    sys.exit(_debug_session())
