"""Run `kubetune operator` as a real subprocess against the e2e control plane."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from .controlplane import REPO_ROOT, ControlPlane

T = TypeVar("T")

PEERING = """apiVersion: kopf.dev/v1
kind: ClusterKopfPeering
metadata: {name: kubetune}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.25) -> T:
    """Poll `probe` until it returns something truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last value: {last!r}")


def install_peering(cp: ControlPlane) -> None:
    cp.kubectl("apply", "-f", str(REPO_ROOT / "third_party" / "kopf" / "peering.yaml"), check=True)
    cp.kubectl("wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev", "--timeout=30s", check=True)
    cp.kubectl("apply", "-f", "-", stdin=PEERING, check=True)


@contextmanager
def operator_process(
    cp: ControlPlane, log: Path, command: Sequence[str] | None = None, **env: str
) -> Iterator[OperatorProcess]:
    """`kubetune operator` (or `command`, e.g. the bench's profiled operator) until the block ends."""
    process = OperatorProcess(cp, log, env, command)
    try:
        process.start()
        yield process
    finally:
        process.stop()


class OperatorProcess:
    def __init__(self, cp: ControlPlane, log: Path, env: dict[str, str], command: Sequence[str] | None = None) -> None:
        self.cp, self.log, self.extra_env = cp, log, env
        self.command = list(command or [str(Path(sys.executable).parent / "kubetune"), "operator"])
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.cp.kubeconfig),
            "KUBETUNE_METRICS_PORT": str(self.metrics_port),
            "KUBETUNE_HEALTH_PORT": str(self.health_port),
            "KUBETUNE_REFERENCE_RETRY_SECONDS": "3",
            # A SIGKILLed replica's peering record blocks its successor for this long.
            "KUBETUNE_PEERING_LIFETIME_SECONDS": "8",
            # The tests' Models live under /models on the (absent) node; nothing else is allowed.
            "KUBETUNE_ALLOWED_HOST_PATHS": "/models",
            **self.extra_env,
        }
        self.process = subprocess.Popen(
            self.command,
            env=env,
            stdout=self.log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for("the operator's /healthz (kopf's liveness endpoint)", self._healthy, timeout=60)

    def _healthy(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"the operator exited with {self.process.returncode}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no cleanup, as when a node dies."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            text: str = response.read().decode()
            return text

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def get_json(cp: ControlPlane, *args: str) -> dict[str, Any] | None:
    result = cp.kubectl("get", *args, "-o", "json")
    if result.returncode != 0:
        return None
    value: dict[str, Any] = json.loads(result.stdout)
    return value
