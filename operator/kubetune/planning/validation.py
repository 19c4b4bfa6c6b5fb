"""Validate a CustomizationJob manifest: every error at once, each with its dotted path.

One function, `validate_job`, used by the CLI, the admission webhook, every reconcile and
`kubetune run`. It runs, in order: the envelope (apiVersion, kind, name); the schema (the
pydantic models: types, enums, bounds, unknown keys); the cross-field rules of
`rules.py`; and, when a catalog of Models/FileSets is given, the rules of
`references.py`. A rule is still checked when unrelated fields are broken, so a job that
breaks three rules gets three errors, not one.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from kubetune.api.automodel import AutomodelSpec
from kubetune.api.common import DNS_LABEL_PATTERN, GROUP_VERSION, manifest_identity
from kubetune.api.resources import BACKENDS, Backend, CustomizationJobSpec, FileSetSpec, ModelSpec
from kubetune.api.unsloth import UnslothSpec
from kubetune.planning.dtypes import gpu_dtype_findings
from kubetune.planning.gpus import gpu_selection_warnings
from kubetune.planning.layout import Layout, compute_layout
from kubetune.planning.references import Catalog, Finding, ReferenceCheck, check_references
from kubetune.planning.rules import Kind, Rule, rules_for
from kubetune.planning.schema_errors import describe, dotted
from kubetune.planning.tracking import secret_reference_errors

_MAX_REPAIRS = 16
T = TypeVar("T", bound=BaseModel)


@dataclass
class JobReport:
    """The verdict on one CustomizationJob."""

    name: str
    namespace: str
    backend: Backend | None = None
    errors: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    spec: CustomizationJobSpec | None = None
    """The parsed spec (defaults filled), present when the schema accepted it."""
    layout: Layout | None = None
    references: ReferenceCheck | None = None

    @property
    def valid(self) -> bool:
        return not self.errors

    @property
    def section(self) -> AutomodelSpec | UnslothSpec | None:
        if self.spec is None or self.backend is None:
            return None
        section: AutomodelSpec | UnslothSpec | None = getattr(self.spec, self.backend)
        return section

    def to_json(self) -> dict[str, Any]:
        """The `kubetune validate -o json` shape: the job, its backend, valid, errors and warnings
        (path and message), and the layout."""
        return {
            "name": self.name,
            "namespace": self.namespace,
            "backend": self.backend,
            "valid": self.valid,
            "errors": [{"path": e.path, "message": e.message} for e in self.errors],
            "warnings": [{"path": w.path, "message": w.message} for w in self.warnings],
            "layout": self.layout.model_dump() if self.layout else None,
        }


def validate_job(manifest: Any, catalog: Catalog | None = None, gpu_type: str | None = None) -> JobReport:
    """Validate a CustomizationJob manifest (a parsed YAML/JSON mapping).

    `gpu_type`: the cluster's GPU type when known (operator setting, `kubetune validate --gpu-type`),
    for the dtype rules that depend on it (`dtypes.gpu_dtype_findings`).
    """
    if not isinstance(manifest, Mapping):
        report = JobReport(name="", namespace="default")
        report.errors.append(Finding("", "a CustomizationJob must be a mapping", "NotAMapping"))
        return report
    name, namespace = manifest_identity(manifest)
    report = JobReport(name=name, namespace=namespace)
    _check_envelope(manifest, report)

    raw_spec = manifest.get("spec")
    if not isinstance(raw_spec, Mapping):
        report.errors.append(
            Finding(
                "spec",
                "is required: a mapping with an `automodel` or `unsloth` section",
                "FieldValueRequired",
            )
        )
        return report
    present = [b for b in BACKENDS if b in raw_spec]
    report.backend = present[0] if len(present) == 1 else None

    spec, schema_errors = parse_leniently(CustomizationJobSpec, raw_spec)
    bad_paths = [path for path, _ in schema_errors]
    report.errors.extend(_schema_findings(schema_errors, raw_spec))
    if spec is not None:
        report.errors.extend(check_rules("CustomizationJob", spec, bad_paths))
    if report.errors:
        return report
    assert spec is not None
    report.spec = spec
    section = report.section
    assert section is not None
    report.layout = compute_layout(section)
    assert report.backend is not None
    report.errors.extend(secret_reference_errors(section, namespace, report.backend))
    report.errors.extend(gpu_dtype_findings(section, gpu_type))
    if isinstance(section, UnslothSpec):
        report.warnings.extend(gpu_selection_warnings(section))
    if catalog is not None:
        report.references = check_references(section, namespace, catalog)
        report.errors.extend(report.references.errors)
        report.warnings.extend(report.references.warnings)
    return report


def validate_model(spec: Any) -> tuple[ModelSpec | None, list[Finding]]:
    return _validate_object("Model", ModelSpec, spec)


def validate_fileset(spec: Any) -> tuple[FileSetSpec | None, list[Finding]]:
    return _validate_object("FileSet", FileSetSpec, spec)


def _validate_object(kind: Kind, model: type[T], raw: Any) -> tuple[T | None, list[Finding]]:
    parsed, schema_errors = parse_leniently(model, raw if isinstance(raw, Mapping) else {})
    findings = _schema_findings(schema_errors, raw if isinstance(raw, Mapping) else {})
    if parsed is not None:
        findings.extend(check_rules(kind, parsed, [path for path, _ in schema_errors]))
    return (parsed if not findings else None), findings


def _check_envelope(manifest: Mapping[str, Any], report: JobReport) -> None:
    if manifest.get("apiVersion") != GROUP_VERSION:
        report.errors.append(
            Finding(
                "apiVersion",
                f"must be {GROUP_VERSION}; got {manifest.get('apiVersion')!r}",
                "WrongApiVersion",
            )
        )
    if manifest.get("kind") != "CustomizationJob":
        report.errors.append(Finding("kind", f"must be CustomizationJob; got {manifest.get('kind')!r}", "WrongKind"))
    if not re.fullmatch(DNS_LABEL_PATTERN, report.name):
        report.errors.append(
            Finding(
                "metadata.name",
                f"{report.name!r} is not a valid job name: use at most 63 lowercase "
                "letters, digits and '-', starting and ending with a letter or digit",
                "InvalidName",
            )
        )


# --------------------------------------------------------------------------- schema


SchemaError = tuple[tuple[int | str, ...], Any]


def parse_leniently(model: type[T], raw: Mapping[str, Any]) -> tuple[T | None, list[SchemaError]]:
    """Parse `raw`; on errors, repair a copy (drop bad values, stub missing ones) and parse that.

    The repaired object is only used to evaluate rules whose fields were all valid, so a
    broken field elsewhere does not hide a rule violation. Returns the parsed object (of
    the repaired input, or None if it could not be repaired) and the original errors.
    """
    try:
        return model.model_validate(raw), []
    except ValidationError as error:
        errors: list[SchemaError] = [(tuple(e["loc"]), e) for e in error.errors()]
    data: Any = copy.deepcopy(dict(raw))
    for _ in range(_MAX_REPAIRS):
        try:
            return model.model_validate(data), errors
        except ValidationError as error:
            for detail in error.errors():
                _repair(model, data, tuple(detail["loc"]), detail["type"])
    return None, errors


def _repair(model: type[BaseModel], data: dict[str, Any], loc: tuple[int | str, ...], kind: str) -> None:
    names = tuple(part for part in loc if isinstance(part, str))
    *parents, leaf = loc[: next((i for i, p in enumerate(loc) if isinstance(p, int)), len(loc))] or ("",)
    node: Any = data
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict):
        return
    if kind == "missing":
        node[leaf] = {} if _field_is_model(model, names) else "placeholder"
    else:
        node.pop(leaf, None)


def _field_is_model(model: type[BaseModel], names: tuple[str, ...]) -> bool:
    annotation: Any = model
    for name in names:
        candidates = [a for a in (annotation, *getattr(annotation, "__args__", ())) if isinstance(a, type)]
        owner = next((c for c in candidates if issubclass(c, BaseModel) and name in c.model_fields), None)
        if owner is None:
            return False
        annotation = owner.model_fields[name].annotation
    options = (annotation, *getattr(annotation, "__args__", ()))
    return any(isinstance(a, type) and issubclass(a, BaseModel) for a in options)


def _schema_findings(errors: list[SchemaError], raw_spec: Mapping[str, Any]) -> list[Finding]:
    findings = []
    for loc, detail in errors:
        within = dotted(loc)
        findings.append(
            Finding(
                dotted(loc, "spec"),
                describe(detail, within, _siblings(raw_spec, loc)),
                _reason(detail["type"]),
            )
        )
    return findings


def _siblings(raw_spec: Mapping[str, Any], loc: tuple[int | str, ...]) -> list[str]:
    """Field names allowed next to an unknown key (for the did-you-mean hint)."""
    model: Any = CustomizationJobSpec
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field_info = getattr(model, "model_fields", {}).get(part)
        if field_info is None:
            return []
        options = (field_info.annotation, *getattr(field_info.annotation, "__args__", ()))
        model = next((a for a in options if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _reason(pydantic_type: str) -> str:
    return "".join(word.title() for word in pydantic_type.split("_"))


# --------------------------------------------------------------------------- rules


def check_rules(kind: Kind, spec: BaseModel, bad_paths: list[tuple[int | str, ...]]) -> list[Finding]:
    """Evaluate the cross-field rules of `kind` on a parsed spec, skipping rules on broken fields."""
    findings = []
    broken = {dotted(path) for path in bad_paths}
    for rule in rules_for(kind):
        node = _node(spec, rule)
        if node is None or _touches(rule, broken):
            continue
        if not rule.check(node):
            findings.append(Finding(rule.path, rule.message, rule.name))
    return findings


def _node(spec: BaseModel, rule: Rule) -> Any:
    node: Any = spec
    for part in (p for p in f"{rule.section}.{rule.node}".split(".") if p):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def _touches(rule: Rule, broken: set[str]) -> bool:
    prefix = f"{rule.section}." if rule.section else ""
    concerned = [prefix + c for c in rule.concerns]
    return any(
        b == c or b.startswith(c + ".") or b.startswith(c + "[") or c.startswith(b + ".")
        for b in broken
        for c in concerned
    )
