#!/usr/bin/env python3
"""Model-parallel layouts of the automodel trainer: speed, memory per rank, and the pre-flight.

Each layout trains the same job (same global batch, steps and seed) under torchrun, one
process per "GPU" of the layout, and the table shows for each:

- step time and tokens/s (real tokens over optimizer steps only), and the ratio to 1 process;
- the final loss (equal for every layout: they compute the same steps);
- the largest rank's weights + gradients + optimizer states, as allocated, next to what the
  memory pre-flight (`status.memoryEstimate`, `kubetune.planning.memory.estimate`) says for them;
- the largest rank's peak memory (CUDA allocator on GPUs; the process's RSS on CPU, which
  includes Python and torch) next to the pre-flight's total.

On CPU (gloo, the tiny generated models) this is a correctness-and-overhead table: CPU
processes share the cores, so more ranks do not mean more speed. On a GPU machine
(`--models smollm2`, the layouts that fit the visible GPUs) it also prints MFU: model FLOPs
per second (6 × parameters per token for full weights, 4 × for LoRA, whose frozen weights
need no weight gradients) over the GPUs' bf16 peak.

    .venv/bin/python bench/parallel_scaling.py                  # tiny models on CPU, every layout
    .venv/bin/python bench/parallel_scaling.py --layouts 1 tp2  # some layouts
    .venv/bin/python bench/parallel_scaling.py --models smollm2 # on a GPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))

LAYOUTS: dict[str, dict[str, int]] = {
    "1": {},
    "dp2": {"num_gpus_per_node": 2},
    "tp2": {"num_gpus_per_node": 2, "tensor_parallel_size": 2},
    "pp2": {"num_gpus_per_node": 2, "pipeline_parallel_size": 2},
    "cp2": {"num_gpus_per_node": 2, "context_parallel_size": 2},
    "dp2xtp2": {"num_gpus_per_node": 4, "tensor_parallel_size": 2},
    "dp2xpp2": {"num_gpus_per_node": 4, "pipeline_parallel_size": 2},
    "pp2xtp2": {"num_gpus_per_node": 4, "pipeline_parallel_size": 2, "tensor_parallel_size": 2},
    "moe-1": {},
    "moe-ep2": {"num_gpus_per_node": 2, "expert_parallel_size": 2},
}
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
"""Dense bf16 peak per GPU (vendor datasheets, without sparsity), by name fragment."""


def job_spec(kind: str, parallelism: dict[str, int], steps: int, micro: int, length: int) -> dict[str, Any]:
    training: dict[str, Any] = {"finetuning_type": kind, "max_seq_length": length}
    if kind == "lora":
        training["lora"] = {"rank": 16, "alpha": 32}
    return {
        "model": "bench-model",
        "dataset": {"training": "bench-data"},
        "training": training,
        "schedule": {"max_steps": steps, "seed": 1},
        "batch": {"global_batch_size": 8, "micro_batch_size": micro},
        "optimizer": {"learning_rate": 1e-3, "weight_decay": 0.0},
        **({"parallelism": parallelism} if parallelism else {}),
    }


def declared_model(folder: Path, parameters: int) -> Any:
    """The Model a user would declare for this folder: its size and shape from config.json."""
    from kubetune.api.resources import ModelSpec

    config = json.loads((folder / "config.json").read_text())
    return ModelSpec.model_validate(
        {
            "source": {"hostPath": {"path": str(folder.resolve())}},
            "numParameters": parameters,
            "numLayers": config["num_hidden_layers"],
            "hiddenSize": config["hidden_size"],
            "vocabSize": config["vocab_size"],
            "tieWordEmbeddings": bool(config.get("tie_word_embeddings", False)),
            "numExperts": config.get("num_experts") or 0,
        }
    )


def run_layout(
    name: str, folder: Path, data: Path, kind: str, steps: int, micro: int, length: int, workdir: Path
) -> dict[str, Any]:
    from kubetune.planning.memory.estimate import estimate, memory_inputs
    from kubetune.planning.resolved import JobIdentity, ResolvedPaths, resolve
    from kubetune.planning.validation import validate_job
    from kubetune_trainer.models import count_parameters, load_causal_lm

    spec = job_spec(kind, LAYOUTS[name], steps, micro, length)
    manifest = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "CustomizationJob",
        "metadata": {"name": "bench", "namespace": "default"},
        "spec": {"automodel": spec},
    }
    report = validate_job(manifest)
    if not report.valid or report.section is None or report.layout is None:
        raise SystemExit(f"{name}: invalid job: {report.errors}")
    out = workdir / f"out-{name}"
    paths = ResolvedPaths(model=str(folder), training=str(data), output=str(out))
    job = resolve(report.section, report.layout, JobIdentity(name="bench", uid=name), paths)
    config = workdir / f"{name}.json"
    config.write_text(job.model_dump_json(), encoding="utf-8")
    processes = job.layout.world_size
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    command = [*launcher, "-m", "kubetune_trainer", "--no-progress-bar", "--config", str(config)]
    began = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{name}: the trainer failed:\n{done.stderr[-3000:]}")
    metrics = json.loads((out / "bench-output" / "kubetune.json").read_text())["metrics"]
    parameters = count_parameters(load_causal_lm(str(folder)))[1]
    memory = estimate(
        memory_inputs(report.section, parameters, None, declared_model(folder, parameters)), report.layout
    )
    return {
        "layout": name,
        "ranks": processes,
        "wall_s": time.perf_counter() - began,
        "step_s": metrics["train_seconds"] / max(metrics["steps"], 1),
        "tokens_per_s": metrics["tokens_per_second"],
        "loss": metrics["train_loss"],
        "states_gib": metrics["states_memory_gib_per_rank"],
        "states_est_gib": memory.weights + memory.gradients + memory.optimizer,
        "peak_gib": metrics["peak_memory_gib_per_rank"],
        "total_est_gib": memory.total,
        "parameters": parameters,
    }


def mfu(row: dict[str, Any], kind: str) -> str:
    import torch

    if not torch.cuda.is_available():
        return "-"
    name = torch.cuda.get_device_name()
    peak = next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name), None)
    if peak is None:
        return "?"
    flops_per_token = (6 if kind == "all_weights" else 4) * row["parameters"]
    return f"{100 * row['tokens_per_s'] * flops_per_token / (peak * 1e12 * row['ranks']):.1f}%"


def prepare(model: str, workdir: Path) -> tuple[Path, Path, Path]:
    """(dense model, MoE model, training data)."""
    import tiny_models

    rows = [tiny_models.as_messages(r) for r in tiny_models.task_rows(400)]
    data = tiny_models.write_jsonl(workdir / "data" / "train.jsonl", rows)
    moe = tiny_models.build_moe_model(workdir / "tiny-moe", hidden=128, layers=4)
    if model == "tiny":
        return tiny_models.build_model(workdir / "tiny", hidden=128, layers=4), moe, data
    from smollm2 import fetch

    return fetch(), moe, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--kind", choices=["lora", "all_weights"], default="lora")
    parser.add_argument("--layouts", nargs="*", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    micro, length = (2, 128) if args.models == "tiny" else (4, 512)
    rows = []
    with tempfile.TemporaryDirectory(prefix="kubetune-parallel-") as tmp:
        workdir = Path(tmp)
        dense, moe, data = prepare(args.models, workdir)
        for index, name in enumerate(args.layouts, 1):
            print(f"[{index}/{len(args.layouts)}] {name} ...", file=sys.stderr, flush=True)
            folder = moe if name.startswith("moe") else dense
            rows.append(run_layout(name, folder, data, args.kind, args.steps, micro, length, workdir))
    base = {("moe" if r["layout"].startswith("moe") else "dense"): r for r in rows if r["layout"] in ("1", "moe-1")}
    header = (
        f"{'layout':<9}{'ranks':>6}{'step s':>8}{'tok/s':>9}{'vs 1':>7}{'loss':>9}"
        f"{'states GiB':>12}{'pre-flight':>11}{'peak GiB':>10}{'pre-flight':>11}{'MFU':>7}"
    )
    print(f"{args.models} model, {args.kind}, {args.steps} steps, global batch 8, micro {micro}, length {length}")
    print(header)
    for row in rows:
        reference = base.get("moe" if row["layout"].startswith("moe") else "dense")
        ratio = row["tokens_per_s"] / reference["tokens_per_s"] if reference and reference["tokens_per_s"] else 0.0
        print(
            f"{row['layout']:<9}{row['ranks']:>6}{row['step_s']:>8.3f}{row['tokens_per_s']:>9.1f}{ratio:>6.2f}×"
            f"{row['loss']:>9.4f}{row['states_gib']:>12.4f}{row['states_est_gib']:>11.4f}"
            f"{row['peak_gib']:>10.3f}{row['total_est_gib']:>11.3f}{mfu(row, args.kind):>7}"
        )
    print(
        "states: the largest rank's weights + gradients + optimizer states as allocated; pre-flight: the memory "
        "estimate's weights + gradients + optimizer (it assumes 16-bit frozen weights for LoRA; the CPU trainer "
        "keeps fp32). peak: CUDA allocator peak on GPUs, process RSS on CPU (Python and torch included); "
        "pre-flight: its total (GPU overheads included)."
    )


if __name__ == "__main__":
    main()
