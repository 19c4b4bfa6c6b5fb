"""Container images for the test node without a registry.

The test machines can pull no image, so every image a pod of the test cluster runs is
made here and imported into containerd (``ctr images import``):

- single static binaries (the pause sandbox, CoreDNS, the training-operator) become a
  one-layer image written as a docker-archive by :func:`static_image_archive`;
- the project's own images (``Dockerfile.trainer``, ``Dockerfile.operator``) are built by
  ``tools/images/build.sh`` with buildah, and written as a docker-archive only when the
  node lacks them (the trainer's is 7 GB).

A docker-archive is what ``docker save`` writes: ``manifest.json``, an image config whose
``rootfs.diff_ids`` list the sha256 of each uncompressed layer tar, and the layer tars.
Standard library only.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .procs import ControlPlaneError

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Image:
    ref: str
    """Image reference, e.g. ``localhost/kubetune/coredns:v1.14.7-1a2b3c4d``."""
    archive: Path | None = None
    """A docker-archive that is already written; None: ``write_archive`` asks buildah."""

    def write_archive(self, path: Path) -> Path:
        """The image as a docker-archive: the written one, or a new one at ``path``."""
        if self.archive is not None:
            return self.archive
        script = REPO_ROOT / "tools" / "images" / "build.sh"
        res = subprocess.run(["bash", str(script), "archive", self.ref, str(path)], capture_output=True, text=True)
        if res.returncode != 0:
            tail = "\n".join(res.stderr.splitlines()[-20:])
            raise ControlPlaneError(f"`bash {script} archive {self.ref}` failed (exit {res.returncode}):\n{tail}")
        return path


def _layer(files: Mapping[str, Path], dirs: Sequence[str], links: Mapping[str, str]) -> bytes:
    """An uncompressed layer tar with ``dirs`` (mode 1777 for tmp), ``files`` at the given
    absolute paths and symlinks ``links`` (path -> relative target), owned by root, with
    fixed mtimes (the same input gives the same digest, so an unchanged image is not
    imported again)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in dirs:
            info = tarfile.TarInfo(d.strip("/"))
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d.strip("/") == "tmp" else 0o755
            tar.addfile(info)
        for target, source in files.items():
            data = source.read_bytes()
            info = tarfile.TarInfo(target.strip("/"))
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))
        for path, target in links.items():
            info = tarfile.TarInfo(path.strip("/"))
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


def static_image_archive(
    repository: str,
    version: str,
    binary: Path,
    out_dir: Path,
    *,
    entrypoint: Sequence[str],
    user: str = "",
    extra_files: Mapping[str, Path] | None = None,
    links: Mapping[str, str] | None = None,
) -> Image:
    """A one-layer image holding ``binary`` at ``entrypoint[0]`` (plus ``extra_files``),
    tagged ``<repository>:<version>-<content hash>``; ``version`` alone when the name is
    fixed by someone else (containerd's sandbox image)."""
    files = {entrypoint[0]: binary, **(extra_files or {})}
    layer = _layer(files, dirs=["bin", "etc", "tmp"], links=links or {})
    diff_id = hashlib.sha256(layer).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": list(entrypoint), "User": user, "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        "history": [{"created_by": f"kubetune tests/e2e/images.py: {binary.name}"}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_digest = hashlib.sha256(config_bytes).hexdigest()
    tag = version if repository.startswith("registry.k8s.io/") else f"{version}-{config_digest[:8]}"
    ref = f"{repository}:{tag}"
    manifest = [{"Config": f"{config_digest}.json", "RepoTags": [ref], "Layers": [f"{diff_id}/layer.tar"]}]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{repository.rsplit('/', 1)[-1]}-{tag}.tar"
    if not path.exists():
        tmp = path.with_suffix(".partial")
        with tarfile.open(tmp, mode="w") as tar:
            for name, data in (
                ("manifest.json", json.dumps(manifest).encode()),
                (f"{config_digest}.json", config_bytes),
                (f"{diff_id}/layer.tar", layer),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        tmp.rename(path)
    return Image(ref, path)


def project_images(repo_root: Path = REPO_ROOT) -> dict[str, Image]:
    """Build (or reuse) the trainer and operator images with ``tools/images/build.sh all``;
    ``{"trainer": ..., "operator": ...}``. A failed build fails the tests with its log tail."""
    script = repo_root / "tools" / "images" / "build.sh"
    res = subprocess.run(["bash", str(script), "all"], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        tail = "\n".join(res.stderr.splitlines()[-40:])
        raise ControlPlaneError(f"`bash {script} all` failed (exit {res.returncode}):\n{tail}")
    images = {ref.rsplit("/", 1)[-1].split(":", 1)[0]: Image(ref) for ref in res.stdout.split()}
    missing = {"trainer", "operator"} - images.keys()
    if missing:
        raise ControlPlaneError(f"`bash {script} all` printed no image for {sorted(missing)}:\n{res.stdout}")
    return images
