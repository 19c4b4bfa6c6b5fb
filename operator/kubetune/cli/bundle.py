"""Sort a bundle of manifests into jobs and a catalog of the Models/FileSets they name.

`kubetune validate` and `kubetune run` take multi-document YAML in which Model and
FileSet documents sit beside the jobs; this is where those become a `Catalog`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubetune.api.common import GROUP_VERSION, manifest_identity
from kubetune.api.resources import FileSetSpec, ModelSpec
from kubetune.planning.references import Catalog, Finding, ObjectKey
from kubetune.planning.validation import validate_fileset, validate_model


@dataclass
class ObjectReport:
    """The verdict on one Model or FileSet document."""

    kind: str
    namespace: str
    name: str
    errors: list[Finding] = field(default_factory=list)


@dataclass
class Bundle:
    jobs: list[tuple[int, Mapping[str, Any]]] = field(default_factory=list)
    """(document index, manifest) of each CustomizationJob."""
    catalog: Catalog = field(default_factory=Catalog)
    objects: list[tuple[int, ObjectReport]] = field(default_factory=list)
    ignored: list[tuple[int, str]] = field(default_factory=list)
    """Documents that are not kubetune resources, with a description."""


def sort_manifests(manifests: Sequence[Any]) -> Bundle:
    bundle = Bundle()
    for index, manifest in enumerate(manifests):
        kind = manifest.get("kind") if isinstance(manifest, Mapping) else None
        if kind == "CustomizationJob" or (isinstance(manifest, Mapping) and "spec" in manifest and kind is None):
            bundle.jobs.append((index, manifest))
        elif kind in ("Model", "FileSet") and manifest.get("apiVersion") == GROUP_VERSION:
            bundle.objects.append((index, _add_object(bundle.catalog, kind, manifest)))
        else:
            bundle.ignored.append((index, f"{kind or 'a document without kind'} is not a kubetune resource"))
    return bundle


def _add_object(catalog: Catalog, kind: str, manifest: Mapping[str, Any]) -> ObjectReport:
    name, namespace = manifest_identity(manifest)
    key = ObjectKey(kind, namespace, name)  # type: ignore[arg-type]
    report = ObjectReport(kind, namespace, name)
    if not name:
        report.errors.append(Finding("metadata.name", "is required", "FieldValueRequired"))
    parsed: ModelSpec | FileSetSpec | None
    if kind == "Model":
        parsed, errors = validate_model(manifest.get("spec"))
    else:
        parsed, errors = validate_fileset(manifest.get("spec"))
    report.errors.extend(errors)
    if parsed is None or report.errors:
        first = report.errors[0]
        catalog.invalid[key] = f"{first.path}: {first.message}"
    elif isinstance(parsed, ModelSpec):
        catalog.models[(namespace, name)] = parsed
    else:
        catalog.filesets[(namespace, name)] = parsed
    return report
