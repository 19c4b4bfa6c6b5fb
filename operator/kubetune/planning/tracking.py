"""Credentials of a job's pods: experiment tracking, and the model hub's token.

`api_key_secret` is written like every reference (`name` or `workspace/name`), but a pod
can only read Secrets of its own namespace, so a workspace other than the job's is
refused here (CLI, webhook and reconcile all call `secret_reference_errors` through
`validation.validate_job`). The key reaches the trainer as an environment variable from a
`secretKeyRef` (`secret_env`), so it is never written into the job's ConfigMap or status.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from kubetune.api.automodel import AutomodelSpec
from kubetune.api.common import split_reference
from kubetune.api.resources import CustomizationJobSpec, Source
from kubetune.api.unsloth import UnslothSpec
from kubetune.planning.references import Finding

SECRET_KEYS = {"wandb": "WANDB_API_KEY", "mlflow": "MLFLOW_TRACKING_TOKEN"}
"""Per integration: the key read from the Secret, also the environment variable the client reads."""


@dataclass(frozen=True)
class SecretUse:
    path: str
    """Dotted path of the `api_key_secret` field, from `spec.`."""
    namespace: str
    name: str
    key: str


def secret_uses(section: AutomodelSpec | UnslothSpec, namespace: str, backend: str) -> Iterator[SecretUse]:
    """Every Secret the job's integrations name, resolved against the job's namespace."""
    integrations = section.integrations
    if integrations is None:
        return
    for integration, key in SECRET_KEYS.items():
        settings = getattr(integrations, integration)
        if settings is None or settings.api_key_secret is None:
            continue
        secret_namespace, name = split_reference(settings.api_key_secret, namespace)
        path = f"spec.{backend}.integrations.{integration}.api_key_secret"
        yield SecretUse(path, secret_namespace, name, key)


def secret_reference_errors(section: AutomodelSpec | UnslothSpec, namespace: str, backend: str) -> list[Finding]:
    return [
        Finding(
            use.path,
            f"names a Secret in namespace {use.namespace!r}, but the trainer pods run in {namespace!r} and a pod "
            f"can only read Secrets of its own namespace: create the Secret (key {use.key}) in {namespace!r} "
            f"and write `{use.name}`",
            "SecretInOtherNamespace",
        )
        for use in secret_uses(section, namespace, backend)
        if use.namespace != namespace
    ]


HUB_TOKEN_KEY = "HF_TOKEN"


def hub_token_env(sources: Mapping[str, Source]) -> list[dict[str, Any]]:
    """HF_TOKEN from the Secret an `hf://` model source names (the student's first, else the teacher's)."""
    for role in ("model", "teacher"):
        source = sources.get(role)
        if source is not None and source.uri is not None and source.tokenSecret is not None:
            secret = {"name": source.tokenSecret, "key": HUB_TOKEN_KEY}
            return [{"name": HUB_TOKEN_KEY, "valueFrom": {"secretKeyRef": secret}}]
    return []


def secret_env(spec: CustomizationJobSpec, namespace: str) -> list[dict[str, Any]]:
    """The trainer container's environment entries that carry the integrations' credentials."""
    backend = spec.backend
    section = spec.automodel if backend == "automodel" else spec.unsloth
    if backend is None or section is None:
        return []
    return [
        {"name": use.key, "valueFrom": {"secretKeyRef": {"name": use.name, "key": use.key}}}
        for use in secret_uses(section, namespace, backend)
        if use.namespace == namespace
    ]
