"""Operator settings, read once from the environment (the Helm chart sets these variables).

Grouped the kopf way, one class per concern; each group is a pydantic-settings class, so
a variable's name is its group's prefix plus the field's name (`KUBETUNE_TRAINER_IMAGE`,
`KUBETUNE_WEBHOOK_PORT`, `KUBETUNE_WORKERS`) and an empty variable counts as unset. Each
field says its unit and why its default is what it is.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kubetune.render.children import TrainerPods

PREFIX = "KUBETUNE_"

CommaSeparated = Annotated[tuple[str, ...], NoDecode]
"""A list given as `a,b,c` in one variable (not as JSON)."""


class SettingsError(ValueError):
    """An environment variable has a value the operator cannot use."""


def _split(value: Any) -> Any:
    return tuple(item.strip() for item in value.split(",") if item.strip()) if isinstance(value, str) else value


def _config(prefix: str) -> SettingsConfigDict:
    return SettingsConfigDict(env_prefix=prefix, env_ignore_empty=True, frozen=True, extra="ignore")


class TrainerSettings(TrainerPods, BaseSettings):
    """The trainer pods (`KUBETUNE_TRAINER_*`): image, GPU resource name, restarts,
    progress interval, /dev/shm, CPU/memory (`KUBETUNE_TRAINER_RESOURCES`, JSON)."""

    # JSON is decoded by the validator below, so that bad JSON is named like any bad value.
    model_config = _config(PREFIX + "TRAINER_") | SettingsConfigDict(enable_decoding=False)

    @field_validator("resources", mode="before")
    @classmethod
    def _json(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"not JSON ({error.msg})") from None


class WatchSettings(BaseSettings):
    """What the operator watches and how many jobs it handles at once."""

    model_config = _config(PREFIX)

    namespaces: CommaSeparated = ()
    """Namespaces to watch; empty watches the whole cluster (KUBETUNE_NAMESPACES, comma-separated)."""
    workers: int = Field(16, ge=1)
    """Threads that run handlers at once (KUBETUNE_WORKERS): each handler mostly waits on the API
    server, so more threads than cores keep a burst of jobs moving."""
    reference_retry_seconds: float = Field(30.0, gt=0)
    """How often a job waiting for a missing Model/FileSet re-checks, besides the watch on them."""
    peering: str | None = None
    """kopf peering object through which only one operator replica acts at a time
    (KUBETUNE_PEERING). Unset: `kubetune` if it exists, else standalone with a warning; set: it
    must exist (handlers/peering.py)."""
    peering_lifetime_seconds: int = Field(60, ge=1)
    """How long a replica's peering record lives without a keep-alive: a standby replica takes
    over at most this long after the active one dies (kopf's default)."""
    verbose: bool = False
    """Log every handler call (KUBETUNE_VERBOSE=true)."""

    _split_namespaces = field_validator("namespaces", mode="before")(_split)


class ClusterSettings(BaseSettings):
    """Facts about the cluster that the validator cannot read from the job."""

    model_config = _config(PREFIX)

    gpu_memory_gib: float | None = Field(None, gt=0)
    """Memory of one GPU on this cluster (KUBETUNE_GPU_MEMORY_GIB). With it, the memory
    pre-flight warns on jobs that may not fit and refuses those that cannot."""
    gpu_type: str | None = None
    """The cluster's GPU type (KUBETUNE_GPU_TYPE, e.g. A100, T4). With it, jobs asking for bf16 on a
    type without bf16 are refused (kubetune.planning.dtypes)."""
    allowed_host_paths: CommaSeparated = ()
    """Node path prefixes Models and FileSets may mount with a hostPath source (Helm value
    allowedHostPaths; KUBETUNE_ALLOWED_HOST_PATHS, comma-separated absolute paths). Empty by
    default: a hostPath gives the trainer pod the node's own files, which Pod Security would
    refuse the Model's author."""

    @field_validator("allowed_host_paths", mode="before")
    @classmethod
    def _absolute(cls, value: Any) -> Any:
        paths = _split(value)
        relative = [path for path in paths if not str(path).startswith("/")]
        if relative:
            raise ValueError(f"{', '.join(relative)} is not an absolute path")
        return paths


class EndpointSettings(BaseSettings):
    """The operator's HTTP endpoints for Prometheus and the kubelet; 0 turns one off."""

    model_config = _config(PREFIX)

    metrics_port: int = Field(8080, ge=0, le=65535)
    """/metrics, prometheus_client's server (KUBETUNE_METRICS_PORT)."""
    health_port: int = Field(8081, ge=0, le=65535)
    """/healthz, kopf's liveness endpoint (KUBETUNE_HEALTH_PORT): it answers only while the
    operator's watch loop runs, with what the probes report."""


class WebhookSettings(BaseSettings):
    """The validating admission webhook (`KUBETUNE_WEBHOOK_*`)."""

    model_config = _config(PREFIX + "WEBHOOK_")

    enabled: bool = False
    """Serve it (KUBETUNE_WEBHOOK_ENABLED=true). Off by default because it needs a Service and a
    certificate; the same checks run at every reconcile either way."""
    managed: bool = False
    """Let kopf create the ValidatingWebhookConfiguration itself, with a URL to `host`: for
    development clusters that reach the operator by URL. The Helm chart ships its own
    configuration pointing at the Service, and leaves this off."""
    host: str | None = None
    """Host name the API server uses to reach the webhook (the Service DNS name)."""
    port: int = Field(9443, ge=1, le=65535)
    cert_file: str | None = None
    """Serving certificate (PEM) and its key; the Helm chart mounts them from a Secret."""
    key_file: str | None = None
    ca_file: str | None = None
    """CA that signed the serving certificate; written into the ValidatingWebhookConfiguration."""


class KubetuneSettings(BaseModel):
    """Every group; each reads its variables when it is built (tests may pass groups). Not
    kopf's `OperatorSettings`, which the startup handler tunes from these (handlers/operator.py)."""

    model_config = {"frozen": True}

    trainer: TrainerSettings = Field(default_factory=TrainerSettings)
    watch: WatchSettings = Field(default_factory=WatchSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    endpoints: EndpointSettings = Field(default_factory=EndpointSettings)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)


def _variable(group: type[BaseSettings], field_name: str) -> str:
    return str(group.model_config.get("env_prefix", "")) + field_name.upper()


def settings_from_env() -> KubetuneSettings:
    """All groups from the environment; every bad variable is named in one SettingsError."""
    problems: list[str] = []
    groups: dict[str, BaseSettings] = {}
    for name, field in KubetuneSettings.model_fields.items():
        group: type[BaseSettings] = field.annotation  # type: ignore[assignment]
        try:
            groups[name] = group()
        except ValidationError as error:
            for e in error.errors():
                field_name, *inner = (str(part) for part in e["loc"])
                where = f" (at {'.'.join(inner)})" if inner else ""
                problems.append(f"{_variable(group, field_name)}={e['input']!r}{where}: {e['msg']}")
    if problems:
        raise SettingsError("; ".join(problems))
    return KubetuneSettings.model_validate(groups)
