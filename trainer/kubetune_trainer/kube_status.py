"""The cluster transport for progress: patch `status.progress` of the trainer's own job.

Runs inside the trainer pod with the pod's ServiceAccount token. The operator gives that
account exactly one right: `get`/`patch` on `customizationjobs/status` for this job's name
(a Role restricted by `resourceNames`), so a trainer cannot touch anything else.

Throttled: at most one PATCH per `interval` seconds (NeMo Customizer throttles to 10 s);
the last event is always sent (on `end` and on close), so the final values are never
lost. A transport failure is logged and training goes on.

Stdlib only (urllib): the trainer image needs no Kubernetes client for this.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_trainer.progress import ProgressEvent

log = logging.getLogger(__name__)

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")
API_PATH = "/apis/kubetune.io/v1alpha1/namespaces/{namespace}/customizationjobs/{name}/status"


@dataclass(frozen=True)
class ApiCredentials:
    server: str
    token: str
    ca_file: str | None

    @classmethod
    def in_cluster(cls) -> ApiCredentials:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host or not (SERVICE_ACCOUNT / "token").is_file():
            raise RuntimeError(
                "KUBETUNE_PROGRESS=kubernetes needs the pod's service account (KUBERNETES_SERVICE_HOST and "
                f"{SERVICE_ACCOUNT}/token); run under the operator or set KUBETUNE_PROGRESS=console"
            )
        server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        return cls(server, (SERVICE_ACCOUNT / "token").read_text().strip(), str(SERVICE_ACCOUNT / "ca.crt"))


class KubernetesStatusReporter:
    """A `Reporter` that merges each event into `status.progress` of one CustomizationJob."""

    def __init__(self, namespace: str, name: str, credentials: ApiCredentials, interval: float = 10.0) -> None:
        self.url = credentials.server.rstrip("/") + API_PATH.format(namespace=namespace, name=name)
        self.credentials = credentials
        self.interval = interval
        self._context = ssl.create_default_context(cafile=credentials.ca_file)
        self._last_sent = 0.0
        self._pending: ProgressEvent | None = None
        self.failures = 0

    def report(self, event: ProgressEvent) -> None:
        self._pending = event
        if event.kind in ("end", "checkpoint") or time.monotonic() - self._last_sent >= self.interval:
            self.flush()

    def flush(self) -> None:
        if self._pending is None:
            return
        event, self._pending = self._pending, None
        self._last_sent = time.monotonic()
        try:
            self._patch({"status": {"progress": event.to_status().wire()}})
        except (OSError, urllib.error.URLError) as error:  # HTTPError is a URLError
            self.failures += 1
            log.warning("could not report progress to %s: %s", self.url, error)

    def close(self) -> None:
        self.flush()

    def publish(self, status: dict[str, Any]) -> None:
        """Merge other status fields now (e.g. `tracking`, the experiment runs' URLs); never raises."""
        try:
            self._patch({"status": status})
        except (OSError, urllib.error.URLError) as error:
            self.failures += 1
            log.warning("could not report %s to %s: %s", ", ".join(status), self.url, error)

    def _patch(self, body: dict[str, Any]) -> None:
        request = urllib.request.Request(
            self.url,
            data=json.dumps(body).encode(),
            method="PATCH",
            headers={
                "Authorization": f"Bearer {self.credentials.token}",
                "Content-Type": "application/merge-patch+json",
                "Accept": "application/json",
            },
        )
        with urllib.request.urlopen(request, context=self._context, timeout=10) as response:
            response.read()


def reporter_from_env() -> KubernetesStatusReporter | None:
    """The cluster reporter when the operator asked for it (KUBETUNE_PROGRESS=kubernetes)."""
    if os.environ.get("KUBETUNE_PROGRESS") != "kubernetes":
        return None
    namespace, name = os.environ.get("KUBETUNE_JOB_NAMESPACE"), os.environ.get("KUBETUNE_JOB_NAME")
    if not namespace or not name:
        raise RuntimeError("KUBETUNE_PROGRESS=kubernetes needs KUBETUNE_JOB_NAMESPACE and KUBETUNE_JOB_NAME")
    interval = float(os.environ.get("KUBETUNE_PROGRESS_INTERVAL", "10"))
    return KubernetesStatusReporter(namespace, name, ApiCredentials.in_cluster(), interval)
