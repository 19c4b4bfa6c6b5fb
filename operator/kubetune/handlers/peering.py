"""Which kopf peering the operator joins, decided once at startup from what the cluster has.

kopf pauses every handler while a peering it was told to use is missing (no CRD, or no
object: nothing ever un-pauses it), and says nothing about it at the default log level. So
the operator looks first:

- no name configured (KUBETUNE_PEERING unset): the peering object `kubetune` when it exists,
  else standalone with a warning — kopf's own default (a cluster with only `crds/` applied
  works out of the box; one replica must run then);
- a name configured (the Helm chart always sets one): it must exist, else the operator stops
  with an error that names the missing CRD or object and how to create it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from kubetune.handlers.settings import SettingsError

log = logging.getLogger(__name__)

DEFAULT_NAME = "kubetune"
GROUP, VERSION = "kopf.dev", "v1"
CRDS_FILE = "third_party/kopf/peering.yaml"


@dataclass(frozen=True)
class Peering:
    name: str | None
    """The peering object to join; None runs standalone."""


def _plural(namespaces: Sequence[str]) -> tuple[str, str]:
    return ("kopfpeerings", "KopfPeering") if namespaces else ("clusterkopfpeerings", "ClusterKopfPeering")


def _crd_served(api: client.ApiClient, plural: str) -> bool:
    try:
        resources = client.CustomObjectsApi(api).get_api_resources(GROUP, VERSION)
    except ApiException as error:
        if error.status == 404:  # the kopf.dev group is not served at all
            return False
        raise
    return any(resource.name == plural for resource in resources.resources)


def _missing_objects(api: client.ApiClient, name: str, namespaces: Sequence[str]) -> list[str]:
    custom = client.CustomObjectsApi(api)
    plural, kind = _plural(namespaces)
    missing = []
    where: list[str | None] = [*namespaces] or [None]  # None: the cluster-wide object
    for namespace in where:
        try:
            if namespace is None:
                custom.get_cluster_custom_object(GROUP, VERSION, plural, name)
            else:
                custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        except ApiException as error:
            if error.status != 404:
                raise
            missing.append(f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}")
    return missing


def _problem(api: client.ApiClient, name: str, namespaces: Sequence[str]) -> str | None:
    """What is missing for peering through `name`, or None when everything exists."""
    plural, kind = _plural(namespaces)
    if not _crd_served(api, plural):
        return f"the CRD {plural}.{GROUP} is not installed (kubectl apply -f {CRDS_FILE})"
    missing = _missing_objects(api, name, namespaces)
    if missing:
        example = f"{{apiVersion: {GROUP}/{VERSION}, kind: {kind}, metadata: {{name: {name}}}}}"
        return f"{', '.join(missing)} does not exist (create it, e.g. `kubectl apply -f -` with {example})"
    return None


def choose_peering(
    api: client.ApiClient,
    configured: str | None,
    namespaces: Sequence[str],
    wait_seconds: float = 10.0,
) -> Peering:
    """The peering to run with; raises SettingsError when a configured one is missing.

    A configured peering gets `wait_seconds` to appear: the Helm chart creates its object in a
    post-install hook, which may land just after the operator's pod starts.
    """
    if configured is None:
        problem = _problem(api, DEFAULT_NAME, namespaces)
        if problem is None:
            return Peering(DEFAULT_NAME)
        log.warning(
            "running standalone, without kopf peering: %s. Run one replica only, or set up peering "
            "(KUBETUNE_PEERING names the object; the Helm chart does it all)",
            problem,
        )
        return Peering(None)
    deadline = time.monotonic() + wait_seconds
    while (problem := _problem(api, configured, namespaces)) is not None and time.monotonic() < deadline:
        time.sleep(1.0)
    if problem is not None:
        raise SettingsError(f"KUBETUNE_PEERING={configured!r}: {problem}; or unset KUBETUNE_PEERING to run standalone")
    return Peering(configured)
