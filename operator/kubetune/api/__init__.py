"""The kubetune API: models of the custom resources (group kubetune.io, version v1alpha1).

Pure pydantic; no I/O. The CRD schemas in `crds/` are generated from these models.
"""

from kubetune.api.automodel import AutomodelSpec
from kubetune.api.common import API_GROUP, API_VERSION, GROUP_VERSION, split_reference
from kubetune.api.integrations import Integrations
from kubetune.api.resources import (
    BACKENDS,
    Backend,
    CustomizationJob,
    CustomizationJobSpec,
    CustomizationJobStatus,
    FileSet,
    FileSetSpec,
    Model,
    ModelSpec,
    Phase,
)
from kubetune.api.unsloth import UnslothSpec

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "BACKENDS",
    "GROUP_VERSION",
    "AutomodelSpec",
    "Backend",
    "CustomizationJob",
    "CustomizationJobSpec",
    "CustomizationJobStatus",
    "FileSet",
    "FileSetSpec",
    "Integrations",
    "Model",
    "ModelSpec",
    "Phase",
    "UnslothSpec",
    "split_reference",
]
