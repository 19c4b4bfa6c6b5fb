"""Building blocks shared by every kubetune resource model.

Every section model forbids unknown keys (as NeMo Customizer does) and is strict about
types: the API server stores JSON, so `"5"` for an integer is a user error, not something
to coerce silently. Reference strings get a validator with a readable message instead of a
bare regular expression, and an explicit JSON schema so the CRD carries the same pattern.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, WithJsonSchema

API_GROUP = "kubetune.io"
API_VERSION = "v1alpha1"
GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"

# Kubernetes' name rules (k8s.io/apimachinery/pkg/util/validation), the one copy in kubetune:
# - DNS-1123 label (namespaces, CustomizationJobs, label values): at most 63 of [a-z0-9-],
#   alphanumeric at both ends;
# - DNS-1123 subdomain (Models, FileSets, claims, ConfigMaps, ...): dot-separated labels, at
#   most 253 characters, so `llama-3.1-8b-instruct` is a valid Model name;
# - DNS-1035 label (Services, and the PyTorchJob the training-operator names them after): a
#   DNS-1123 label that starts with a letter.
# (Kubernetes bounds a subdomain's length as a whole, 253, not each dot-separated part.)
_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_PART = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS_LABEL_PATTERN = rf"^{_LABEL}$"
DNS_SUBDOMAIN_PATTERN = rf"^{_PART}(\.{_PART})*$"
DNS1035_LABEL_PATTERN = r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"
REFERENCE_PATTERN = rf"^({_LABEL}/)?{_PART}(\.{_PART})*$"
GPU_LIST_PATTERN = r"^[0-9]+(,[0-9]+)*$"

# Bounds that keep the API server's CEL cost estimate low (it charges a rule by the longest
# string and list it may see: every string gets a maxLength, every list a maxItems) and that
# no real job comes near.
MAX_NAME_LENGTH = 63
MAX_SUBDOMAIN_LENGTH = 253
MAX_REFERENCE_LENGTH = MAX_NAME_LENGTH + 1 + MAX_SUBDOMAIN_LENGTH
MAX_TEXT_LENGTH = 4096
MAX_LIST_ITEMS = 64
MAX_NODES = 4096
"""The most nodes one job may use (`parallelism.num_nodes`); bounds the replicas' Service names."""


class Section(BaseModel):
    """Base of every spec section: unknown keys are errors, types are strict."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False)


def _check_dns_label(value: str) -> str:
    if not re.fullmatch(DNS_LABEL_PATTERN, value):
        raise ValueError(
            f"{value!r} is not a valid name: use at most 63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return value


_SUBDOMAIN_RULE = (
    "at most 253 lowercase letters, digits, '-' and '.', starting and ending with a letter or digit "
    "(the Kubernetes rule for object names)"
)


def is_dns_subdomain(value: str) -> bool:
    return len(value) <= MAX_SUBDOMAIN_LENGTH and re.fullmatch(DNS_SUBDOMAIN_PATTERN, value) is not None


def _check_dns_subdomain(value: str) -> str:
    if not is_dns_subdomain(value):
        raise ValueError(f"{value!r} is not a valid name: use {_SUBDOMAIN_RULE}")
    return value


def _check_reference(value: str) -> str:
    workspace, slash, name = value.rpartition("/")
    if (slash and not re.fullmatch(DNS_LABEL_PATTERN, workspace)) or not is_dns_subdomain(name):
        raise ValueError(
            f"{value!r} is not a valid reference: write `name` or `workspace/name`, where the workspace "
            f"is a namespace (a DNS label: at most 63 lowercase letters, digits and '-') and the name has "
            f"{_SUBDOMAIN_RULE}"
        )
    return value


def _check_gpu_list(value: str) -> str:
    if not re.fullmatch(GPU_LIST_PATTERN, value):
        raise ValueError(f'{value!r} is not a GPU list: write comma-separated GPU indices such as "0" or "0,1"')
    indices = value.split(",")
    if len(set(indices)) != len(indices):
        raise ValueError(f"{value!r} names a GPU twice: list each GPU index once")
    return value


DnsLabel = Annotated[
    str,
    AfterValidator(_check_dns_label),
    WithJsonSchema({"type": "string", "pattern": DNS_LABEL_PATTERN, "maxLength": MAX_NAME_LENGTH}),
]
"""A Kubernetes object name that is also a DNS label (RFC 1123)."""

DnsSubdomain = Annotated[
    str,
    AfterValidator(_check_dns_subdomain),
    WithJsonSchema({"type": "string", "pattern": DNS_SUBDOMAIN_PATTERN, "maxLength": MAX_SUBDOMAIN_LENGTH}),
]
"""A Kubernetes object name that is a DNS subdomain (RFC 1123): Models, FileSets, claims."""

Reference = Annotated[
    str,
    AfterValidator(_check_reference),
    WithJsonSchema({"type": "string", "pattern": REFERENCE_PATTERN, "maxLength": MAX_REFERENCE_LENGTH}),
]
"""A reference to a Model or FileSet: `name` (same namespace) or `workspace/name`."""

GpuList = Annotated[
    str,
    AfterValidator(_check_gpu_list),
    WithJsonSchema({"type": "string", "pattern": GPU_LIST_PATTERN, "maxLength": MAX_NAME_LENGTH}),
]
"""Comma-separated GPU indices for CUDA_VISIBLE_DEVICES."""


def split_reference(reference: str, default_namespace: str) -> tuple[str, str]:
    """Return (namespace, name) of a reference; `name` alone means the job's namespace."""
    namespace, _, name = reference.rpartition("/")
    return (namespace or default_namespace), name


def manifest_identity(manifest: Mapping[str, Any]) -> tuple[str, str]:
    """(name, namespace) of a manifest, tolerating a missing or malformed metadata block."""
    metadata = manifest.get("metadata")
    if not isinstance(metadata, Mapping):
        return "", "default"
    name, namespace = metadata.get("name"), metadata.get("namespace")
    return (name if isinstance(name, str) else ""), (namespace if isinstance(namespace, str) else "default")
