"""Trains a tiny MoE model 10 AdamW steps, as 1 process or as one rank of an ep2 torchrun.

    python expert_parallel_worker.py OUT.json --model qwen3_moe --kind full
    python -m torch.distributed.run --standalone --nproc-per-node=2 expert_parallel_worker.py ...

The global batch is the same in both runs; rank r of 2 takes its half of the rows. The loss
of a step is the sum of the token cross-entropies over the global label count (plus the
router aux loss with --aux), the gradients of non-expert parameters are summed over the
ranks and the expert gradients stay local (each rank owns its experts). Rank 0 writes the
per-step losses (and, with --checkpoint, a torch.distributed.checkpoint of the trained
model; with --compare, the max difference between its weights and that checkpoint's).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kubetune_trainer.data import IGNORE_INDEX
from kubetune_trainer.distributed import clip_gradients
from kubetune_trainer.losses import cross_entropy_sum
from kubetune_trainer.parallel.experts import (
    apply_expert_parallel,
    expert_count,
    expert_parameter_names,
    load_balancing_loss,
)
from kubetune_trainer.parallel.mesh import ParallelDims, build_mesh

STEPS, ROWS, LENGTH, VOCAB = 10, 4, 24, 128
MAX_GRAD_NORM = 1.0  # the automodel loop's


def tiny_moe(model_type: str) -> nn.Module:
    """4 experts, top-2, 2 layers, hidden 64, fp32; the same weights on every rank (seed 0)."""
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    shared: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 128,
        "attn_implementation": "eager",
        # Large enough that a wrong aux-loss gradient shows in the loss curve (models ship 0.001).
        "router_aux_loss_coef": 1.0,
    }
    torch.manual_seed(0)
    if model_type == "qwen3_moe":
        config = Qwen3MoeConfig(
            **shared, head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=4, norm_topk_prob=True
        )
        return Qwen3MoeForCausalLM(config)
    if model_type == "mixtral":
        return MixtralForCausalLM(MixtralConfig(**shared, intermediate_size=32, num_local_experts=4))
    raise ValueError(model_type)


def global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded rows of different lengths; prompts (the first tokens) carry no labels."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=generator)
    attention_mask = torch.ones(ROWS, LENGTH, dtype=torch.long)
    labels = input_ids.clone()
    for row, (length, prompt) in enumerate([(24, 5), (17, 3), (20, 9), (12, 2)]):
        attention_mask[row, length:] = 0
        labels[row, length:] = IGNORE_INDEX
        labels[row, :prompt] = IGNORE_INDEX
    return input_ids, attention_mask, labels


def add_lora(model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0)
    return get_peft_model(model, config)  # type: ignore[no-any-return]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", choices=["qwen3_moe", "mixtral"], required=True)
    parser.add_argument("--kind", choices=["full", "lora"], required=True)
    parser.add_argument("--aux", action="store_true", help="add the router load-balancing loss")
    parser.add_argument("--checkpoint", type=Path, help="save the trained model here with DCP")
    parser.add_argument("--compare", type=Path, help="load this DCP checkpoint and report the max difference")
    return parser.parse_args(argv)


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run the steps on this rank (1 process when WORLD_SIZE is unset) and return rank 0's results."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    group = None
    model = tiny_moe(args.model)
    config = model.config
    if args.kind == "lora":
        model = add_lora(model)
    ep_names: frozenset[str] = frozenset()
    if world > 1:
        dist.init_process_group("gloo")
        group = dist.group.WORLD
        mesh = build_mesh(ParallelDims(dp=world, ep=world), rank, world, torch.device("cpu"))
        blocks = apply_expert_parallel(model, mesh)
        assert blocks == config.num_hidden_layers, blocks
        ep_names = expert_parameter_names(model)
        assert len(ep_names) == 2 * blocks, sorted(ep_names)

    input_ids, attention_mask, labels = global_batch()
    label_count = int((labels[:, 1:] != IGNORE_INDEX).sum())
    rows = slice(rank * ROWS // world, (rank + 1) * ROWS // world)
    input_ids, attention_mask, labels = input_ids[rows], attention_mask[rows], labels[rows]

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=1e-2, weight_decay=0.0)
    experts = expert_count(config)
    assert experts == 4, experts
    losses, aux_values, norms = [], [], []
    model.train()
    for _ in range(STEPS):
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=args.aux)
        loss = cross_entropy_sum(outputs.logits, labels) / label_count
        if args.aux:
            aux = load_balancing_loss(outputs.router_logits, experts, config.num_experts_per_tok, attention_mask, group)
            if group is None:  # the model's own definition on the whole batch
                assert torch.allclose(aux, outputs.aux_loss, rtol=1e-6, atol=1e-7), (aux, outputs.aux_loss)
            aux_values.append(float(aux.detach()))
            loss = loss + config.router_aux_loss_coef * aux
        loss.backward()  # type: ignore[no-untyped-call]
        value = loss.detach().clone()
        if group is not None:
            ce = value - (config.router_aux_loss_coef * aux.detach() if args.aux else 0.0)
            dist.all_reduce(ce, group=group)  # the aux term is already the global value on each rank
            value = ce + (config.router_aux_loss_coef * aux.detach() if args.aux else 0.0)
            for name, param in trainable:
                if name not in ep_names and param.grad is not None:
                    dist.all_reduce(param.grad, group=group)
        losses.append(float(value))
        if group is None:  # plain tensors only: torch's own norm is the reference
            expected = torch.nn.utils.get_total_norm([p.grad for _, p in trainable if p.grad is not None])
        norm = clip_gradients([p for _, p in trainable], MAX_GRAD_NORM)  # clips: the norms start above 1
        if group is None:
            assert abs(norm - float(expected)) <= 1e-6 * float(expected), (norm, expected)
        norms.append(float(norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result: dict[str, Any] = {
        "losses": losses,
        "aux": aux_values,
        "grad_norms": norms,
        "expert_parameters": sorted(ep_names),
    }
    if args.checkpoint or args.compare:
        import torch.distributed.checkpoint as dcp

        state = model.state_dict()
        if args.compare:  # load it into tensors laid out as this run's (sharded experts under ep2)
            saved = {name: torch.zeros_like(tensor) for name, tensor in state.items()}
            dcp.load(saved, checkpoint_id=str(args.compare))
            result["max_weight_difference"] = max(float((saved[n] - state[n]).abs().max()) for n in state)
        if args.checkpoint:
            dcp.save(state, checkpoint_id=str(args.checkpoint))
    if group is not None:
        dist.destroy_process_group()
    return result


def main() -> None:
    args = parse()
    result = train(args)
    if int(os.environ.get("RANK", "0")) == 0:
        args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
