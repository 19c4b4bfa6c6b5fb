"""Operator settings, read once from the environment (the Helm chart sets these variables).

Grouped the kopf way: each field says its unit and why its default is what it is.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from kubetune.render.children import TrainerSettings


class SettingsError(ValueError):
    """An environment variable has a value the operator cannot use."""


@dataclass(frozen=True)
class OperatorSettings:
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    namespaces: tuple[str, ...] = ()
    """Namespaces to watch; empty watches the whole cluster (KUBETUNE_NAMESPACES, comma-separated)."""
    metrics_port: int = 8080
    """Port of /metrics and /healthz (KUBETUNE_METRICS_PORT); 0 turns the endpoint off."""
    gpu_memory_gib: float | None = None
    """Memory of one GPU on this cluster (KUBETUNE_GPU_MEMORY_GIB). With it, the memory
    pre-flight warns on jobs that may not fit and refuses those that cannot."""
    gpu_type: str | None = None
    """The cluster's GPU type (KUBETUNE_GPU_TYPE, e.g. A100, T4). With it, jobs asking for bf16 on a
    type without bf16 are refused (kubetune.planning.dtypes)."""
    webhook: bool = False
    """Serve the validating admission webhook (KUBETUNE_WEBHOOK=true). Off by default because it
    needs a Service and a certificate; the same checks run at every reconcile either way."""
    webhook_managed: bool = False
    """Let kopf create the ValidatingWebhookConfiguration itself, with a URL to `webhook_host`
    (KUBETUNE_WEBHOOK_MANAGED=true): for development clusters that reach the operator by URL.
    The Helm chart ships its own configuration pointing at the Service, and leaves this off."""
    webhook_host: str | None = None
    """Host name the API server uses to reach the webhook (the Service DNS name)."""
    webhook_port: int = 9443
    webhook_cert_file: str | None = None
    """Serving certificate (PEM) of the webhook and its key; the Helm chart mounts them from a Secret."""
    webhook_key_file: str | None = None
    webhook_ca_file: str | None = None
    """CA that signed the serving certificate; written into the ValidatingWebhookConfiguration."""
    reference_retry_seconds: float = 30.0
    """How often a job waiting for a missing Model/FileSet re-checks, besides the watch on them."""
    workers: int = 16
    """Threads that run handlers at once (KUBETUNE_WORKERS): each handler mostly waits on the API
    server, so more threads than cores keep a burst of jobs moving."""
    peering: str | None = None
    """kopf peering object through which only one operator replica acts at a time
    (KUBETUNE_PEERING). Unset: `kubetune` if it exists, else standalone with a warning; set: it
    must exist (handlers/peering.py)."""
    peering_lifetime_seconds: int = 60
    """How long a replica's peering record lives without a keep-alive (KUBETUNE_PEERING_LIFETIME):
    a standby replica takes over at most this long after the active one dies (kopf's default)."""
    verbose: bool = False
    """Log every handler call (KUBETUNE_VERBOSE=true)."""
    allowed_host_paths: tuple[str, ...] = ()
    """Node path prefixes Models and FileSets may mount with a hostPath source (Helm value
    allowedHostPaths; KUBETUNE_ALLOWED_HOST_PATHS, comma-separated absolute paths). Empty by
    default: a hostPath gives the trainer pod the node's own files, which Pod Security would
    refuse the Model's author."""


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise SettingsError(f"{name}={value!r} is not an integer") from None


def _float(env: Mapping[str, str], name: str, default: float | None) -> float | None:
    value = env.get(name)
    if value in (None, ""):
        return default
    try:
        return float(value)
    except ValueError:
        raise SettingsError(f"{name}={value!r} is not a number") from None


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={value!r} is not a boolean (true/false)")


def _resources(env: Mapping[str, str], name: str) -> dict[str, dict[str, str]]:
    """``{"requests": {...}, "limits": {...}}`` (JSON) of the training containers."""
    value = env.get(name, "").strip()
    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise SettingsError(f"{name} is not JSON ({exc.msg}): {value!r}") from None
    if not isinstance(parsed, dict) or not set(parsed) <= {"requests", "limits"}:
        raise SettingsError(f"{name} must be an object with `requests` and/or `limits`, got {value!r}")
    resources: dict[str, dict[str, str]] = {}
    for kind, amounts in parsed.items():
        if not isinstance(amounts, dict) or not all(isinstance(v, str | int | float) for v in amounts.values()):
            raise SettingsError(f"{name}: {kind} must map resource names to quantities, got {amounts!r}")
        resources[kind] = {str(k): str(v) for k, v in amounts.items()}
    return resources


def _absolute_paths(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    paths = tuple(path.strip() for path in env.get(name, "").split(",") if path.strip())
    relative = [path for path in paths if not path.startswith("/")]
    if relative:
        raise SettingsError(f"{name}: {', '.join(relative)} is not an absolute path")
    return paths


def settings_from_env(env: Mapping[str, str] | None = None) -> OperatorSettings:
    env = os.environ if env is None else env
    defaults = TrainerSettings()
    trainer = TrainerSettings(
        image=env.get("KUBETUNE_TRAINER_IMAGE", defaults.image),
        image_pull_policy=env.get("KUBETUNE_TRAINER_IMAGE_PULL_POLICY", defaults.image_pull_policy),
        gpu_resource=env.get("KUBETUNE_GPU_RESOURCE", defaults.gpu_resource),
        backoff_limit=_int(env, "KUBETUNE_BACKOFF_LIMIT", defaults.backoff_limit),
        progress_interval_seconds=_float(env, "KUBETUNE_PROGRESS_INTERVAL", defaults.progress_interval_seconds)
        or defaults.progress_interval_seconds,
        shm_size=env.get("KUBETUNE_SHM_SIZE", defaults.shm_size),
        resources=_resources(env, "KUBETUNE_TRAINER_RESOURCES"),
    )
    namespaces = tuple(ns.strip() for ns in env.get("KUBETUNE_NAMESPACES", "").split(",") if ns.strip())
    return OperatorSettings(
        trainer=trainer,
        namespaces=namespaces,
        metrics_port=_int(env, "KUBETUNE_METRICS_PORT", 8080),
        gpu_memory_gib=_float(env, "KUBETUNE_GPU_MEMORY_GIB", None),
        gpu_type=env.get("KUBETUNE_GPU_TYPE") or None,
        webhook=_bool(env, "KUBETUNE_WEBHOOK", False),
        webhook_managed=_bool(env, "KUBETUNE_WEBHOOK_MANAGED", False),
        webhook_host=env.get("KUBETUNE_WEBHOOK_HOST") or None,
        webhook_port=_int(env, "KUBETUNE_WEBHOOK_PORT", 9443),
        webhook_cert_file=env.get("KUBETUNE_WEBHOOK_CERT_FILE") or None,
        webhook_key_file=env.get("KUBETUNE_WEBHOOK_KEY_FILE") or None,
        webhook_ca_file=env.get("KUBETUNE_WEBHOOK_CA_FILE") or None,
        reference_retry_seconds=_float(env, "KUBETUNE_REFERENCE_RETRY_SECONDS", 30.0) or 30.0,
        workers=_int(env, "KUBETUNE_WORKERS", 16),
        peering=env.get("KUBETUNE_PEERING") or None,
        peering_lifetime_seconds=_int(env, "KUBETUNE_PEERING_LIFETIME", 60),
        verbose=_bool(env, "KUBETUNE_VERBOSE", False),
        allowed_host_paths=_absolute_paths(env, "KUBETUNE_ALLOWED_HOST_PATHS"),
    )
