"""One real Kubernetes node on this machine: containerd + runc, kubelet, kube-proxy and
kube-scheduler, joined to a control plane from ``controlplane.py``.

Pods really run: the scheduler binds them, the kubelet asks containerd (CRI) to start
them with runc, the CNI bridge plugin gives them an address on ``ClusterNetwork.pod_cidr``
and kube-proxy's iptables rules route Service addresses to them. What this machine lacks
is worked around in configuration, never faked (see docs/testing.md for the why of each):

- cgroup v1: the kubelet runs with ``failCgroupV1: false`` and the cgroupfs driver;
- no CAP_SYS_RESOURCE: containerd's ``restrict_oom_score_adj`` keeps runc from asking
  for an OOM score below the current one;
- no registry: images are imported from archives (``images.py``), pods never pull;
- no GPU: the node advertises ``nvidia.com/gpu`` capacity as a device plugin would, and
  the trainer runs on CPU (the one stand-in of the test cluster).

Everything runs as root (the kubelet and runc need it) and in the work directory, except
containerd's content store, which is kept under ``~/.cache/kubetune/containerd`` so that a
multi-GB trainer image is imported once per version, not per test run.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from .controlplane import ClusterNetwork, ControlPlane
from .images import Image
from .procs import ControlPlaneError, Process, free_port, wait_http

NODE_NAME = "kubetune-node"
CNI_BIN_DIR = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
SANDBOX_IMAGE = "registry.k8s.io/pause:3.10.2"  # containerd 2.4's default sandbox image
READY_TIMEOUT_S = 120.0
NODE_PACKAGES_HINT = "apt-get install containernetworking-plugins iptables conntrack (scripts/system-deps.sh does it)"


def detect_host_ip() -> str:
    """The source address of the default route (no packet is sent by a UDP connect)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.254", 9))
        except OSError as exc:
            raise ControlPlaneError(f"no default route to take the node's address from: {exc}") from exc
        address: str = s.getsockname()[0]
    if address.startswith("127."):
        raise ControlPlaneError(f"the default route's source address is {address}; pods cannot reach it")
    return address


@dataclass(frozen=True)
class Node:
    name: str
    network: ClusterNetwork
    containerd_socket: Path
    node_bin: Path
    workdir: Path

    def ctr(self, *args: str, check: bool = True, timeout: float = 600.0) -> subprocess.CompletedProcess[str]:
        argv = [str(self.node_bin / "ctr"), f"--address={self.containerd_socket}", "--namespace=k8s.io", *args]
        res = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
        if check and res.returncode != 0:
            raise ControlPlaneError(f"ctr {' '.join(args)} failed: {res.stderr.strip()}")
        return res

    def _image_targets(self) -> dict[str, str]:
        """Every image reference in containerd and the manifest digest it points at."""
        lines = self.ctr("images", "ls").stdout.splitlines()[1:]
        return {fields[0]: fields[2] for fields in (line.split() for line in lines) if len(fields) > 2}

    def import_image(self, image: Image) -> None:
        """Import ``image`` unless containerd already has that reference (refs carry a
        content hash, so an existing ref is the same image), then drop the other tags of its
        repository: containerd's store is kept between runs, and every source change makes
        a new multi-GB trainer image. Layers are discarded from the content store once
        unpacked, and an archive written for the import is deleted after it."""
        targets = self._image_targets()
        repository = image.ref.rsplit(":", 1)[0]
        stale = [ref for ref in targets if ref.rsplit(":", 1)[0] == repository and ref != image.ref]
        kept = {digest for ref, digest in targets.items() if ref not in stale and not ref.startswith("sha256:")}
        # The CRI plugin keeps a `sha256:<image id>` reference per image; once no named
        # reference points at that image any more, it only pins gigabytes of layers.
        stale += [ref for ref, digest in targets.items() if ref.startswith("sha256:") and digest not in kept]
        if stale:  # first: the trainer's archive and its import need the space
            self.ctr("images", "rm", "--sync", *stale, check=False)
        if image.ref in targets:
            if self._unpacked(image.ref):
                return
            # Its layers were discarded at import; without its snapshots (lost with the
            # store's state, e.g. a run killed mid-way) no container could start from it.
            same = [ref for ref, digest in targets.items() if digest == targets[image.ref]]
            self.ctr("images", "rm", "--sync", *same, check=False)
        staging = self.workdir / "image-import.tar"
        archive = image.write_archive(staging)
        try:
            res = self.ctr("images", "import", "--local", "--discard-unpacked-layers", str(archive), check=False)
        finally:
            staging.unlink(missing_ok=True)
        if res.returncode != 0:
            raise ControlPlaneError(f"importing {image.ref} failed: {res.stderr.strip()}")
        if image.ref not in self.ctr("images", "ls", "--quiet").stdout.split():
            raise ControlPlaneError(f"the archive of {image.ref} did not provide it: {res.stdout.strip()}")

    def _unpacked(self, ref: str) -> bool:
        """Whether containers can start from `ref`: its root file system mounts (from its
        snapshots; the layer blobs themselves are discarded once unpacked)."""
        target = self.workdir / "image-check"
        target.mkdir(parents=True, exist_ok=True)
        mounted = self.ctr("images", "mount", "--rw=false", ref, str(target), check=False).returncode == 0
        self.ctr("images", "unmount", "--rm", str(target), check=False)
        return mounted


