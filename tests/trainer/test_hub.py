"""`hf://` sources: one download per node (local rank 0, the others wait), and a clear offline error.

No model hub is reachable here: the one network call (`kubetune_trainer.hub.snapshot_download`)
is replaced by a fake hub that copies a local model into a cache folder and counts downloads;
the barrier, the ranks and the cache reads are real (2 torchrun processes, gloo).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune_trainer.models import ModelError, local_model_path

WORKER = """
import os, shutil, sys, time
from pathlib import Path
from kubetune_trainer import hub
from kubetune_trainer.distributed import init_world, shutdown

source, cache, log = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])

def fake_snapshot_download(repo_id, local_files_only):
    folder = cache / repo_id.replace("/", "--")
    if local_files_only:
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{repo_id} is not in the cache")
        return str(folder)
    with log.open("a") as handle:
        handle.write(f"download {repo_id} by rank {os.environ['RANK']}\\n")
    time.sleep(1.0)  # a slow download: the other rank must wait, not read a half-written folder
    shutil.copytree(source, folder, dirs_exist_ok=True)
    return str(folder)

hub.snapshot_download = fake_snapshot_download
world = init_world()
from kubetune_trainer.models import local_model_path
path = local_model_path("hf://org/tiny", world)
assert (Path(path) / "config.json").is_file(), path
print(f"rank {world.rank} got {path}", flush=True)
shutdown(world)
"""


def test_one_download_per_node_and_the_other_rank_reads_the_cache(tiny_model: Path, tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    log = tmp_path / "downloads.log"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        str(script),
        str(tiny_model),
        str(tmp_path / "cache"),
        str(log),
    ]
    done = subprocess.run(
        command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert log.read_text().splitlines() == ["download org/tiny by rank 0"]
    folder = tmp_path / "cache" / "org--tiny"
    assert f"rank 0 got {folder}" in done.stdout and f"rank 1 got {folder}" in done.stdout


def test_offline_cluster_error_says_how_to_preload(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelError) as raised:
        local_model_path("hf://org/none")
    message = str(raised.value)
    assert message.startswith("cannot download hf://org/none:")
    assert "hf download org/none --local-dir <folder>" in message
    assert "source.pvc or source.hostPath" in message
