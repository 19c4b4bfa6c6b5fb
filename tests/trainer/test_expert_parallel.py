"""Expert parallel (ep2 over 2 gloo processes) trains tiny Qwen3-MoE and Mixtral models like 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune_trainer.parallel.experts import check_expert_parallel, expert_count, load_balancing_loss

WORKER = Path(__file__).with_name("expert_parallel_worker.py")
sys.path.insert(0, str(WORKER.parent))

from expert_parallel_worker import STEPS, tiny_moe  # noqa: E402


def run_worker(out: Path, processes: int, *options: str) -> dict[str, Any]:
    launcher = (
        [sys.executable]
        if processes == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    )
    done = subprocess.run(
        [*launcher, str(WORKER), str(out), *options],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def max_difference(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == STEPS
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("model", ["qwen3_moe", "mixtral"])
def test_ep2_matches_one_process(tmp_path: Path, model: str, kind: str) -> None:
    options = ["--model", model, "--kind", kind]
    saves = kind == "full"  # checkpoints: saved by 1 process, loaded under ep2, saved again under ep2
    one = run_worker(tmp_path / "one.json", 1, *options, *(["--checkpoint", str(tmp_path / "ck1")] if saves else []))
    ep2_checkpoint = ["--compare", str(tmp_path / "ck1"), "--checkpoint", str(tmp_path / "ck2")] if saves else []
    two = run_worker(tmp_path / "two.json", 2, *options, *ep2_checkpoint)

    assert max_difference(one["losses"], two["losses"]) < 1e-4, (one["losses"], two["losses"])
    assert one["losses"][-1] < one["losses"][0] - 0.2  # it trains
    prefix = "base_model.model." if kind == "lora" else ""
    assert two["expert_parameters"] == [
        f"{prefix}model.layers.{layer}.mlp.experts.{name}" for layer in (0, 1) for name in ("down_proj", "gate_up_proj")
    ]
    if saves:
        # ep2 read the 1-process checkpoint into its shards; its own trained weights agree.
        assert two["max_weight_difference"] < 1e-4
        import torch.distributed.checkpoint as dcp

        initial = tiny_moe(model).state_dict()
        trained = {}
        for folder in ("ck1", "ck2"):  # the ep2 checkpoint loads into the plain (unsharded) model
            state = {name: torch.zeros_like(tensor) for name, tensor in initial.items()}
            dcp.load(state, checkpoint_id=str(tmp_path / folder))
            trained[folder] = state
        experts = "model.layers.1.mlp.experts.gate_up_proj"
        assert float((trained["ck2"][experts] - initial[experts]).abs().max()) > 1e-3
        assert max(float((trained["ck1"][n] - trained["ck2"][n]).abs().max()) for n in initial) < 1e-4


@pytest.mark.slow
def test_ep2_router_aux_loss_matches_one_process(tmp_path: Path) -> None:
    """With the load-balancing loss (coefficient 1.0), which needs batch-wide expert statistics."""
    options = ["--model", "qwen3_moe", "--kind", "lora", "--aux"]
    one = run_worker(tmp_path / "one.json", 1, *options)  # also checks it equals the model's aux_loss
    two = run_worker(tmp_path / "two.json", 2, *options)
    assert max_difference(one["losses"], two["losses"]) < 1e-4, (one["losses"], two["losses"])
    assert max_difference(one["aux"], two["aux"]) < 1e-4, (one["aux"], two["aux"])
    assert one["aux"][-1] < one["aux"][0]  # the routing becomes more balanced


def test_expert_count_per_model_type() -> None:
    from transformers import LlamaConfig, MixtralConfig, Qwen3MoeConfig

    assert expert_count(MixtralConfig(num_local_experts=8)) == 8
    assert expert_count(Qwen3MoeConfig(num_experts=128)) == 128
    assert expert_count(LlamaConfig()) is None


@pytest.mark.parametrize(
    ("experts", "ep", "tp", "message"),
    [
        (6, 4, 1, "must divide the model's 6 experts"),
        (8, 2, 2, "needs tensor_parallel_size 1"),
        (None, 2, 1, "needs a mixture-of-experts model"),
    ],
)
def test_check_expert_parallel_refuses(experts: int | None, ep: int, tp: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_expert_parallel(experts, ep, tp)
    check_expert_parallel(experts, 1, tp)


@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_is_the_models_own(masked: bool) -> None:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    torch.manual_seed(0)
    logits = tuple(torch.randn(2 * 7, 4) for _ in range(3))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3]) if masked else None
    ours = load_balancing_loss(logits, 4, 2, mask)
    assert torch.allclose(ours, load_balancing_loss_func(logits, 4, 2, mask), rtol=1e-6)