# --------------------------------------------------------------------------- host checks


def _sysctl(key: str, value: str) -> None:
    path = Path("/proc/sys") / key.replace(".", "/")
    try:
        if path.read_text().strip() != value:
            path.write_text(value)
    except OSError as exc:
        raise ControlPlaneError(f"cannot set {key}={value} ({path}): {exc}") from exc


def check_host() -> None:
    """Fail with what to do when this machine cannot host the node."""
    if os.geteuid() != 0:
        raise ControlPlaneError("the test node needs root (kubelet, containerd and runc manage cgroups and mounts)")
    missing = [p for p in ("bridge", "host-local", "loopback", "portmap") if not (CNI_BIN_DIR / p).exists()]
    if missing:
        raise ControlPlaneError(f"CNI plugins {missing} not in {CNI_BIN_DIR}: {NODE_PACKAGES_HINT}")
    for tool in ("iptables", "ip", "mount", "umount"):
        if shutil.which(tool) is None:
            raise ControlPlaneError(f"`{tool}` not found: {NODE_PACKAGES_HINT}")
    if not Path("/proc/sys/net/bridge").exists():
        subprocess.run(["modprobe", "br_netfilter"], capture_output=True, check=False)
    # Pods reach Services through the host's routing (kube-proxy DNATs in iptables) and each
    # other across the bridge, where replies must pass iptables too to be un-NATed.
    _sysctl("net.ipv4.ip_forward", "1")
    _sysctl("net.bridge.bridge-nf-call-iptables", "1")


# --------------------------------------------------------------------------- containerd


def _containerd_config(node_bin: Path, root: Path, state: Path, socket_path: Path, cni_conf: Path) -> str:
    return f"""version = 3
root = "{root}"
state = "{state}"

[grpc]
  address = "{socket_path}"

[plugins."io.containerd.cri.v1.runtime"]
  # Without CAP_SYS_RESOURCE runc cannot lower oom_score_adj below the current value (the
  # pause container asks for -998): clamp instead of failing every sandbox.
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{CNI_BIN_DIR}"]
    conf_dir = "{cni_conf}"
  [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
      BinaryName = "{node_bin / "runc"}"
      SystemdCgroup = false

[plugins."io.containerd.cri.v1.images"]
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{SANDBOX_IMAGE}"
"""


def _cni_conflist(network: ClusterNetwork, ipam_dir: Path) -> str:
    gateway = network.pod_cidr.split("/")[0].rsplit(".", 2)[0] + ".0.1"
    return json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": "kubetune",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": network.bridge,
                    "isGateway": True,
                    "ipMasq": True,
                    # A pod reaching a Service that routes back to itself (or to a pod on
                    # the same bridge) needs the packet to leave and re-enter its port.
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": str(ipam_dir),
                        "ranges": [[{"subnet": network.pod_cidr, "gateway": gateway}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        },
        indent=2,
    )


@contextmanager
def _containerd_root_lock(root: Path) -> Iterator[None]:
    """One test node at a time may use the shared content store (bolt takes its own lock
    too, but this one fails fast with a message instead of hanging)."""
    root.mkdir(parents=True, exist_ok=True)
    with (root.parent / f"{root.name}.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise ControlPlaneError(
                f"another test node is using {root} (a second test run or scripts/cluster.sh up); stop it first"
            ) from exc
        yield


def containerd_root() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("KUBETUNE_CONTAINERD_ROOT", f"{cache}/kubetune/containerd"))


