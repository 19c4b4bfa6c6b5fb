#!/usr/bin/env bash
# A one-node Kubernetes cluster on this machine that runs real pods, with kubetune installed
# by its Helm chart (the operator runs as a pod), until Ctrl-C:
#   scripts/cluster.sh up [--workdir DIR] [--no-kubetune]
# Builds what is missing first (cached): the control plane, the node (containerd, runc,
# CoreDNS, the training-operator) and the trainer/operator images. Needs root.
# It prints `export KUBECONFIG=...`; then `kubectl apply -f` a job. The e2e tests
# (tests/e2e/test_real_pods.py) run this same code. See docs/testing.md.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/system-deps.sh
export GOTOOLCHAIN=local
exec .venv/bin/python -m tests.e2e.cluster "$@"
