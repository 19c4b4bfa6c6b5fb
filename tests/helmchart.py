"""Render the Helm chart with the real helm binary (tests/render and tests/e2e share this).

helm comes from the cached control-plane build (`tools/controlplane/build.sh`, or the
folder in ``$KUBETUNE_CP_BIN``); a missing binary fails the test, it never skips it.
"""

from __future__ import annotations

import ast
import functools
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.e2e.controlplane import find_bin_dir

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "kubetune"
SETTINGS_PY = ROOT / "operator" / "kubetune" / "handlers" / "settings.py"


@functools.cache
def helm_binary() -> Path:
    return find_bin_dir() / "helm"


def helm(*args: str, values: Mapping[str, Any] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run helm; `values` go in as a values file (types survive, unlike --set)."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as values_file:
        yaml.safe_dump(dict(values or {}), values_file)
        values_file.flush()
        argv = [str(helm_binary()), *args, *(["-f", values_file.name] if values is not None else [])]
        res = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({res.returncode}):\n{res.stderr}")
    return res


def template(
    values: Mapping[str, Any] | None = None, *, release: str = "kt", namespace: str = "kubetune-system"
) -> list[dict[str, Any]]:
    """`helm template` of the chart (CRDs of crds/ included) as a list of objects."""
    out = helm("template", release, str(CHART), "--namespace", namespace, "--include-crds", values=values).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in matches]}"
    return matches[0]


def settings_env_names(path: Path = SETTINGS_PY) -> set[str]:
    """Every KUBETUNE_* name settings.py reads: the string constants of its source."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("KUBETUNE_")
    }


def container_env(deployment: Mapping[str, Any]) -> dict[str, str]:
    """The operator container's environment (an env entry without value is the empty string)."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {item["name"]: item.get("value", "") for item in container.get("env", [])}