def _kill_stale_shims(node_bin: Path) -> list[int]:
    """Kill the container shims (and the containers under them) that a test node killed
    by SIGKILL left running: nothing else would ever stop them. Only shims started from
    this project's node binaries (``node_bin``'s parent) are touched."""
    cache = str(node_bin.parent)
    parents: dict[int, int] = {}
    shims: list[int] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with suppress(OSError):
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if (
                argv
                and argv[0].decode(errors="replace").startswith(cache)
                and argv[0].endswith(b"containerd-shim-runc-v2")
            ):
                shims.append(int(proc.name))
    doomed = set(shims)
    while True:  # every descendant: the containers' processes
        more = {pid for pid, ppid in parents.items() if ppid in doomed} - doomed
        if not more:
            break
        doomed |= more
    for pid in doomed:
        with suppress(OSError):
            os.kill(pid, 9)
    return shims


def _start_containerd(stack: ExitStack, node_bin: Path, workdir: Path, network: ClusterNetwork) -> Path:
    _kill_stale_shims(node_bin)
    base = workdir / "containerd"
    cni_conf = base / "net.d"
    cni_conf.mkdir(parents=True, exist_ok=True)
    (cni_conf / "10-kubetune.conflist").write_text(_cni_conflist(network, base / "ipam"))
    root = containerd_root()
    stack.enter_context(_containerd_root_lock(root))
    socket_path = base / "containerd.sock"
    config = base / "config.toml"
    config.write_text(_containerd_config(node_bin, root, base / "state", socket_path, cni_conf))
    env_path = f"{node_bin}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    proc = stack.enter_context(
        Process.start(
            "containerd",
            ["env", f"PATH={env_path}", str(node_bin / "containerd"), f"--config={config}", "--log-level=warn"],
            workdir,
        )
    )
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not socket_path.exists():
        proc.check_alive()
        if time.monotonic() > deadline:
            raise ControlPlaneError(f"containerd did not create {socket_path} in {READY_TIMEOUT_S:.0f} s")
        time.sleep(0.1)
    stack.callback(_remove_pods, node_bin, socket_path)
    return socket_path


def _remove_pods(node_bin: Path, socket_path: Path) -> None:
    """Stop and remove every pod sandbox through CRI (network torn down, mounts released),
    so that stopping containerd leaves no running container, netns or mount behind."""
    crictl = [str(node_bin / "crictl"), f"--runtime-endpoint=unix://{socket_path}", "--timeout=30s"]
    with suppress(OSError, subprocess.SubprocessError):
        subprocess.run([*crictl, "rmp", "--all", "--force"], capture_output=True, check=False, timeout=120)


# --------------------------------------------------------------------------- kubelet & co


def _kubelet_config(node: ClusterNetwork, socket_path: Path, port: int, healthz_port: int) -> dict[str, object]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "failCgroupV1": False,  # this VM has cgroup v1 (hybrid)
        "cgroupDriver": "cgroupfs",  # no systemd here
        "containerRuntimeEndpoint": f"unix://{socket_path}",
        # Test cluster only: the API server reaches the kubelet (logs, exec) without client
        # certificates; a shared cluster uses webhook authentication and authorization.
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        "address": node.host_ip,
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "clusterDNS": [node.dns_ip],
        "clusterDomain": node.cluster_domain,
        "failSwapOn": False,
        "enforceNodeAllocatable": [],
        "localStorageCapacityIsolation": False,
        # The trainer image is several GB and cannot be pulled again: never garbage-collect
        # images, and evict nothing for disk pressure on a shared development disk.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
        "serializeImagePulls": False,
        "maxPods": 110,
    }


def _start_kubelet(
    stack: ExitStack, cp: ControlPlane, kube_bin: Path, workdir: Path, network: ClusterNetwork, socket_path: Path
) -> Process:
    base = workdir / "kubelet"
    base.mkdir(parents=True, exist_ok=True)
    healthz = free_port()
    config = base / "config.json"
    config.write_text(json.dumps(_kubelet_config(network, socket_path, free_port(), healthz), indent=2))
    root_dir = base / "root"
    # Registered first, so it runs after the kubelet has stopped (an ExitStack unwinds LIFO).
    stack.callback(_unmount_below, root_dir)
    proc = stack.enter_context(
        Process.start(
            "kubelet",
            [
                str(kube_bin / "kubelet"),
                f"--config={config}",
                f"--kubeconfig={cp.kubeconfig}",
                f"--root-dir={root_dir}",
                f"--cert-dir={base / 'pki'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={network.host_ip}",
                "--v=1",
            ],
            workdir,
        )
    )
    wait_http(f"http://127.0.0.1:{healthz}/healthz", [proc], READY_TIMEOUT_S)
    return proc


def _unmount_below(root: Path) -> None:
    """Unmount what the kubelet left mounted (secret tmpfs, emptyDir memory volumes) so that
    the work directory can be deleted."""
    with suppress(OSError):
        mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        for mount in sorted((m for m in mounts if m.startswith(str(root))), key=len, reverse=True):
            subprocess.run(["umount", "--lazy", mount], capture_output=True, check=False)


