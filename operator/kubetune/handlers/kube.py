"""The operator's only door to the API server (kubernetes client), with errors that say
whether to retry: API failures become `kopf.TemporaryError` (retry later) or
`kopf.PermanentError` (a retry cannot help), in this one place.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kubetune.api.common import API_GROUP, API_VERSION

_RETRYABLE = {409, 429, 500, 502, 503, 504}
# The plural (URL name) of every kind the operator creates or reads by kind.
PLURALS = {
    "ServiceAccount": "serviceaccounts",
    "ConfigMap": "configmaps",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "Role": "roles",
    "RoleBinding": "rolebindings",
    "Job": "jobs",
    "PyTorchJob": "pytorchjobs",
    "Model": "models",
    "FileSet": "filesets",
}


def object_path(api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
    """The REST path of a namespaced object (or of its collection when `name` is None)."""
    group_path = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
    path = f"{group_path}/namespaces/{namespace}/{PLURALS[kind]}"
    return f"{path}/{name}" if name else path


@contextmanager
def api_errors(action: str) -> Iterator[None]:
    """Translate API errors into kopf's retry vocabulary, naming what was being done."""
    try:
        yield
    except ApiException as error:
        status = getattr(error, "status", None) or 0
        body = str(getattr(error, "body", "") or getattr(error, "reason", ""))[:256]
        message = f"{action}: HTTP {status}: {body}"
        if status in _RETRYABLE or status == 0:
            raise kopf.TemporaryError(message, delay=5) from error
        if status == 403:
            raise kopf.PermanentError(f"{message} (the operator's RBAC lacks this permission)") from error
        raise kopf.PermanentError(message) from error


def load_config() -> None:
    """In-cluster credentials when running in a pod, else the current kubeconfig."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    # Resolve the proxy from the environment once. Left "from the environment", the client
    # re-reads every variable on each request (the token refresh hook re-sets the host, which
    # calls urllib's getproxies): about a millisecond of CPU per request, the biggest single
    # cost of a burst of jobs in the profile (bench/operator_launch.py --profile).
    configuration = client.Configuration.get_default_copy()
    configuration.proxy = configuration.proxy
    client.Configuration.set_default(configuration)


class Kube:
    """Typed helpers over the kubernetes client for what the operator reads and writes."""

    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        self.api_client = api_client or client.ApiClient()
        self.custom = client.CustomObjectsApi(self.api_client)
        self.core = client.CoreV1Api(self.api_client)
        self.seen: dict[tuple[str, str, str], dict[str, Any]] = {}
        """The latest Model and FileSet bodies the watch delivered, by (plural, namespace, name)."""

    # ------------------------------------------------------------------ kubetune objects

    def remember(self, plural: str, body: dict[str, Any], deleted: bool) -> None:
        """Keep (or forget) a Model or FileSet the watch delivered; the operator's `nudge`
        handler sees every event of both kinds, the initial listing included."""
        meta = body.get("metadata") or {}
        key = (plural, meta.get("namespace") or "default", meta.get("name") or "")
        if deleted:
            self.seen.pop(key, None)
        else:
            self.seen[key] = body

    def get_reference(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A Model or FileSet a job names: as last seen on the watch (a burst of jobs naming
        the same objects reads them from memory, as an informer-based controller does), or
        read from the API server when the watch has not delivered it (yet)."""
        cached = self.seen.get((plural, namespace, name))
        return cached if cached is not None else self.get_object(plural, namespace, name)

    def get_object(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, plural, name
            )
            return obj
        except ApiException as error:
            if error.status == 404:
                return None
            with api_errors(f"reading {plural} {namespace}/{name}"):
                raise

    def patch_job_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        with api_errors(f"patching the status of CustomizationJob {namespace}/{name}"):
            try:
                self.custom.patch_namespaced_custom_object_status(
                    API_GROUP, API_VERSION, namespace, "customizationjobs", name, {"status": status}
                )
            except ApiException as error:
                if error.status != 404:  # deleted meanwhile: nothing left to report to
                    raise

    def annotate_job(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        with api_errors(f"annotating CustomizationJob {namespace}/{name}"):
            self.custom.patch_namespaced_custom_object(
                API_GROUP,
                API_VERSION,
                namespace,
                "customizationjobs",
                name,
                {"metadata": {"annotations": annotations}},
            )

    # ------------------------------------------------------------------ children

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, content_type: str | None = None) -> Any:
        """One request, the JSON answer as plain dicts: no typed models, no discovery (both cost
        more CPU than the request itself when a burst of jobs arrives)."""
        headers = {"Accept": "application/json", "Content-Type": content_type or "application/json"}
        request = self.api_client.param_serialize(
            method=method, resource_path=path, header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        response = self.api_client.call_api(*request)
        response.read()
        if not 200 <= response.status <= 299:
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        return json.loads(response.data) if response.data else None

    def create_if_absent(self, manifest: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """Create an object; if one of that name exists, return it (idempotent across restarts)."""
        api_version, kind = manifest["apiVersion"], manifest["kind"]
        namespace, name = manifest["metadata"].get("namespace"), manifest["metadata"]["name"]
        try:
            self._call("POST", object_path(api_version, kind, namespace), manifest)
            return True, manifest  # what was asked is what is stored: the answer need not be parsed
        except ApiException as error:
            if error.status != 409:
                with api_errors(f"creating {kind} {namespace}/{name}"):
                    raise
        existing = self.get(api_version, kind, namespace, name)
        if existing is None:
            raise kopf.TemporaryError(f"{kind} {namespace}/{name} was deleted while being created", delay=2)
        return False, existing

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = self._call("GET", object_path(api_version, kind, namespace, name))
            return obj
        except ApiException as error:
            if error.status == 404:
                return None
            with api_errors(f"reading {kind} {namespace}/{name}"):
                raise
        return None

    def merge_patch(self, api_version: str, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> None:
        with api_errors(f"patching {kind} {namespace}/{name}"):
            self._call("PATCH", object_path(api_version, kind, namespace, name), patch, "application/merge-patch+json")

    def list_pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        with api_errors(f"listing the pods of {namespace}/{job_name}"):
            pods = self.core.list_namespaced_pod(namespace, label_selector=f"kubetune.io/job={job_name}")
        return [self.api_client.sanitize_for_serialization(pod) for pod in pods.items]
