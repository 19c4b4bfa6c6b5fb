#!/usr/bin/env bash
# Set up .venv, build (or reuse) the Kubernetes control plane, and run every check:
# ruff, mypy, import-linter, and the whole pytest suite, e2e tests included.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export GOTOOLCHAIN=local
KUBETUNE_CP_BIN=$(bash tools/controlplane/build.sh)
export KUBETUNE_CP_BIN
.venv/bin/ruff check operator trainer tests bench scripts
.venv/bin/mypy
.venv/bin/lint-imports
exec .venv/bin/python -m pytest "$@"
