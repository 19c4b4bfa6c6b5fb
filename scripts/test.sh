#!/usr/bin/env bash
# Set up .venv, install the Debian packages the test cluster needs, build (or reuse) the
# Kubernetes binaries, the node's binaries and the two images, and run every check: ruff,
# mypy, import-linter, vulture, and the whole pytest suite, e2e tests (real pods) included.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/system-deps.sh
export GOTOOLCHAIN=local
KUBETUNE_CP_BIN=$(bash tools/controlplane/build.sh)
export KUBETUNE_CP_BIN
bash tools/node/build.sh >/dev/null
bash tools/images/build.sh all >/dev/null
.venv/bin/ruff check operator trainer tests bench scripts tools
.venv/bin/mypy
.venv/bin/lint-imports
.venv/bin/vulture  # unused code: paths and confidence in pyproject.toml [tool.vulture]
exec .venv/bin/python -m pytest "$@"
