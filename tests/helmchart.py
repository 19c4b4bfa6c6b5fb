"""Render the Helm chart with the real helm binary (tests/render and tests/e2e share this).

helm comes from the cached control-plane build (`tools/controlplane/build.sh`, or the
folder in ``$KUBETUNE_CP_BIN``); a missing binary fails the test, it never skips it.
"""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import yaml
from pydantic_settings import BaseSettings

from kubetune.handlers.settings import KubetuneSettings, settings_from_env
from tests.e2e.controlplane import find_bin_dir

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "kubetune"


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


def settings_env_names() -> set[str]:
    """Every KUBETUNE_* variable the operator's settings read: each group's prefix plus each field."""
    names = set()
    for field in KubetuneSettings.model_fields.values():
        group = field.annotation
        assert isinstance(group, type) and issubclass(group, BaseSettings)
        prefix = str(group.model_config.get("env_prefix", ""))
        names |= {prefix + name.upper() for name in group.model_fields}
    return names


def settings_for(env: Mapping[str, str]) -> KubetuneSettings:
    """The operator's settings in an environment of exactly these variables."""
    with mock.patch.dict(os.environ, env, clear=True):
        return settings_from_env()


def container_env(deployment: Mapping[str, Any]) -> dict[str, str]:
    """The operator container's environment (an env entry without value is the empty string)."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {item["name"]: item.get("value", "") for item in container.get("env", [])}
