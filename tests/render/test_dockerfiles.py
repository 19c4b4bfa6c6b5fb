"""Static checks of the two images (no Docker engine here to build them) and hadolint.

What can be checked without building: pinned bases, non-root user, installs pinned by
constraints.txt with the right extras, a dependency layer that a source change does not
rebuild, the commands the operator and the pods run, the read-only-root layout (HOME and
caches), and that the build context lets in exactly what the Dockerfiles COPY. The trainer
image must agree with the pods that kubetune/render/children.py renders (user,
environment, commands). tools/images/build.sh builds them for real (docs/images.md).
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

from kubetune.render.children import RUN_AS_USER, TrainerPods
from tests.helmchart import CHART, ROOT

HADOLINT = Path(sys.executable).parent / "hadolint"


@dataclass(frozen=True)
class Instruction:
    name: str
    args: str


def _instructions(path: Path) -> list[Instruction]:
    """Every instruction in order (comments dropped, continuation lines joined)."""
    text = re.sub(
        r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    )
    instructions = []
    for line in text.splitlines():
        if line.strip():
            name, _, args = line.strip().partition(" ")
            instructions.append(Instruction(name.upper(), " ".join(args.split())))
    return instructions


def parse(path: Path) -> list[list[Instruction]]:
    """The instructions of each stage; the global ARGs before the first FROM are left out."""
    stages: list[list[Instruction]] = []
    for instruction in _instructions(path):
        if instruction.name == "FROM":
            stages.append([])
        elif not stages:
            assert instruction.name == "ARG", f"{path.name}: {instruction.name} before FROM"
            continue
        stages[-1].append(instruction)
    return stages


def _global_args(path: Path) -> dict[str, str]:
    """The ARGs before the first FROM (the only ones a FROM line can use), with their defaults."""
    args: dict[str, str] = {}
    for instruction in _instructions(path):
        if instruction.name == "FROM":
            break
        key, _, default = instruction.args.partition("=")
        args[key] = default
    return args


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
    # Every stage starts from the BASE build arg or from an earlier stage: one base per image,
    # which tools/images/build.sh replaces by its stand-in where no registry is reachable.
    stages: list[str] = []
    for base in _all(ROOT / dockerfile, "FROM"):
        image, _, alias = base.partition(" AS ")
        assert image == "${BASE}" or image in stages, f"{base}: FROM ${{BASE}} or an earlier stage"
        stages.append(alias.strip())
    assert stages
    # The default, what a plain `docker build` uses, is the official image, pinned.
    default = _global_args(ROOT / dockerfile).get("BASE", "")
    image, _, tag = default.partition(":")
    assert image == "python", f"BASE={default}: the official python image by default"
    assert tag and tag != "latest", f"BASE={default}: pin the base image by tag"
    assert re.match(r"^\d+\.\d+\.\d+-", tag), f"BASE={default}: pin the full version, not a moving minor tag"


def test_both_images_default_to_the_same_base() -> None:
    assert len({_global_args(ROOT / dockerfile)["BASE"] for dockerfile in IMAGES}) == 1


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
        # Whatever comes from the index is pinned; the project's own install adds nothing else.
        assert "-c constraints.txt" in run or "--no-deps" in run, run
    assert any(f'".[{extras}]"' in run and "-c constraints.txt" in run for run in installs)
    assert not any("--index-url" in run or "--extra-index-url" in run for run in installs), "torch comes from PyPI"


@pytest.mark.parametrize("dockerfile", sorted(IMAGES))
def test_dependencies_are_a_layer_of_their_own(dockerfile: str) -> None:
    """A source change must not reinstall the dependencies (the trainer's are 7 GB).

    The extras install before any source is copied, from pyproject.toml and constraints.txt
    alone; the project installs after the sources, without dependencies; the image is the
    dependency stage plus the project's own layer (FROM it: copying the venv into a fresh
    stage would duplicate it on every build).
    """
    extras, _ = IMAGES[dockerfile]
    stages = parse(ROOT / dockerfile)
    flat = [i for stage in stages for i in stage]
    deps = next(n for n, i in enumerate(flat) if i.name == "RUN" and f'".[{extras}]"' in i.args)
    copied = [i.args.split()[:-1] for i in flat[:deps] if i.name == "COPY" and not i.args.startswith("--from")]
    before = sorted(source for sources in copied for source in sources)
    assert before == ["constraints.txt", "pyproject.toml"], f"copied before the dependencies install: {before}"
    sources = [n for n, i in enumerate(flat) if i.name == "COPY" and i.args.split()[0] in ("operator/", "trainer/")]
    assert sources and min(sources) > deps
    project = [i.args for i in flat[max(sources) :] if i.name == "RUN" and "pip install" in i.args]
    assert project and all("--no-deps" in run for run in project)

    deps_stage = next(stage for stage in stages if any(f'".[{extras}]"' in i.args for i in stage))
    final = stages[-1]
    assert final[0].args == deps_stage[0].args.split(" AS ")[-1], "the image is FROM the dependency stage"
    assert [i.name for i in final].count("RUN") == 0, "no other layer in the final stage"
    assert [i.args.split()[0] for i in final if i.name == "COPY"] == ["--from=build"]


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
    assert TrainerPods().image.endswith(f":{version.group(1)}")


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


def test_trainer_image_ships_the_tracking_clients_pinned() -> None:
    """integrations.wandb / integrations.mlflow work in the image: both clients are in the trainer
    extra (which Dockerfile.trainer installs) and pinned by constraints.txt."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    trainer = {
        re.split(r"[<>=!~\[ ]", requirement)[0].lower() for requirement in project["optional-dependencies"]["trainer"]
    }
    pins = {
        line.split("==")[0].strip().lower()
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    assert {"wandb", "mlflow-skinny"} <= trainer & pins
    assert "trainer" in IMAGES["Dockerfile.trainer"][0]
