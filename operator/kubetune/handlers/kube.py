"""The operator's only door to the API server (kubernetes client), with errors that say
whether to retry: API failures become `kopf.TemporaryError` (retry later) or
`kopf.PermanentError` (a retry cannot help), in this one place.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ApiException as DynamicApiException

from kubetune.api.common import API_GROUP, API_VERSION

_RETRYABLE = {409, 429, 500, 502, 503, 504}


@contextmanager
def api_errors(action: str) -> Iterator[None]:
    """Translate API errors into kopf's retry vocabulary, naming what was being done."""
    try:
        yield
    except (ApiException, DynamicApiException) as error:
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


class Kube:
    """Typed helpers over the kubernetes client for what the operator reads and writes."""

    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        self.api_client = api_client or client.ApiClient()
        self.custom = client.CustomObjectsApi(self.api_client)
        self.core = client.CoreV1Api(self.api_client)
        self._dynamic: DynamicClient | None = None

    @property
    def dynamic(self) -> DynamicClient:
        if self._dynamic is None:  # discovery is slow; do it once, on first use
            self._dynamic = DynamicClient(self.api_client)
        return self._dynamic

    # ------------------------------------------------------------------ kubetune objects

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

    def list_jobs(self, namespace: str | None = None) -> list[dict[str, Any]]:
        with api_errors("listing CustomizationJobs"):
            if namespace:
                result = self.custom.list_namespaced_custom_object(
                    API_GROUP, API_VERSION, namespace, "customizationjobs"
                )
            else:
                result = self.custom.list_cluster_custom_object(API_GROUP, API_VERSION, "customizationjobs")
        items: list[dict[str, Any]] = result.get("items", [])
        return items

    # ------------------------------------------------------------------ children

    def create_if_absent(self, manifest: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """Create an object; if one of that name exists, return it (idempotent across restarts)."""
        api_version, kind = manifest["apiVersion"], manifest["kind"]
        namespace, name = manifest["metadata"].get("namespace"), manifest["metadata"]["name"]
        resource = self.dynamic.resources.get(api_version=api_version, kind=kind)
        try:
            return True, dict(resource.create(body=manifest, namespace=namespace).to_dict())
        except DynamicApiException as error:
            if error.status != 409:
                with api_errors(f"creating {kind} {namespace}/{name}"):
                    raise
        existing = self.get(api_version, kind, namespace, name)
        if existing is None:
            raise kopf.TemporaryError(f"{kind} {namespace}/{name} was deleted while being created", delay=2)
        return False, existing

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        resource = self.dynamic.resources.get(api_version=api_version, kind=kind)
        try:
            return dict(resource.get(name=name, namespace=namespace).to_dict())
        except DynamicApiException as error:
            if error.status == 404:
                return None
            with api_errors(f"reading {kind} {namespace}/{name}"):
                raise
        return None

    def merge_patch(self, api_version: str, kind: str, namespace: str, name: str, patch: dict[str, Any]) -> None:
        resource = self.dynamic.resources.get(api_version=api_version, kind=kind)
        with api_errors(f"patching {kind} {namespace}/{name}"):
            resource.patch(body=patch, name=name, namespace=namespace, content_type="application/merge-patch+json")

    def list_pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        with api_errors(f"listing the pods of {namespace}/{job_name}"):
            pods = self.core.list_namespaced_pod(namespace, label_selector=f"kubetune.io/job={job_name}")
        return [self.api_client.sanitize_for_serialization(pod) for pod in pods.items]
