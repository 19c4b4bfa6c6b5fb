"""Worker of tests/trainer/test_pipeline.py: 10 AdamW steps, in one process or as a 2-stage pipeline.

    python pipeline_worker.py MODEL OUT.json                     # the reference, one process
    python -m torch.distributed.run --nproc-per-node=2 pipeline_worker.py MODEL OUT.json   # pp2
    python -m torch.distributed.run --nproc-per-node=4 pipeline_worker.py MODEL OUT.json   # dp2 × pp2, FSDP2

Each case (LoRA / full weights × packed / unpacked rows) trains the same micro batches the
same way: losses are sums over label tokens scaled by 1 / the step's label count, gradients
clipped at norm 1.0, AdamW. The pipeline run splits the model with `split_stage` and steps
with `PipelineRunner`; rank 0 writes per-step losses, validation losses and each stage's
state_dict keys (with the full model's) to OUT.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kubetune_trainer.batching import Batch, as_sequences, collate
from kubetune_trainer.data import Row, parse_rows, tokenize
from kubetune_trainer.distributed import clip_gradients
from kubetune_trainer.losses import cross_entropy_sum, shift_labels
from kubetune_trainer.models import add_lora, load_causal_lm, pad_id
from kubetune_trainer.parallel.mesh import ParallelDims, build_mesh
from kubetune_trainer.parallel.pipeline import PipelineRunner, split_stage

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import tiny_models

STEPS, MICRO_BATCH, SEQ_LENGTH, MAX_NORM = 10, 2, 64, 1.0
CASES = [(kind, packed, 3, False) for kind in ("lora", "all_weights") for packed in (False, True)]
CASES.append(("all_weights", True, 1, False))  # fewer micro batches than stages: GPipe instead of 1F1B
CASES.append(("all_weights", False, 3, True))  # LM head tied to the embeddings, trained on two stages
FSDP_CASES = [("lora", False, 4, False), ("all_weights", False, 4, True)]
"""dp2 × pp2 (4 processes): FSDP2 shards each stage over its data-parallel pair."""


def case_name(kind: str, packed: bool, accumulation: int, tied: bool) -> str:
    return f"{kind}-{'packed' if packed else 'unpacked'}-{accumulation}mb{'-tied' if tied else ''}"


def step_batches(folder: Path, packed: bool, accumulation: int) -> tuple[list[list[Batch]], list[Batch], int]:
    """Micro batches of every step (varying widths), two validation batches, and the pad id."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = [Row(f"row {i}", r) for i, r in enumerate(tiny_models.task_rows(480, seed=3))]
    examples = tokenize(parse_rows(rows), tokenizer, SEQ_LENGTH).examples
    sequences = as_sequences(examples, packed, SEQ_LENGTH, seed=5)
    pad = pad_id(tokenizer)
    per_step = accumulation * MICRO_BATCH
    steps = [
        [collate(sequences[s * per_step + m * MICRO_BATCH :][:MICRO_BATCH], pad, packed) for m in range(accumulation)]
        for s in range(STEPS)
    ]
    # The second validation batch has a single row, as a rank's last validation batch may.
    validation = [collate(sequences[-3:-1], pad, packed), collate(sequences[-1:], pad, packed)]
    return steps, validation, pad


def load(folder: Path, kind: str, tied: bool) -> nn.Module:
    torch.manual_seed(0)  # LoRA's A matrices are random: the same on every rank and in both runs
    model: Any = load_causal_lm(str(folder))
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
        model.config.tie_word_embeddings = True
    return add_lora(model, 8, 16, None) if kind == "lora" else model


def loss(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    total = cross_entropy_sum(logits, shift_labels(batch.labels).to(logits.device))
    return total, {"tokens": torch.tensor(float(batch.num_label_tokens))}


def optimizer(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=1e-2 if kind == "lora" else 1e-3, weight_decay=0.0)


def run_single(folder: Path, kind: str, packed: bool, accumulation: int, tied: bool) -> dict[str, Any]:
    steps, validation, _ = step_batches(folder, packed, accumulation)
    model = load(folder, kind, tied)
    keys = sorted(model.state_dict())
    opt = optimizer(model, kind)
    losses = []
    for micro_batches in steps:
        labels = sum(b.num_label_tokens for b in micro_batches)
        total = 0.0
        for batch in micro_batches:
            value, _ = loss(model(**batch.model_inputs(torch.device("cpu"))).logits, batch)
            (value / labels).backward()  # type: ignore[no-untyped-call]
            total += float(value.detach())
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / labels)
    with torch.no_grad():
        val = [float(loss(model(**b.model_inputs(torch.device("cpu"))).logits, b)[0]) for b in validation]
    return {"losses": losses, "validation": val, "full_keys": keys}


def run_pipeline(
    folder: Path, kind: str, packed: bool, accumulation: int, tied: bool, rank: int, world: int
) -> dict[str, Any]:
    dp = world // 2
    mesh = build_mesh(ParallelDims(pp=2, dp=dp), rank, world, torch.device("cpu"))
    group = mesh.group("pp")
    steps, validation, pad = step_batches(folder, packed, accumulation)
    model = load(folder, kind, tied)
    full_keys = sorted(model.state_dict())
    stage = split_stage(model, mesh.coordinate("pp"), 2)
    dp_mesh = mesh.submesh("dp")
    if dp_mesh is not None:  # what the trainer does between splitting and scheduling
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for layer in stage.decoder.layers.values():
            fully_shard(layer, mesh=dp_mesh, mp_policy=policy)
        fully_shard(stage, mesh=dp_mesh, mp_policy=policy)
    per_rank = accumulation // dp
    runner = PipelineRunner(
        stage, group, mesh.device, per_rank, MICRO_BATCH, SEQ_LENGTH, loss, pad, extra_keys=["tokens"]
    )
    opt = optimizer(stage, kind)
    losses, counted = [], []
    for micro_batches in steps:
        labels = sum(b.num_label_tokens for b in micro_batches)
        mine = micro_batches[mesh.data_rank * per_rank :][:per_rank]
        sums = runner.train_step(mine, dp / labels)  # FSDP averages gradients over dp: undo that
        trainable = [p for p in stage.parameters() if p.requires_grad]
        clip_gradients(trainable, MAX_NORM, group, stage.norm_parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
        totals = torch.tensor([sums.loss, sums.extras["tokens"]], dtype=torch.float64)
        dist.all_reduce(totals)  # the last stage of every data-parallel rank
        losses.append(float(totals[0]) / labels)
        counted.append(float(totals[1]))
    val = []
    for batch in validation:
        value = torch.tensor([runner.evaluate(batch)], dtype=torch.float64)
        dist.all_reduce(value, group=group)
        val.append(float(value))
    stage_keys: list[list[str]] = [[] for _ in range(2)]
    dist.all_gather_object(stage_keys, sorted(stage.state_dict()), group=group)
    return {
        "losses": losses,
        "validation": val,
        "full_keys": full_keys,
        "stage_keys": stage_keys,
        "label_tokens": counted,
        "expected_label_tokens": [float(sum(b.num_label_tokens for b in s)) for s in steps],
        "schedule": runner.schedule_name,
    }


def main() -> None:
    folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.use_deterministic_algorithms(True)
    results: dict[str, Any] = {}
    if world > 1:
        dist.init_process_group("gloo")
    for case in CASES if world <= 2 else FSDP_CASES:
        if world == 1:
            results[case_name(*case)] = run_single(folder, *case)
        else:
            results[case_name(*case)] = run_pipeline(folder, *case, rank, world)
    if rank == 0:
        out.write_text(json.dumps(results))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
