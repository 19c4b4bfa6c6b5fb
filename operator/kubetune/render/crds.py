"""Generate the CustomResourceDefinitions from the pydantic models and the rule table.

The models are the one source of truth for the schema; this module only translates
pydantic's JSON Schema (draft 2020-12) into a Kubernetes *structural* OpenAPI v3 schema:
`$ref`s inlined, `Optional[X]` as plain X (an absent field is null; explicit nulls are
pruned by the API server), `const` as a one-value enum, numeric exclusive bounds in the
OpenAPI 3.0 boolean form, no `additionalProperties: false` (forbidden in structural
schemas: unknown fields are pruned, and refused under strict field validation), nested
section defaults as `{}` so the API server fills every default the models declare, and
the rules of `kubetune.planning.rules` as `x-kubernetes-validations`.
"""

from __future__ import annotations

import json
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from kubetune.api.common import API_GROUP, API_VERSION
from kubetune.api.resources import (
    CustomizationJobSpec,
    CustomizationJobStatus,
    FileSetSpec,
    ModelSpec,
    ResourceStatus,
)
from kubetune.planning.rules import IMMUTABLE_MESSAGE, Kind, Rule, rules_for


class _FactoryDefaults(GenerateJsonSchema):
    """Emit defaults of `default_factory` fields: `{}` for sections, the value for lists."""

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            value = factory()  # type: ignore[call-arg]
            inner = self.generate_inner(schema["schema"])
            inner = dict(inner)
            inner["default"] = {} if isinstance(value, BaseModel) else value
            return inner
        return super().default_schema(schema)


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a model (no CEL rules yet)."""
    raw = model.model_json_schema(schema_generator=_FactoryDefaults)
    definitions = raw.pop("$defs", {})
    return _fill_nested_defaults(_convert(raw, definitions))


def _convert(node: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        target = definitions[node["$ref"].rsplit("/", 1)[-1]]
        return _convert({**target, **{k: v for k, v in node.items() if k != "$ref"}}, definitions)
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if len(options) == 1:
            return _convert({**options[0], **rest}, definitions)
        return _mixed_type(options, rest)
    return _convert_keywords(dict(node), definitions)


def _convert_keywords(node: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "title" or (key == "additionalProperties" and value is False):
            continue
        if key == "default" and value is None:
            continue  # an absent optional field is null already
        if key == "const":
            out["enum"] = [value]
        elif key == "exclusiveMinimum" and node.get("type") == "integer":
            out["minimum"] = value + 1  # same bound, easier to read in `kubectl explain`
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum" and node.get("type") == "integer":
            out["maximum"] = value - 1
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "properties":
            out["properties"] = {name: _convert(prop, definitions) for name, prop in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _convert(value, definitions)
        else:
            out[key] = value
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    return out


def _mixed_type(options: list[dict[str, Any]], rest: dict[str, Any]) -> dict[str, Any]:
    """A value of several JSON types (e.g. `"unsloth" | bool`). A structural schema cannot type
    it, and CEL cannot see an untyped field, so the API server accepts any value here; the
    operator's validator (admission webhook and every reconcile) refuses the wrong ones."""
    words = " or ".join(json.dumps(v) for o in options for v in o.get("enum", [True, False]))
    out = {k: v for k, v in rest.items() if k != "title"}
    out["description"] = f"{out.get('description', '')} One of {words}.".strip()
    out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def _fill_nested_defaults(node: dict[str, Any]) -> dict[str, Any]:
    """Replace each `default: {}` by the defaults of its fields.

    The API server checks a default against the node's CEL rules as written, before it
    applies nested defaults, so `{}` would fail rules that read its fields.
    """
    for child in node.get("properties", {}).values():
        _fill_nested_defaults(child)
    if node.get("default") == {} and "properties" in node:
        node["default"] = {name: child["default"] for name, child in node["properties"].items() if "default" in child}
    return node


def _node(schema: dict[str, Any], dotted_path: str) -> dict[str, Any]:
    node = schema
    for part in (p for p in dotted_path.split(".") if p):
        node = node["properties"][part]
    return node


