"""Trains the tiny model for a few AdamW steps and writes the per-step losses as JSON.

Under `torch.distributed.run` with cp = the number of processes: every process gets the
same micro batches, keeps its load-balanced slice of each sequence, and the parameter
gradients are summed over the cp group before the optimizer step. Then rank 0 trains the
1-process reference: the model's own SDPA attention on whole sequences, `Batch.model_inputs`
and `losses.per_token_cross_entropy` (which shifts the labels itself), no collectives.

    python -m torch.distributed.run --standalone --nproc-per-node=2 cp_worker.py MODEL lora|all_weights OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kubetune_trainer.batching import Batch, as_sequences, collate
from kubetune_trainer.data import IGNORE_INDEX, Example
from kubetune_trainer.losses import cross_entropy_sum, per_token_cross_entropy
from kubetune_trainer.models import add_lora, load_causal_lm, load_tokenizer
from kubetune_trainer.parallel.context import ContextParallel
from kubetune_trainer.parallel.mesh import ParallelDims, build_mesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import tiny_models

STEPS, MICRO_BATCHES, ROWS, MAX_LENGTH, PAD_ID = 10, 2, 3, 48, 3
LEARNING_RATES = {"lora": 1e-2, "all_weights": 2e-3}


def examples(tokenizer: Any, count: int) -> list[Example]:
    """The tiny models' learnable tasks: loss on the completion (and its end token) only."""
    out = []
    for row in tiny_models.task_rows(count):
        prompt = tokenizer(f"{row['prompt']}\n")["input_ids"]
        completion = [*tokenizer(row["completion"])["input_ids"], tokenizer.eos_token_id]
        out.append(Example([*prompt, *completion], [IGNORE_INDEX] * len(prompt) + completion))
    return out


def step_batches(packed: bool, tokenizer: Any) -> list[list[Batch]]:
    rows = as_sequences(examples(tokenizer, 320), packed, MAX_LENGTH, seed=1)
    per_step = MICRO_BATCHES * ROWS
    assert len(rows) >= STEPS * per_step, len(rows)
    return [
        [collate(rows[s * per_step + m * ROWS : s * per_step + (m + 1) * ROWS], PAD_ID, packed) for m in range(2)]
        for s in range(STEPS)
    ]


def train(model_path: str, kind: str, packed: bool, cp: ContextParallel) -> list[float]:
    torch.manual_seed(0)  # the same LoRA initialisation in every process
    model = load_causal_lm(model_path)
    if kind == "lora":
        model = add_lora(model, rank=8, alpha=16, target_modules=None)
    model = cp.apply(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATES[kind], weight_decay=0.0)
    curve = []
    for batches in step_batches(packed, load_tokenizer(model_path)):
        labels = sum(b.num_label_tokens for b in batches)
        total = torch.zeros(())
        for batch in batches:
            if cp.enabled:
                shard = cp.shard(batch, PAD_ID)
                logits = model(**shard.model_inputs(torch.device("cpu"))).logits
                loss_sum = cross_entropy_sum(logits, shard.labels)
            else:
                logits = model(**batch.model_inputs(torch.device("cpu"))).logits
                loss_sum = per_token_cross_entropy(logits, batch.labels).sum()
            (loss_sum / labels).backward()  # type: ignore[no-untyped-call]
            total += loss_sum.detach()
        if cp.enabled:
            for p in params:
                assert p.grad is not None
                dist.all_reduce(p.grad, group=cp.group)
            dist.all_reduce(total, group=cp.group)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append(float(total) / labels)
    return curve


def main() -> None:
    model_path, kind, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = build_mesh(ParallelDims(cp=world), rank, world, torch.device("cpu"))
    cp = ContextParallel.from_mesh(mesh)
    results = {"packed" if packed else "unpacked": train(model_path, kind, packed, cp) for packed in (False, True)}
    if rank == 0:
        # The 1-process reference, here to save a second start of Python: a fresh model with
        # its own SDPA attention, whole sequences, no collectives.
        alone = ContextParallel(group=None)
        reference = {"packed" if p else "unpacked": train(model_path, kind, p, alone) for p in (False, True)}
        out.write_text(json.dumps({"cp": results, "reference": reference}), encoding="utf-8")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
