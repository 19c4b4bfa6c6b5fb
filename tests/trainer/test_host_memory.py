"""Freed host memory is reused: a loop that allocates and frees the same tensor stops faulting
its pages in again once the trainer has set glibc's thresholds. (Blocks below 32 MiB are
reused by glibc's adaptive threshold too, until the heap top is trimmed: a training step's mix of
sizes still faulted ~215 MB per micro batch of SmolLM2 without the settings.)"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

LOOP = """
import json, resource, sys
import torch
from kubetune_trainer.host_memory import reuse_freed_memory
applied = reuse_freed_memory() if sys.argv[1] == "reuse" else False
faults = []
for _ in range(30):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(12 * 2**20)  # 48 MiB: above the most glibc's own threshold rises to
    block.fill_(1.0)
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _faults(mode: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", LOOP, mode], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_a_freed_block_is_reused_instead_of_faulted_in_again() -> None:
    default, reused = _faults("default"), _faults("reuse")
    assert reused["applied"] and not default["applied"]
    pages = 48 * 2**20 // 4096
    # Steady state (the last 10 passes): glibc maps and unmaps the block every time by default;
    # with the settings it stays in the heap and is not faulted in again.
    assert all(faults >= pages // 2 for faults in default["faults"][-10:]), default
    assert sum(reused["faults"][-10:]) <= pages // 10, reused
