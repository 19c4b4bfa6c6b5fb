"""YAML output for manifests: multi-line strings (a ConfigMap's JSON) as readable `|` blocks."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml


class _BlockDumper(yaml.SafeDumper):
    pass


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _represent_str)


def dump_all(documents: Iterable[dict[str, Any]]) -> str:
    return yaml.dump_all(list(documents), Dumper=_BlockDumper, sort_keys=False, width=120, allow_unicode=True)
