"""Static checks of the two images (no Docker engine here to build them) and hadolint.

What can be checked without building: pinned bases, non-root user, installs pinned by
constraints.txt with the right extras, the commands the operator and the pods run, the
read-only-root layout (HOME and caches), and that the build context lets in exactly what
the Dockerfiles COPY. The trainer image must agree with the pods that
kubetune/render/children.py renders (user, environment, commands).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from kubetune.render.children import RUN_AS_USER, TrainerSettings
from tests.helmchart import CHART, ROOT

HADOLINT = Path(sys.executable).parent / "hadolint"


@dataclass(frozen=True)
class Instruction:
    name: str
    args: str


def parse(path: Path) -> list[list[Instruction]]:
    """The instructions of each stage (comments dropped, continuation lines joined)."""
    text = re.sub(
        r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    )
    stages: list[list[Instruction]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        name, _, args = line.strip().partition(" ")
        if name.upper() == "FROM":
            stages.append([])
        assert stages, f"{path.name}: {name} before FROM"
        stages[-1].append(Instruction(name.upper(), " ".join(args.split())))
    return stages


def _all(path: Path, name: str) -> list[str]:
    return [i.args for stage in parse(path) for i in stage if i.name == name]


def _final(path: Path, name: str) -> list[str]:
    return [i.args for i in parse(path)[-1] if i.name == name]


def _env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in _final(path, "ENV"):
        for word in shlex.split(args):
            key, _, value = word.partition("=")
            env[key] = value
    return env


IMAGES = {
    # Dockerfile: (extras installed, entrypoint)
    "Dockerfile.operator": ("operator", ["kubetune", "operator"]),
    "Dockerfile.trainer": ("trainer,unsloth", ["python", "-m", "kubetune_trainer"]),
}


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_base_images_are_pinned(dockerfile: str) -> None:
    bases = _all(ROOT / dockerfile, "FROM")
    assert bases
    for base in bases:
        image = base.split()[0]
        _, _, tag = image.partition(":")
        assert tag and tag != "latest", f"{image}: pin the base image by tag"
        assert re.match(r"^\d+\.\d+\.\d+-", tag), f"{image}: pin the full version, not a moving minor tag"


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_runs_as_the_non_root_user_the_pods_use(dockerfile: str) -> None:
    (user,) = _final(ROOT / dockerfile, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root USER lets runAsNonRoot verify it"
    assert int(uid) == RUN_AS_USER


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_installs_its_extras_with_the_constraints(dockerfile: str) -> None:
    extras, _ = IMAGES[dockerfile]
    installs = [run for run in _all(ROOT / dockerfile, "RUN") if "pip install" in run]
    assert installs
    for run in installs:
        assert "-c constraints.txt" in run, run
    assert any(f'".[{extras}]"' in run for run in installs)
    assert not any("--index-url" in run or "--extra-index-url" in run for run in installs), "torch comes from PyPI"


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_entrypoint(dockerfile: str) -> None:
    _, entrypoint = IMAGES[dockerfile]
    (args,) = _final(ROOT / dockerfile, "ENTRYPOINT")
    assert json.loads(args) == entrypoint  # exec form: signals reach the process (SIGTERM checkpoints)
    assert not _final(ROOT / dockerfile, "CMD")


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_read_only_root_layout(dockerfile: str) -> None:
    env = _env(ROOT / dockerfile)
    assert env["HOME"] == "/tmp"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert any("compileall" in run for run in _all(ROOT / dockerfile, "RUN")), "precompile: the root is read-only"


def test_trainer_image_matches_the_pods() -> None:
    env = _env(ROOT / "Dockerfile.trainer")
    for key in ("XDG_CACHE_HOME", "HF_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "UNSLOTH_COMPILE_LOCATION"):
        assert env[key].startswith("/cache"), key
    # The pod template sets the same directories (children.py); they must not disagree.
    children = (ROOT / "operator" / "kubetune" / "render" / "children.py").read_text()
    pod_env = dict(re.findall(r'\{"name": "([A-Z_]+)", "value": "(/[^"]*)"\}', children))
    assert pod_env, "children.py sets the cache directories"
    for key, value in pod_env.items():
        if key in env:
            assert env[key] == value, key
    # The pods run `python -m kubetune_trainer` and `torchrun -m kubetune_trainer`: both on PATH.
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert "torchrun" in children and '"python", "-m", "kubetune_trainer"' in children


def test_image_versions_follow_the_package() -> None:
    version = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    app_version = re.search(r'^appVersion: "([^"]+)"', (CHART / "Chart.yaml").read_text(), re.M)
    assert version and app_version
    assert app_version.group(1) == version.group(1)
    assert TrainerSettings().image.endswith(f":{version.group(1)}")


def _ignored(patterns: list[str], path: str) -> bool:
    """.dockerignore semantics for plain patterns: the last matching line wins, `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, body) or path.startswith(body + "/"):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_build_context_holds_what_is_copied(dockerfile: str) -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for copy in _all(ROOT / dockerfile, "COPY"):
        if copy.startswith("--from"):
            continue
        for source in copy.split()[:-1]:
            assert not _ignored(patterns, source.rstrip("/")), f"{source} is excluded by .dockerignore"
            assert (ROOT / source).exists(), source
    for heavy in (".venv", ".git", "tests", "charts"):
        assert _ignored(patterns, heavy), f"{heavy} must stay out of the build context"


def test_hadolint() -> None:
    res = subprocess.run(
        [str(HADOLINT), "--config", str(ROOT / ".hadolint.yaml"), *(str(ROOT / name) for name in sorted(IMAGES))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
