"""Expert parallel (ep2 over 2 gloo processes) trains tiny Qwen3-MoE and Mixtral models like 1 process."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch

from kubetune_trainer.parallel.experts import (
    apply_expert_parallel,
    check_expert_parallel,
    expert_count,
    expert_parameters,
    load_balancing_loss,
)
from kubetune_trainer.parallel.mesh import ParallelDims, build_mesh

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

WORKER = Path(__file__).with_name("expert_parallel_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
sys.path.insert(0, str(WORKER.parent))

from expert_parallel_worker import MAX_GRAD_NORM, STEPS, parse, tiny_moe, train  # noqa: E402


def run_one(out: Path, *options: str) -> dict[str, Any]:
    """The 1-process reference, in this process (saves a Python start-up per test)."""
    assert "WORLD_SIZE" not in os.environ
    return train(parse([str(out), *options]))


def run_ep2(out: Path, *options: str) -> dict[str, Any]:
    done = subprocess.run(
        [*TORCHRUN, str(WORKER), str(out), *options],
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
    one = run_one(tmp_path / "one.json", *options, *(["--checkpoint", str(tmp_path / "ck1")] if saves else []))
    ep2_checkpoint = ["--compare", str(tmp_path / "ck1"), "--checkpoint", str(tmp_path / "ck2")] if saves else []
    two = run_ep2(tmp_path / "two.json", *options, *ep2_checkpoint)

    assert max_difference(one["losses"], two["losses"]) < 1e-4, (one["losses"], two["losses"])
    assert one["losses"][-1] < one["losses"][0] - 0.2  # it trains
    # The clipped gradient norm counts each expert shard once (clip_grad_norm over mixed meshes).
    assert max_difference(one["grad_norms"], two["grad_norms"]) < 1e-4 * max(one["grad_norms"])
    if kind == "full":  # expert shards among the trained parameters; clipping really scales them
        assert max(one["grad_norms"]) > MAX_GRAD_NORM
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
    one = run_one(tmp_path / "one.json", *options)  # also checks it equals the model's aux_loss
    two = run_ep2(tmp_path / "two.json", *options)
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


@pytest.fixture
def one_rank_ep_mesh(tmp_path: Path) -> Iterator[DeviceMesh]:
    """A 1-process gloo group and its 1-rank ep mesh (the all-to-alls run, to and from itself)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("ep",))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_sharded_block_computes_the_models_block(one_rank_ep_mesh: DeviceMesh, model_type: str) -> None:
    """Output and gradients of an MoE block through dispatch/combine equal the model's own."""
    reference = tiny_moe(model_type)
    sharded = copy.deepcopy(reference)
    assert apply_expert_parallel(sharded, one_rank_ep_mesh) == 2
    hidden = torch.randn(3, 5, 64)
    blocks = [m.model.layers[1].mlp for m in (reference, sharded)]  # type: ignore[union-attr,index]
    outputs = [block(hidden) for block in blocks]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
    for output in outputs:
        output.pow(2).sum().backward()
    for name in ("gate_up_proj", "down_proj"):
        ours = getattr(blocks[1].experts, name).grad.full_tensor()
        torch.testing.assert_close(ours, getattr(blocks[0].experts, name).grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(blocks[1].gate.weight.grad, blocks[0].gate.weight.grad, rtol=1e-5, atol=1e-6)
    assert [n for n, _ in expert_parameters(sharded)] == [
        f"model.layers.{layer}.mlp.experts.{name}" for layer in (0, 1) for name in ("gate_up_proj", "down_proj")
    ]


def test_refuses_dense_models_and_lora_on_experts(one_rank_ep_mesh: DeviceMesh) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1))
    with pytest.raises(ValueError, match="no fused experts module"):
        apply_expert_parallel(dense, one_rank_ep_mesh)
    lora = LoraConfig(r=2, target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj"])
    with pytest.raises(ValueError, match="LoRA on expert weights"):
        apply_expert_parallel(get_peft_model(tiny_moe("qwen3_moe"), lora), one_rank_ep_mesh)
    single = build_mesh(ParallelDims(), 0, 1, torch.device("cpu"))
    assert apply_expert_parallel(tiny_moe("mixtral"), single) == 0  # ep 1: nothing to shard