def attach_rules(spec_schema: dict[str, Any], rules: tuple[Rule, ...]) -> dict[str, Any]:
    """Add each rule's CEL to the schema node it belongs to (`spec_schema` is the spec's schema)."""
    for rule in rules:
        node = _node(spec_schema, f"{rule.section}.{rule.node}")
        validation: dict[str, Any] = {
            "rule": rule.cel,
            "message": rule.message,
            "reason": "FieldValueInvalid",
        }
        if rule.field_path:
            validation["fieldPath"] = rule.field_path
        node.setdefault("x-kubernetes-validations", []).append(validation)
    return spec_schema


def attach_immutability(spec_schema: dict[str, Any]) -> dict[str, Any]:
    """Transition rules: a backend section, once there, neither changes nor goes away."""
    for backend in ("automodel", "unsloth"):
        spec_schema["properties"][backend].setdefault("x-kubernetes-validations", []).append(
            {"rule": "self == oldSelf", "message": IMMUTABLE_MESSAGE}
        )
    spec_schema.setdefault("x-kubernetes-validations", []).append(
        {
            "rule": "has(self.automodel) == has(oldSelf.automodel) && has(self.unsloth) == has(oldSelf.unsloth)",
            "message": IMMUTABLE_MESSAGE,
        }
    )
    return spec_schema


def _status_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = openapi_schema(model)
    # kopf keeps its handler progress under status; keep what we do not declare.
    schema["x-kubernetes-preserve-unknown-fields"] = True
    return schema


def _crd(
    kind: Kind,
    plural: str,
    spec_model: type[BaseModel],
    status_model: type[BaseModel],
    short_names: list[str],
    columns: list[dict[str, Any]],
    description: str,
) -> dict[str, Any]:
    spec_schema = attach_rules(openapi_schema(spec_model), rules_for(kind))
    if kind == "CustomizationJob":
        attach_immutability(spec_schema)
    spec_schema["description"] = description
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{API_GROUP}", "labels": {"app.kubernetes.io/part-of": "kubetune"}},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": ["kubetune"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": description,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": _status_schema(status_model),
                            },
                        }
                    },
                }
            ],
        },
    }


def _column(name: str, path: str, kind: str = "string", **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": kind, "jsonPath": path, **extra}


_AGE = _column("Age", ".metadata.creationTimestamp", "date")


def custom_resource_definitions() -> list[dict[str, Any]]:
    """The three CRDs, in apply order."""
    return [
        _crd(
            "CustomizationJob",
            "customizationjobs",
            CustomizationJobSpec,
            CustomizationJobStatus,
            ["ctj"],
            [
                _column("Backend", ".status.backend"),
                _column("Phase", ".status.phase"),
                _column("Progress", ".status.progress.percentageDone", "number", format="float"),
                _column("Loss", ".status.progress.trainLoss", "number", format="float"),
                _AGE,
            ],
            "A fine-tuning job in NeMo Customizer's training configuration format.",
        ),
        _crd(
            "Model",
            "models",
            ModelSpec,
            ResourceStatus,
            ["ktmodel"],
            [
                _column("Tokenizer", ".spec.tokenizer"),
                _column("Base", ".spec.adapter.baseModel"),
                _column("Phase", ".status.phase"),
                _AGE,
            ],
            "A model (full weights or a LoRA adapter) that jobs fine-tune or create.",
        ),
        _crd(
            "FileSet",
            "filesets",
            FileSetSpec,
            ResourceStatus,
            ["ktfs"],
            [_column("Phase", ".status.phase"), _AGE],
            "A set of files (a dataset) that jobs train on.",
        ),
    ]


def crd_file_name(crd: dict[str, Any]) -> str:
    return f"{crd['metadata']['name']}.yaml"


def to_yaml(crds: list[dict[str, Any]]) -> str:
    header = "# Generated by `kubetune crds` from the pydantic models; do not edit.\n"
    return header + "---\n".join(yaml.safe_dump(crd, sort_keys=False, width=120) for crd in crds)
