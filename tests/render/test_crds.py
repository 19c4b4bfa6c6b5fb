"""Offline checks of the generated CRDs; tests/e2e proves the API server accepts them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from kubetune.planning.rules import RULES
from kubetune.render.crds import custom_resource_definitions

CRDS = {crd["spec"]["names"]["kind"]: crd for crd in custom_resource_definitions()}


def _schema(kind: str) -> dict[str, Any]:
    schema: dict[str, Any] = CRDS[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_schema_is_structural_and_cheap_for_cel(kind: str) -> None:
    for path, node in _nodes(_schema(kind)):
        assert node.get("additionalProperties") is not False, path
        assert "anyOf" not in node and "$ref" not in node and "title" not in node, path
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        if node.get("type") == "string" and "enum" not in node and path.startswith(".spec"):
            assert "maxLength" in node, f"{path}: strings need maxLength (CEL cost)"
        if node.get("type") == "array" and path.startswith(".spec"):
            assert "maxItems" in node, f"{path}: lists need maxItems (CEL cost)"


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_every_described_field(kind: str) -> None:
    for path, node in _nodes(_schema(kind)["properties"]["spec"], ".spec"):
        if path.endswith(("[]", "{}")):
            continue  # list items and map values are described by their field
        assert node.get("description"), f"{path} has no description (kubectl explain shows it)"


def test_every_rule_is_in_the_crd_once() -> None:
    rendered = [
        (kind, v["rule"], v["message"], v.get("fieldPath"))
        for kind in CRDS
        for _, node in _nodes(_schema(kind))
        for v in node.get("x-kubernetes-validations", [])
        if "reason" in v
    ]
    expected = [(r.kind, r.cel, r.message, r.field_path) for r in RULES]
    assert sorted(rendered, key=str) == sorted(expected, key=str)


def test_section_defaults_let_the_api_server_fill_nested_defaults() -> None:
    automodel = _schema("CustomizationJob")["properties"]["spec"]["properties"]["automodel"]
    assert automodel["properties"]["batch"]["default"] == {
        "global_batch_size": 8,
        "micro_batch_size": 1,
        "sequence_packing": False,
    }
    for section in ("training", "schedule", "optimizer", "parallelism"):
        node = automodel["properties"][section]
        assert node["default"] == {k: v["default"] for k, v in node["properties"].items() if "default" in v}
    assert automodel["properties"]["optimizer"]["properties"]["learning_rate"]["default"] == 5e-6
    assert "default" not in automodel["properties"]["training"]["properties"]["lora"]


def test_job_crd_names_and_columns() -> None:
    crd = CRDS["CustomizationJob"]
    assert crd["spec"]["names"]["shortNames"] == ["ctj"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Backend", "Phase", "Progress", "Loss", "Age"]