def _start_scheduler(stack: ExitStack, cp: ControlPlane, kube_bin: Path, workdir: Path) -> Process:
    port = free_port()
    proc = stack.enter_context(
        Process.start(
            "kube-scheduler",
            [
                str(kube_bin / "kube-scheduler"),
                f"--kubeconfig={cp.kubeconfig}",
                f"--authentication-kubeconfig={cp.kubeconfig}",
                f"--authorization-kubeconfig={cp.kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
            ],
            workdir,
        )
    )
    wait_http(f"https://127.0.0.1:{port}/healthz", [proc], READY_TIMEOUT_S, ca=None)
    return proc


def _start_kube_proxy(
    stack: ExitStack, cp: ControlPlane, kube_bin: Path, workdir: Path, network: ClusterNetwork
) -> Process:
    healthz = free_port()
    config = workdir / "kube-proxy.json"
    config.write_text(
        json.dumps(
            {
                "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
                "kind": "KubeProxyConfiguration",
                "mode": "iptables",
                "clientConnection": {"kubeconfig": str(cp.kubeconfig)},
                "hostnameOverride": NODE_NAME,
                "clusterCIDR": network.pod_cidr,
                "healthzBindAddress": f"127.0.0.1:{healthz}",
                "metricsBindAddress": f"127.0.0.1:{free_port()}",
                # Leave the machine's conntrack table size alone (it is not ours to tune).
                "conntrack": {"maxPerCore": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            },
            indent=2,
        )
    )
    # Remove its iptables chains after it stopped (registered first: LIFO): a stale rule
    # would route a later run's Service addresses to pods that no longer exist.
    stack.callback(
        subprocess.run, [str(kube_bin / "kube-proxy"), "--cleanup"], capture_output=True, check=False, timeout=60
    )
    argv = [str(kube_bin / "kube-proxy"), f"--config={config}", "--v=1"]
    proc = stack.enter_context(Process.start("kube-proxy", argv, workdir))
    wait_http(f"http://127.0.0.1:{healthz}/healthz", [proc], READY_TIMEOUT_S)
    return proc


def _wait_node_ready(cp: ControlPlane, procs: list[Process]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = ""
    while True:
        res = cp.kubectl("get", "node", NODE_NAME, "-o", "json")
        if res.returncode == 0:
            conditions = json.loads(res.stdout).get("status", {}).get("conditions") or []
            ready = next((c for c in conditions if c["type"] == "Ready"), None)
            if ready and ready["status"] == "True":
                return
            last = f"Ready={ready['status']} ({ready.get('message')})" if ready else "no Ready condition"
        else:
            last = res.stderr.strip()
        for p in procs:
            p.check_alive()
        if time.monotonic() > deadline:
            raise ControlPlaneError(f"node {NODE_NAME} not Ready after {READY_TIMEOUT_S:.0f} s: {last}")
        time.sleep(0.5)


def advertise_gpus(cp: ControlPlane, resource: str, count: int) -> None:
    """Add ``count`` of ``resource`` to the node's capacity, as a device plugin would (the
    Kubernetes docs' "advertise extended resources for a node"). The only stand-in of the
    test cluster: there are no GPUs, so the trainer runs on CPU inside the pods."""
    patch = [{"op": "add", "path": f"/status/capacity/{resource.replace('/', '~1')}", "value": str(count)}]
    cp.kubectl("patch", "node", NODE_NAME, "--subresource=status", "--type=json", "-p", json.dumps(patch), check=True)


@contextmanager
def running_node(
    cp: ControlPlane, kube_bin: Path, node_bin: Path, workdir: Path, network: ClusterNetwork, *, gpus: int = 8
) -> Iterator[Node]:
    """Start containerd, the kubelet, kube-proxy and kube-scheduler; stop them on exit
    (pods removed through CRI first, then the processes in reverse order)."""
    check_host()
    workdir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        socket_path = _start_containerd(stack, node_bin, workdir, network)
        node = Node(NODE_NAME, network, socket_path, node_bin, workdir)
        scheduler = _start_scheduler(stack, cp, kube_bin, workdir)
        kubelet = _start_kubelet(stack, cp, kube_bin, workdir, network, socket_path)
        proxy = _start_kube_proxy(stack, cp, kube_bin, workdir, network)
        _wait_node_ready(cp, [scheduler, kubelet, proxy])
        advertise_gpus(cp, "nvidia.com/gpu", gpus)
        yield node
